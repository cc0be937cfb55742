#!/usr/bin/env python3
"""Write the small GSM8K fixtures of tests/data_test.ts into tests/fixtures/gsm8k/.

  train-head.jsonl    the first 20 records of GSM8K's train split, verbatim
  train-head.parquet  the same records as the Hub's openai/gsm8k parquet files hold them: columns
                      "question" and "answer" (string), snappy compression (pyarrow's default, as the
                      Hub's files use), in row groups of 8 rows so that reading crosses row groups
  bad.parquet         4 rows: a good one, a null "answer", an answer without "####", an empty question
  no-answer.parquet   2 rows with columns "question" and "solution" (no "answer" column)

The records come from the GSM8K release (MIT licence, github.com/openai/grade-school-math; the license
is in tests/fixtures/gsm8k/LICENSE): its train.jsonl, named by --source or by $MOERL_GSM8K_DIR (the folder
holding train.jsonl and test.jsonl).

Usage (needs pyarrow, e.g. `/work/venv-fx/bin/pip install pyarrow`):
  /work/venv-fx/bin/python scripts/make_gsm8k_parquet_fixture.py --source PATH/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gsm8k"
N = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    release = os.environ.get("MOERL_GSM8K_DIR")
    ap.add_argument("--source", type=Path, default=Path(release) / "train.jsonl" if release else None,
                    required=release is None, help="GSM8K's train.jsonl (default: $MOERL_GSM8K_DIR/train.jsonl)")
    args = ap.parse_args()

    lines = args.source.read_text(encoding="utf-8").splitlines()[:N]
    records = [json.loads(line) for line in lines]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train-head.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
    table = pa.Table.from_pylist(records, schema=schema)
    pq.write_table(table, OUT / "train-head.parquet", compression="snappy", row_group_size=8)

    good = records[0]
    bad = [
        good,
        {"question": "What is 1 + 1?", "answer": None},
        {"question": "What is 2 + 2?", "answer": "2 + 2 = 4, no marker line"},
        {"question": "", "answer": "#### 3"},
    ]
    pq.write_table(pa.Table.from_pylist(bad, schema=schema), OUT / "bad.parquet", compression="snappy")
    other = pa.schema([("question", pa.string()), ("solution", pa.string())])
    rows = [{"question": r["question"], "solution": r["answer"]} for r in records[:2]]
    pq.write_table(pa.Table.from_pylist(rows, schema=other), OUT / "no-answer.parquet", compression="snappy")
    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
