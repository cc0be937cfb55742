/**
 * Which adapter an evaluation loads, when its folder may change under it: `--adapter runs/<name>` takes the
 * run's newest checkpoint while that run may still be training, and its `output.keepLast` may
 * remove the checkpoint between finding it and reading it. Rank 0 chooses, so every rank of a data-parallel
 * evaluation loads the same checkpoint; a checkpoint removed while loading is chosen again (a run folder)
 * or named in the error (a checkpoint or adapter folder, which nothing else can stand for).
 * @module
 */
import { basename, dirname, join } from "node:path";
import { isDirectory, isFile } from "../model/json.ts";
import { ADAPTER_CONFIG } from "../model/peft.ts";
import type { Replicas } from "../rl/replicas.ts";
import { ADAPTER_DIR, latestCheckpoint } from "../train/checkpoint.ts";
import { loadTrainConfig, RUN_CONFIG_FILE, type TrainConfig } from "../train/config.ts";

/** The PEFT folder an --adapter argument names: itself, its `adapter/`, or its newest checkpoint's. */
export async function resolveAdapter(path: string): Promise<string> {
  if (!(await isDirectory(path))) { // said plainly, rather than as a stat error inside it
    if (basename(path) === ADAPTER_CONFIG && await isFile(path)) return dirname(path); // its file, meant as it
    throw new Error(
      `${path}: ${await isFile(path) ? "a file" : "does not exist"}; give an adapter folder (holding ` +
        `${ADAPTER_CONFIG}), a checkpoint folder or a run folder`,
    );
  }
  if (await isFile(join(path, ADAPTER_CONFIG))) return path;
  if (await isFile(join(path, ADAPTER_DIR, ADAPTER_CONFIG))) return join(path, ADAPTER_DIR);
  const latest = await latestCheckpoint(path);
  if (latest) return join(latest, ADAPTER_DIR);
  throw new Error(
    `${path}: no ${ADAPTER_CONFIG} here, in ${ADAPTER_DIR}/, or in a checkpoint of this run folder`,
  );
}

/**
 * The config of the run an --adapter argument's checkpoint belongs to (`<run>/config.yaml`, as training wrote
 * it): the model, dtype, prompt and token cap the adapter was trained with. Null for an adapter that is no
 * checkpoint's, a run without that file, or a path that names no adapter (the evaluation says why).
 */
async function adapterRunConfig(path: string): Promise<string | null> {
  const dir = await resolveAdapter(path).catch(() => null);
  const checkpoint = dir === null ? null : checkpointOf(dir);
  if (checkpoint === null) return null;
  const file = join(dirname(checkpoint), RUN_CONFIG_FILE);
  return (await isFile(file)) ? file : null;
}

/**
 * The config a command uses an adapter with: `config` (--config), else the run's own config.yaml for a
 * checkpoint's adapter, else the defaults; `sets` (--set) over it. `from` says which, for the user.
 * @throws {TrainConfigError} for a bad config or --set; {@link Error} when the file cannot be read
 */
export async function adapterConfig(
  config: string | undefined,
  adapter: string | undefined,
  sets: readonly string[],
): Promise<{ cfg: TrainConfig; from: string; runConfig: string | null }> {
  const runConfig = config === undefined && adapter !== undefined ? await adapterRunConfig(adapter) : null;
  const cfg = await loadTrainConfig(runConfig ?? config, [...sets]);
  const from = config ?? (runConfig ? `${runConfig} (the adapter's run)` : "the defaults");
  return { cfg, from, runConfig };
}

/** The checkpoint folder (`<run>/checkpoint-N`) an adapter folder is the `adapter/` of, or null. */
export function checkpointOf(adapterDir: string): string | null {
  const checkpoint = dirname(adapterDir);
  return basename(adapterDir) === ADAPTER_DIR && /^checkpoint-\d+$/.test(basename(checkpoint))
    ? checkpoint
    : null;
}

/** How many times a run folder's newest checkpoint is chosen again after it was removed while loading. */
export const ADAPTER_ATTEMPTS = 3;

/**
 * Loads the adapter `path` names (see {@link resolveAdapter}) with `load`, the same folder on every rank.
 * @returns the folder loaded and what `load` returned
 * @throws {Error} the rank's own load error; or, when the folder was removed while loading, one naming it
 *   (after {@link ADAPTER_ATTEMPTS} choices for a run folder)
 */
export async function loadAdapterOnRanks<T extends { dispose(): void }>(
  path: string,
  dp: Replicas,
  load: (dir: string) => Promise<T>,
): Promise<{ dir: string; adapter: T }> {
  for (let attempt = 1;; attempt++) {
    // All take rank 0's choice (ranks choosing apart could straddle a new checkpoint and mix two in one
    // result), or its error: a rank that threw alone would leave the others waiting in the next collective.
    let own: unknown = null;
    const mine = await resolveAdapter(path).then(
      (d) => `ok ${d}`,
      (e) => (own = e, `error ${(e as Error).message}`),
    );
    const first = dp.gatherText(mine)[0]!;
    if (first.startsWith("error ")) throw dp.rank === 0 ? own : new Error(first.slice("error ".length));
    const dir = first.slice("ok ".length);
    let adapter: T | null = null, error: unknown = null;
    try {
      adapter = await load(dir);
    } catch (e) {
      error = e;
    }
    const state = error === null ? "ok" : (await isFile(join(dir, ADAPTER_CONFIG))) ? "failed" : "removed";
    const states = dp.gatherText(state);
    if (states.every((s) => s === "ok")) return { dir, adapter: adapter! };
    adapter?.dispose();
    if (error !== null && state === "failed") throw error;
    const failed = states.indexOf("failed");
    if (failed >= 0) throw new Error(`${dir}: rank ${failed} could not load this adapter (its log says why)`);
    const fromRun = dir !== path && dir !== join(path, ADAPTER_DIR);
    if (!fromRun || attempt === ADAPTER_ATTEMPTS) {
      throw new Error(
        `${dir}: removed while being loaded${attempt > 1 ? ` (${attempt} checkpoints in a row)` : ""}; ` +
          `a training run's output.keepLast prunes its older checkpoints. Evaluate one that is kept, ` +
          `or the run folder (its newest checkpoint)`,
        { cause: error },
      );
    }
  }
}
