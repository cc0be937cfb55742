/**
 * Whether a run folder may be started or resumed with a config, decided
 * before the model loads and before anything is written. A new run needs a
 * folder without a run in it; a resumed run needs the checkpoint's settings:
 * the same world size and the same config, except for the settings below,
 * which change speed, memory, length or bookkeeping, not what an update
 * learns. Anything
 * else changed on resume would silently continue a different run from the
 * old one's weights, optimizer moments and data position.
 * @module
 */
import { join } from "node:path";
import { isFile } from "../model/json.ts";
import { listCheckpoints, TRAINER_STATE_FILE, type TrainerState } from "./checkpoint.ts";
import type { DeepReadonly, TrainConfig } from "./config.ts";
import { METRICS_FILE, readRecords } from "./metrics.ts";

/**
 * Config keys (or sections, ending in ".") a resume may change: the run's length and folder, evaluation,
 * logging, checkpointing, and how decoding, attention, memory and the device are handled.
 */
export const RESUME_MAY_CHANGE: readonly string[] = [
  "name",
  "output.",
  "train.updates", // with a constant schedule (resumeConflicts)
  "train.gradientCheckpointing",
  "train.headChunk",
  "model.device",
  "model.attention",
  "rollout.decode",
  "rollout.decodeDispatch",
  "rollout.generationBatch",
  "eval.",
  "logging.",
];

const mayChange = (key: string): boolean =>
  RESUME_MAY_CHANGE.some((k) => (k.endsWith(".") ? key.startsWith(k) : key === k));

/** Every leaf of a config as dotted key → JSON text (arrays are leaves). */
function leaves(v: unknown, prefix = "", out = new Map<string, string>()): Map<string, string> {
  if (typeof v === "object" && v !== null && !Array.isArray(v)) {
    for (const [k, x] of Object.entries(v)) leaves(x, prefix ? `${prefix}.${k}` : k, out);
  } else out.set(prefix, JSON.stringify(v));
  return out;
}

/**
 * The settings that differ between a checkpoint's config and cfg, other than
 * {@link RESUME_MAY_CHANGE}, as `key: saved → now` lines. Keys only one side
 * has (a config written by another moerl version) are not compared; a
 * checkpoint saved without a config gives none.
 */
export function resumeConflicts(saved: unknown, cfg: DeepReadonly<TrainConfig>): string[] {
  if (saved === null || saved === undefined) return [];
  const before = leaves(saved), now = leaves(cfg);
  const out: string[] = [];
  for (const [key, was] of before) {
    const is = now.get(key);
    if (is !== undefined && is !== was && !mayChange(key)) out.push(`${key}: ${was} → ${is}`);
  }
  // A decaying schedule's learning rates depend on the run's length: there, the length is part of what is learnt.
  const length = before.get("train.updates"), to = now.get("train.updates");
  if (cfg.train.schedule !== "constant" && length !== undefined && length !== to) {
    out.push(
      `train.updates: ${length} → ${to} (the ${cfg.train.schedule} schedule's learning rates depend on it)`,
    );
  }
  return out;
}

/**
 * Throws unless the checkpoint at dir (with its trainer state) can be resumed
 * by a run of worldSize processes with cfg.
 * @throws {Error} naming the checkpoint, with the changed settings or the world sizes
 */
export function checkResumable(
  dir: string,
  state: TrainerState,
  cfg: DeepReadonly<TrainConfig>,
  worldSize: number,
): void {
  const saved = state.worldSize ?? 1;
  if (saved !== worldSize) {
    throw new Error(
      `${dir}: written by a run of ${saved} process${saved === 1 ? "" : "es"}, resumed with ${worldSize}: ` +
        `resume with the same number of processes (--nproc ${saved} or WORLD_SIZE=${saved})`,
    );
  }
  const conflicts = resumeConflicts(state.config, cfg);
  if (conflicts.length) {
    throw new Error(
      `${dir}: the run was trained with other settings:\n  ${conflicts.join("\n  ")}\n` +
        `resume with the run's own config (its config.yaml), changing only ${
          RESUME_MAY_CHANGE.join(", ")
        }; ` +
        "or start a new run (another name or output.dir)",
    );
  }
}

/**
 * Throws when dir already holds a run (a metrics log with lines, or a
 * checkpoint), so that a new run neither mixes its logs with an old one's
 * nor overwrites the old run's config.yaml.
 * @throws {Error} naming the folder and what is in it
 */
export async function checkNewRunDir(dir: string): Promise<void> {
  const found: string[] = [];
  const { records, malformed } = await readRecords(join(dir, METRICS_FILE)); // a missing file reads as empty
  if (records.length + malformed > 0) found.push(`${METRICS_FILE} with ${records.length + malformed} lines`);
  const checkpoints = await listCheckpoints(dir);
  if (checkpoints.length) found.push(`checkpoint-${checkpoints.at(-1)!.step}`);
  if (found.length) {
    throw new Error(
      `${dir} already holds a run (${found.join(", ")}): resume it (--resume) or choose another run folder ` +
        "(name or output.dir)",
    );
  }
}

/**
 * Throws when dir is a checkpoint folder rather than a run folder (a run started or resumed there would nest
 * a run inside a checkpoint).
 */
export async function checkNotCheckpoint(dir: string): Promise<void> {
  if (await isFile(join(dir, TRAINER_STATE_FILE))) {
    throw new Error(`${dir} is a checkpoint folder: the run folder is the one that holds it`);
  }
}

/**
 * What resuming a folder without a checkpoint does: an error when no run was ever started there (a mistyped
 * name should not start a new run), else a notice that the run starts over (its logs reach no checkpoint).
 * `started`: a trainer held the folder before this one (its lock file was there), as when a job is killed
 * while its model loads, before it logs anything; a requeued `--resume` then starts it.
 * @throws {Error} naming the folder when there is nothing to resume
 */
export async function nothingToResume(dir: string, started: boolean): Promise<string> {
  const { records, malformed } = await readRecords(join(dir, METRICS_FILE));
  if (records.length + malformed === 0 && !started) { // as checkNewRunDir counts: a torn first line is a run
    throw new Error(`${dir}: nothing to resume (no checkpoint, no metrics): start the run without --resume`);
  }
  return records.length + malformed === 0
    ? `${dir}: the run started here stopped before its first update: starting it from update 0`
    : `${dir} has no checkpoint yet: starting over from update 0 (its ${records.length} logged updates are dropped)`;
}

/** The lock file inside a run folder, held (flock) by the one trainer writing it. */
export const RUN_LOCK_FILE = ".lock";

/**
 * Takes the run folder's writer lock (an exclusive flock on `<dir>/.lock`, released by the kernel when the
 * process ends, however it ends). Creates the folder if needed.
 * @returns the locked file (close it to release), whether this call created the folder, and whether the lock
 * file was there before (a trainer has held this folder)
 * @throws {Error} naming the folder and the holder when another process holds the lock
 */
export async function lockRunDir(
  dir: string,
): Promise<{ file: Deno.FsFile | null; created: boolean; lockedBefore: boolean }> {
  const created = !(await Deno.stat(dir).then(() => true, () => false));
  await Deno.mkdir(dir, { recursive: true });
  const path = join(dir, RUN_LOCK_FILE);
  const lockedBefore = await isFile(path);
  const file = await Deno.open(path, { read: true, write: true, create: true });
  let locked: boolean;
  try {
    locked = await file.tryLock(true);
  } catch (e) { // a file system without flock (some Lustre and NFS mounts): train as before, unguarded
    file.close();
    console.warn(
      `train: ${path}: cannot lock here (${(e as Error).message}); one trainer per folder is unchecked`,
    );
    return { file: null, created, lockedBefore };
  }
  if (!locked) {
    file.close();
    const holder = (await Deno.readTextFile(path).catch(() => "")).trim();
    throw new Error(
      `${dir} is being written by another trainer${
        holder ? ` (${holder})` : ""
      }: one trainer per run folder ` +
        "(wait for it or stop it, then --resume)",
    );
  }
  try {
    await file.truncate(0);
    await file.write(new TextEncoder().encode(`pid ${Deno.pid}${hostName()}\n`));
  } catch (e) {
    file.close(); // releases the lock, which nothing would otherwise close
    throw new Error(`${path}: ${(e as Error).message}`, { cause: e });
  }
  return { file, created, lockedBefore };
}

/** " on <host>" where the program may read it without a prompt, else "" (the pid alone). */
function hostName(): string {
  const allowed = Deno.permissions.querySync({ name: "sys", kind: "hostname" }).state === "granted";
  return allowed ? ` on ${Deno.hostname()}` : "";
}
