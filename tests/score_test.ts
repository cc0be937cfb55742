/**
 * `deno task score`: run as a subprocess on small temporary files (verdicts,
 * totals, malformed lines, exit status, atomic outputs), and its functions in
 * process.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { extractAnswer } from "../data/answer.ts";
import { type RowVerdict, type ScoreSummary, scoreText } from "../eval/score.ts";

const SCRIPT = fileURLToPath(new URL("../eval/score.ts", import.meta.url));
const CONFIG = fileURLToPath(new URL("../deno.json", import.meta.url));
const TMP = Deno.makeTempDirSync({ prefix: "moerl_score_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(TMP, { recursive: true }));

const ROWS = [
  { id: "a", completion: "6 * 7 = 42\n#### 42", answer: 42 }, // both right
  { id: "b", completion: "So the total is $1,000.", answer: "1,000" }, // flexible only (last number)
  { completion: "The final answer is 17.", answer: "3 + 14 = <<3+14=17>>17\n#### 17" }, // flexible only
  { completion: "#### 5", answer: "6" }, // both wrong
  { completion: "I cannot tell.", answer: 3 }, // nothing extracted
  { completion: "\\boxed{\\frac{3}{4}}", answer: 0.75 }, // flexible only (boxed)
];
const BAD = [
  "{oops",
  '{"completion": 5, "answer": 1}',
  '{"completion": "x"}',
  '{"completion": "#### 1", "answer": "one"}',
];

/** The input: ROWS with malformed lines and a blank line mixed in; the malformed ones land on lines 2, 4, 6, 9. */
function inputText(): string {
  const r = ROWS.map((x) => JSON.stringify(x));
  return [r[0], BAD[0], r[1], BAD[1], r[2], BAD[2], "", r[3], BAD[3], r[4], r[5]].join("\n") + "\n";
}
const GOOD_LINES = [1, 3, 5, 8, 10, 11];

async function runScore(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--config", CONFIG, SCRIPT, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

Deno.test("score CLI: verdicts per line, totals printed and written, malformed lines reported", async () => {
  const dir = await Deno.makeTempDir({ dir: TMP });
  const input = join(dir, "completions.jsonl");
  await Deno.writeTextFile(input, inputText());
  const { code, stdout, stderr } = await runScore([
    input,
    "--out",
    join(dir, "v.jsonl"),
    "--summary",
    join(dir, "s.json"),
  ]);
  assert.equal(code, 0, stderr);

  const verdicts: RowVerdict[] = (await Deno.readTextFile(join(dir, "v.jsonl"))).trim().split("\n").map((l) =>
    JSON.parse(l)
  );
  assert.deepEqual(verdicts.map((v) => v.line), GOOD_LINES);
  // each verdict agrees with the library's extraction of that row
  verdicts.forEach((v, i) => {
    const row = ROWS[i]!;
    const s = extractAnswer(row.completion, { mode: "strict" }), f = extractAnswer(row.completion);
    assert.equal(v.extracted_strict, s.value, `line ${v.line}`);
    assert.equal(v.extracted_flexible, f.value, `line ${v.line}`);
    assert.equal(v.method_flexible, f.method, `line ${v.line}`);
  });
  assert.deepEqual(verdicts.map((v) => v.answer_gold), ["42", "1000", "17", "6", "3", "0.75"]);
  assert.deepEqual(verdicts.map((v) => v.correct_strict), [true, false, false, false, false, false]);
  assert.deepEqual(verdicts.map((v) => v.correct_flexible), [true, true, true, false, false, true]);
  assert.deepEqual(verdicts.map((v) => v.id), ["a", "b", undefined, undefined, undefined, undefined]);

  const summary: ScoreSummary = JSON.parse(await Deno.readTextFile(join(dir, "s.json")));
  assert.equal(summary.input, input);
  assert.deepEqual(
    [summary.rows, summary.scored, summary.malformed, summary.correct_strict, summary.correct_flexible],
    [10, 6, 4, 1, 4],
  );
  assert.equal(summary.accuracy_strict, 1 / 6);
  assert.equal(summary.accuracy_flexible, 4 / 6);
  assert.deepEqual(summary.methods_flexible, {
    "####": 2,
    final_answer: 1,
    boxed: 1,
    answer_phrase: 0,
    last_number: 1,
    none: 1,
  });
  assert.deepEqual(summary.malformed_lines.map((m) => m.line), [2, 4, 6, 9]);
  assert.match(summary.malformed_lines[0]!.reason, /invalid JSON/);
  assert.match(summary.malformed_lines[1]!.reason, /"completion" must be a string, got 5/);
  assert.match(summary.malformed_lines[2]!.reason, /"answer" must be a number or a string, got nothing/);
  assert.match(summary.malformed_lines[3]!.reason, /"answer" "one" is not a number/);

  assert.match(stdout, /6 scored, 4 malformed \(of 10 lines\)/);
  assert.match(stdout, /strict .*: 1\/6 = 16\.67%/);
  assert.match(stdout, /flexible .*: 4\/6 = 66\.67%/);
  for (const line of [2, 4, 6, 9]) assert.match(stderr, new RegExp(`completions\\.jsonl:${line}: skipped`));
  // only the outputs and the input are left: the temporary files were renamed into place
  const names = (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort();
  assert.deepEqual(names, ["completions.jsonl", "s.json", "v.jsonl"]);
});

Deno.test("score CLI: default output paths beside the input; outputs are replaced whole", async () => {
  const dir = await Deno.makeTempDir({ dir: TMP });
  const input = join(dir, "run.jsonl");
  await Deno.writeTextFile(input, inputText());
  await Deno.writeTextFile(
    join(dir, "run.scored.jsonl"),
    "stale content that is longer than nothing\n".repeat(50),
  );
  const { code, stderr } = await runScore([input]);
  assert.equal(code, 0, stderr);
  const verdicts = (await Deno.readTextFile(join(dir, "run.scored.jsonl"))).trim().split("\n");
  assert.equal(verdicts.length, 6);
  assert.equal(JSON.parse(await Deno.readTextFile(join(dir, "run.summary.json"))).scored, 6);
});

Deno.test("score CLI: bad arguments, unreadable input, nothing scorable", async () => {
  const dir = await Deno.makeTempDir({ dir: TMP });
  let r = await runScore([]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /expected one input file, got 0\nusage: deno task score/);
  r = await runScore(["a.jsonl", "--bogus"]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /bogus/);
  r = await runScore(["--help"]);
  assert.equal(r.code, 0);
  assert.match(r.stdout, /^usage:/);
  r = await runScore([join(dir, "missing.jsonl")]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /cannot read .*missing\.jsonl/);
  const input = join(dir, "in.jsonl");
  await Deno.writeTextFile(input, BAD.join("\n"));
  r = await runScore([input, "--out", input]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /refusing to overwrite the input/);
  r = await runScore([input]);
  assert.equal(r.code, 1, "no line could be scored");
  assert.match(r.stderr, /no line of .*in\.jsonl could be scored/);
  assert.equal(JSON.parse(await Deno.readTextFile(join(dir, "in.summary.json"))).malformed, 4);
});

Deno.test("scoreText in process: the same totals as the CLI", () => {
  const { verdicts, summary } = scoreText(inputText());
  assert.equal(summary.input, null);
  assert.deepEqual(verdicts.map((v) => v.line), GOOD_LINES);
  assert.deepEqual([summary.scored, summary.correct_strict, summary.correct_flexible], [6, 1, 4]);
  const empty = scoreText("");
  assert.deepEqual([empty.summary.rows, empty.summary.accuracy_strict, empty.summary.accuracy_flexible], [
    0,
    0,
    0,
  ]);
});

Deno.test("score reads deno task evaluate's predictions (answer_gold) and its own verdicts as they are", () => {
  const evaluated = [
    { id: "test-0", question: "q", answer_gold: "72", completion: "so 72 in all.\n#### 72" },
    { id: "test-1", question: "q", answer_gold: "10", completion: "The answer is 12." },
  ].map((r) => JSON.stringify(r)).join("\n");
  const { verdicts, summary } = scoreText(evaluated);
  assert.deepEqual(verdicts.map((v) => [v.id, v.answer_gold, v.correct_flexible]), [
    ["test-0", "72", true],
    ["test-1", "10", false],
  ]);
  assert.equal(summary.malformed, 0);
  // An explicit answer wins over answer_gold.
  const both = scoreText(JSON.stringify({ answer: "5", answer_gold: "6", completion: "#### 5" }));
  assert.equal(both.verdicts[0]!.correct_strict, true);
});
