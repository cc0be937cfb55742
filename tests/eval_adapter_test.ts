/**
 * eval/adapter.ts: a run folder's newest checkpoint removed while it loads (a training run's keepLast
 * pruning it) is chosen again; a named checkpoint that vanishes gives an error that says so; a load error
 * of the adapter's own is passed on unchanged.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { loadAdapterOnRanks, resolveAdapter } from "../eval/adapter.ts";
import { Replicas } from "../rl/replicas.ts";
import { ADAPTER_DIR, LATEST_FILE, TRAINER_STATE_FILE } from "../train/checkpoint.ts";
import { ADAPTER_CONFIG } from "../model/peft.ts";

/** A run folder with checkpoint-<step> (an adapter_config.json and a trainer state), `latest` at it. */
async function addCheckpoint(run: string, step: number): Promise<string> {
  const dir = join(run, `checkpoint-${step}`);
  await Deno.mkdir(join(dir, ADAPTER_DIR), { recursive: true });
  await Deno.writeTextFile(join(dir, ADAPTER_DIR, ADAPTER_CONFIG), "{}");
  await Deno.writeTextFile(join(dir, TRAINER_STATE_FILE), "{}");
  await Deno.writeTextFile(join(run, LATEST_FILE), `checkpoint-${step}\n`);
  return dir;
}

/** What loading gives in these tests: the folder it read, and whether it was freed. */
class Loaded {
  disposed = false;
  constructor(readonly dir: string) {}
  dispose(): void {
    this.disposed = true;
  }
}

Deno.test("evaluate adapter: a run's newest checkpoint pruned while loading is chosen again", async () => {
  const run = await Deno.makeTempDir();
  try {
    const first = await addCheckpoint(run, 10);
    const seen: string[] = [];
    const got = await loadAdapterOnRanks(run, Replicas.single(), async (dir) => {
      seen.push(dir);
      if (seen.length === 1) { // training saves checkpoint-20 and prunes checkpoint-10 (keepLast 1)
        await addCheckpoint(run, 20);
        await Deno.remove(first, { recursive: true });
        throw new Error(`${dir}: no ${ADAPTER_CONFIG} (not a PEFT adapter folder)`);
      }
      return new Loaded(dir);
    });
    assert.deepEqual(seen, [
      join(run, "checkpoint-10", ADAPTER_DIR),
      join(run, "checkpoint-20", ADAPTER_DIR),
    ]);
    assert.equal(got.dir, join(run, "checkpoint-20", ADAPTER_DIR));
    assert.equal(got.adapter.dir, got.dir);
  } finally {
    await Deno.remove(run, { recursive: true });
  }
});

Deno.test("evaluate adapter: a named checkpoint removed while loading is an error that says so", async () => {
  const run = await Deno.makeTempDir();
  try {
    const checkpoint = await addCheckpoint(run, 10);
    await addCheckpoint(run, 20);
    let calls = 0;
    await assert.rejects(
      loadAdapterOnRanks(checkpoint, Replicas.single(), async () => {
        calls++;
        await Deno.remove(checkpoint, { recursive: true });
        throw new Error("read failed");
      }),
      (e: Error) => {
        assert.match(e.message, /checkpoint-10\/adapter: removed while being loaded/);
        assert.match(e.message, /keepLast/);
        return true;
      },
    );
    assert.equal(calls, 1, "a named checkpoint is not swapped for another");
  } finally {
    await Deno.remove(run, { recursive: true });
  }
});

Deno.test("evaluate adapter: a run folder pruned again and again gives up after a few choices", async () => {
  const run = await Deno.makeTempDir();
  try {
    let step = 10;
    await addCheckpoint(run, step);
    let calls = 0;
    await assert.rejects(
      loadAdapterOnRanks(run, Replicas.single(), async (dir) => {
        calls++;
        await addCheckpoint(run, step += 10);
        await Deno.remove(join(dir, ".."), { recursive: true });
        throw new Error("gone");
      }),
      /removed while being loaded \(3 checkpoints in a row\)/,
    );
    assert.equal(calls, 3);
  } finally {
    await Deno.remove(run, { recursive: true });
  }
});

Deno.test("evaluate adapter: an adapter's own load error is passed on, not taken for pruning", async () => {
  const run = await Deno.makeTempDir();
  try {
    await addCheckpoint(run, 10);
    const bad = new Error("adapter_config.json: not valid JSON");
    let calls = 0;
    await assert.rejects(
      loadAdapterOnRanks(run, Replicas.single(), () => {
        calls++;
        return Promise.reject(bad);
      }),
      (e) => e === bad,
    );
    assert.equal(calls, 1);
    assert.equal(await resolveAdapter(run), join(run, "checkpoint-10", ADAPTER_DIR));
    await assert.rejects(
      resolveAdapter(join(run, "nothing")),
      /nothing: does not exist; give an adapter folder \(holding adapter_config\.json\), a checkpoint folder/,
    );
    await Deno.mkdir(join(run, "empty"));
    await assert.rejects(resolveAdapter(join(run, "empty")), /empty: no adapter_config\.json here/);
    const cfgFile = join(run, "checkpoint-10", ADAPTER_DIR, "adapter_config.json");
    assert.equal(await resolveAdapter(cfgFile), join(run, "checkpoint-10", ADAPTER_DIR), "its config file");
    const weights = join(run, "checkpoint-10", "trainer_state.json");
    await Deno.writeTextFile(weights, "{}");
    await assert.rejects(resolveAdapter(weights), /trainer_state\.json: a file; give an adapter folder/);
  } finally {
    await Deno.remove(run, { recursive: true });
  }
});
