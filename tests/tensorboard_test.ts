/**
 * TensorBoard event files (train/tensorboard.ts): byte for byte what tensorboard's own protos and
 * RecordWriter write (tests/fixtures/tensorboard/ from scripts/make_tensorboard_fixture.py), and a training
 * run's files hold every update's metrics, a resume included (read back here, and by tensorboard's
 * EventAccumulator where a Python has it).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { crc32c, encodeEvent, frameRecord, TensorBoardLog } from "../train/tensorboard.ts";
import { loadTrainConfig } from "../train/config.ts";
import { train } from "../train/loop.ts";
import { readRecords } from "../train/metrics.ts";
import { PYTHON, pythonHas } from "./util.ts";
import { nativeLiveCount } from "../ffi/mod.ts";

const ROOT = join(import.meta.dirname!, "..");
const FIXTURE = join(ROOT, "tests", "fixtures", "tensorboard", "events.bin");
nativeLiveCount(); // the shim loaded now: the resource sanitizer would count its loading in a test as a leak

/** A protocol buffer's fields: field number → values (varints as bigint, fixed64/32 as bytes, others bytes). */
function fields(b: Uint8Array): Map<number, (bigint | Uint8Array)[]> {
  const out = new Map<number, (bigint | Uint8Array)[]>();
  let i = 0;
  const varint = (): bigint => {
    let v = 0n, shift = 0n;
    for (;;) {
      const byte = b[i++]!;
      v |= BigInt(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return v;
      shift += 7n;
    }
  };
  while (i < b.length) {
    const key = Number(varint()), field = key >> 3, wire = key & 7;
    const len = wire === 0 ? 0 : wire === 1 ? 8 : wire === 5 ? 4 : wire === 2 ? Number(varint()) : NaN;
    assert.ok(!Number.isNaN(len), `wire type ${wire}`);
    const value = wire === 0 ? varint() : b.slice(i, i += len);
    out.set(field, [...(out.get(field) ?? []), value]);
  }
  return out;
}

interface ReadEvent {
  step: number;
  wallTime: number;
  scalars: Record<string, number>;
  start: boolean;
}

/** Every event of a file, its records' checksums checked. */
async function readEvents(path: string): Promise<ReadEvent[]> {
  const bytes = await Deno.readFile(path), view = new DataView(bytes.buffer);
  const events: ReadEvent[] = [];
  for (let at = 0; at < bytes.length;) {
    const n = Number(view.getBigUint64(at, true));
    const data = bytes.subarray(at + 12, at + 12 + n);
    assert.deepEqual(frameRecord(data), bytes.subarray(at, at + 16 + n), `record at byte ${at}`);
    at += 16 + n;
    const f = fields(data);
    const scalars: Record<string, number> = {};
    for (const value of (f.get(5) ?? []) as Uint8Array[]) {
      for (const v of (fields(value).get(1) ?? []) as Uint8Array[]) {
        const vf = fields(v);
        const tag = new TextDecoder().decode(vf.get(1)![0] as Uint8Array);
        scalars[tag] = new DataView((vf.get(2)![0] as Uint8Array).buffer).getFloat32(0, true);
      }
    }
    events.push({
      step: Number(f.get(2)?.[0] ?? 0n),
      wallTime: new DataView((f.get(1)![0] as Uint8Array).buffer).getFloat64(0, true),
      scalars,
      start: f.has(7),
    });
  }
  return events;
}

Deno.test("tensorboard: CRC-32C and the encoding are tensorboard's own, byte for byte", async () => {
  assert.equal(crc32c(new TextEncoder().encode("123456789")), 0xe3069283); // the standard check value
  const fixture = await Deno.readFile(FIXTURE);
  const dir = await Deno.makeTempDir({ prefix: "moerl-tb-" });
  try {
    const times = [1700000000.5, 1700000001.25, 1700000002.0, 1700000003.0];
    const log = await TensorBoardLog.open(dir, { resumeStep: 3, now: () => times.shift()! });
    // Only finite numbers are scalars: NaN (a metric switched off), null and text are left out.
    await log.scalars(3, { reward_mean: 0.25, loss: -1.5, big: 123456.789, off: NaN, none: null, note: "x" });
    await log.scalars(2 ** 32, { reward_mean: 0.5 });
    log.close();
    assert.match(log.path, /[\\/]events\.out\.tfevents\.1700000000\.[^.]+.*\.\d+$/);
    assert.deepEqual(await Deno.readFile(log.path), fixture);
    await assert.rejects(() => log.scalars(5, { x: 1 }), /event file is closed/);
    const last = frameRecord(
      encodeEvent({ wallTime: 1700000003, step: 2 ** 32, body: { scalars: { reward_mean: 0.5 } } }),
    );
    assert.deepEqual(last, fixture.subarray(fixture.length - last.length), "the last record alone");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("tensorboard: a run's event files hold every update's metrics; a resume starts a session", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl-tb-run-" });
  try {
    const config = (updates: number) =>
      loadTrainConfig(join(ROOT, "configs", "tiny.yaml"), [
        `output.dir=${tmp}`,
        `train.updates=${updates}`,
        "output.checkpointEvery=2",
        "eval.every=2",
        "logging.tensorboard=true",
      ]);
    await train(await config(2), { quiet: true });
    await train(await config(3), { quiet: true, resume: true });
    const dir = tmp; // output.dir is the run folder
    const files = [];
    for await (const e of Deno.readDir(dir)) {
      if (e.name.startsWith("events.out.tfevents.")) files.push(e.name);
    }
    assert.equal(files.length, 2, "one file per start");
    const events = (await Promise.all(files.map((f) => readEvents(join(dir, f))))).flat();
    const { records } = await readRecords(join(dir, "metrics.jsonl"));
    assert.deepEqual(records.map((r) => r.step), [1, 2, 3]);
    assert.deepEqual(events.filter((e) => e.start).map((e) => e.step), [3], "the resume's first step");
    for (const r of records) {
      const logged = events.find((e) => e.step === r.step && Object.keys(e.scalars).length > 0);
      assert.ok(logged, `step ${r.step} logged`);
      const numbers = Object.entries(r).filter(([k, v]) =>
        k !== "step" && typeof v === "number" && isFinite(v)
      );
      assert.deepEqual(Object.keys(logged.scalars).sort(), numbers.map(([k]) => k).sort());
      for (const [k, v] of numbers) {
        assert.equal(logged.scalars[k], Math.fround(v as number), `${k} at ${r.step}`);
      }
    }
    assert.ok("eval_accuracy_flexible" in events.find((e) => e.step === 2)!.scalars, "evaluations too");
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test({
  name:
    "tensorboard: TensorBoard's own reader reads the files, and a resume's session start drops the cut-off steps",
  ignore: !pythonHas("tensorboard"),
  async fn(): Promise<void> {
    const dir = await Deno.makeTempDir({ prefix: "moerl-tb-py-" });
    try {
      let clock = 1700000000;
      const now = (): number => clock++;
      const first = await TensorBoardLog.open(dir, { now });
      for (const step of [1, 2, 3]) await first.scalars(step, { reward_mean: step / 10 }); // 3: after the checkpoint
      first.close();
      clock = 1700000100; // resumed from the checkpoint at update 2
      const second = await TensorBoardLog.open(dir, { resumeStep: 3, now });
      for (const step of [3, 4]) await second.scalars(step, { reward_mean: step });
      second.close();
      const py = await new Deno.Command(PYTHON, {
        args: [
          "-c",
          "import json, sys\n" +
          "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n" +
          "a = EventAccumulator(sys.argv[1]); a.Reload()\n" +
          "print(json.dumps({t: [[e.step, e.value, e.wall_time] for e in a.Scalars(t)] for t in a.Tags()['scalars']}))",
          dir,
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(py.code, 0, new TextDecoder().decode(py.stderr));
      const seen = JSON.parse(new TextDecoder().decode(py.stdout)) as Record<string, number[][]>;
      assert.deepEqual(Object.keys(seen), ["reward_mean"]);
      assert.deepEqual(
        seen.reward_mean!.map(([step, value]) => [step, value]),
        [[1, Math.fround(0.1)], [2, Math.fround(0.2)], [3, 3], [4, 4]],
        "step 3 of the first file is dropped",
      );
      assert.equal(seen.reward_mean![0]![2], 1700000001);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "tensorboard: a file whose first record cannot be written is closed, the error naming it",
  sanitizeResources: true, // off by default: a file left open would pass unseen
}, async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl-tb-fail-" });
  const write = Deno.FsFile.prototype.write;
  // A full disk.
  Deno.FsFile.prototype.write = () => Promise.reject(new Error("No space left on device (os error 28)"));
  try {
    await assert.rejects(
      TensorBoardLog.open(tmp),
      /cannot append to .*events\.out\.tfevents\..*No space left/,
    );
  } finally {
    Deno.FsFile.prototype.write = write;
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test({
  name: "train: a run whose event file cannot be made stops with its metrics and samples logs closed",
  sanitizeResources: true,
}, async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl-tb-fail-" });
  const open = Deno.open;
  Deno.open = ((path: string | URL, options?: Deno.OpenOptions) =>
    String(path).includes("events.out.tfevents.")
      ? Promise.reject(new Error("Permission denied (os error 13)"))
      : open(path, options)) as typeof Deno.open;
  try {
    const cfg = await loadTrainConfig(join(ROOT, "configs", "tiny.yaml"), [
      `output.dir=${join(tmp, "run")}`,
      "train.updates=1",
      "eval.every=0",
      "logging.tensorboard=true",
    ]);
    await assert.rejects(
      train(cfg, { quiet: true }),
      /cannot create .*events\.out\.tfevents\..*Permission denied/,
    );
  } finally {
    Deno.open = open;
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("tensorboard: a second file in the same second (a quick resume in one process) gets a name of its own", async () => {
  const dir = await Deno.makeTempDir({ prefix: "moerl-tb-" });
  try {
    const paths: string[] = [];
    for (const at of [1700000000, 1700000000.4, 1700000000.9]) {
      const log = await TensorBoardLog.open(dir, { resumeStep: 2, now: () => at });
      log.close();
      paths.push(log.path);
    }
    assert.equal(new Set(paths).size, 3);
    assert.match(paths[1]!, /\.1$/);
    assert.deepEqual([...paths].sort(), paths, "TensorBoard reads them in name order: the order they began");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
