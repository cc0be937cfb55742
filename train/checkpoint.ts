/**
 * Training checkpoints: `<run>/checkpoint-<step>/` holds
 *
 * - `adapter/`: the LoRA adapters in PEFT's format (model/peft.ts), loadable
 *   by `deno task evaluate --adapter` and by Python's `PeftModel`;
 * - `value_head.safetensors`: the critic;
 * - `optimizer.safetensors`: AdamW's moments and step counts (train/optimizer_state.ts);
 * - `trainer_state.json`: the update count, the random state, the tail of
 *   the metrics and the resolved config.
 *
 * A checkpoint is written into a hidden temporary folder and renamed into
 * place when complete, and `<run>/latest` (the newest checkpoint's name) is
 * replaced atomically after it, so a crash at any point leaves every earlier
 * checkpoint intact and never a half-written one under a checkpoint name.
 *
 * **Exact resume** needs no generator state (the shim does not expose
 * libtorch's): the trainer seeds libtorch at the start of every update with
 * `manualSeed(updateSeed(seed, update))`, so sampling and LoRA dropout in
 * update u depend only on (seed, u) and the weights; the data order is a pure
 * function of (seed, epoch) (data/batches.ts), so the batcher's position is
 * all that is saved. A resumed run therefore draws the same random numbers
 * as an uninterrupted one; on CUDA the arithmetic itself is not bitwise
 * deterministic (atomics in scatter/index_add, cuBLAS), so runs agree in
 * distribution, not bit for bit.
 * @module
 */
import { join } from "node:path";
import type { AdamW } from "../ffi/mod.ts";
import type { BatchPosition } from "../data/batches.ts";
import { epochSeed } from "../data/batches.ts";
import type { MoeConfig } from "../model/config.ts";
import { isDirectory, isFile } from "../model/json.ts";
import type { LoraModel } from "../model/lora_apply.ts";
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS, savePeftAdapter } from "../model/peft.ts";
import { VALUE_HEAD_FILE, type ValueHead } from "../model/value_head.ts";
import { exists, writeAtomic } from "../model/atomic_write.ts";
import { isLossScaleState, type LossScaleState } from "../rl/loss_scale.ts";
import { prepareOptimizerRestore, saveOptimizerState } from "./optimizer_state.ts";
import { prepareAdapterCopy, type PreparedRestore, prepareValueHeadCopy } from "./restore.ts";

/** The adapter's folder inside a checkpoint. */
export const ADAPTER_DIR = "adapter";
/** The optimizer state's file inside a checkpoint. */
export const OPTIMIZER_FILE = "optimizer.safetensors";
/** The trainer state's file inside a checkpoint (written last: its presence marks a complete checkpoint). */
export const TRAINER_STATE_FILE = "trainer_state.json";
/** The file in the run folder naming the newest checkpoint. */
export const LATEST_FILE = "latest";
/** trainer_state.json's format tag. */
export const TRAINER_STATE_FORMAT = "moerl-trainer-state/1";

const NAME_RE = /^checkpoint-(\d+)$/;
const TEMP_RE = /^\.checkpoint-\d+\..+\.(partial|old)$/;

/** What resuming needs to draw the same random numbers (see the module doc). */
export interface RngState {
  /** The run's seed. */
  seed: number;
  /** Updates completed; update u is seeded with updateSeed(seed, u). */
  step: number;
  /** The next micro-batch's position (data/batches.ts). */
  batcherPosition: BatchPosition;
}

/** trainer_state.json. */
export interface TrainerState {
  /** {@link TRAINER_STATE_FORMAT}. */
  format: string;
  /** Updates completed. */
  step: number;
  /** The random state. */
  rng: RngState;
  /** The last metrics records (for a quick look and the console on resume). */
  metricsTail: Record<string, unknown>[];
  /** The model the adapters belong to (PEFT's base_model_name_or_path). */
  baseModel: string;
  /** The resolved training config, to compare on resume (null if not given). */
  config: unknown;
  /** Processes of the data-parallel run that wrote it (absent in older checkpoints: 1). */
  worldSize?: number;
  /** The policy's loss scale, where the run scales it (`train.lossScale`). */
  lossScale?: LossScaleState;
  /** When it was written (ISO 8601). */
  savedAt: string;
}

/** The parts of a policy a checkpoint holds (rl/policy.ts's Policy has them). */
export interface CheckpointPolicy {
  /** The model; its config names the PEFT modules. */
  readonly model: { readonly config: MoeConfig };
  /** The adapters. */
  readonly lora: LoraModel;
  /** The critic. */
  readonly valueHead: ValueHead;
}

/** What {@link saveCheckpoint} writes. */
export interface CheckpointInput {
  /** Adapters and value head. */
  policy: CheckpointPolicy;
  /** Its optimizer. */
  optimizer: AdamW;
  /** Updates completed (the folder is checkpoint-<step>). */
  step: number;
  /** The random state. */
  rng: RngState;
  /** The last metrics records. */
  metricsTail?: Record<string, unknown>[];
  /** The resolved config. */
  config?: unknown;
  /** The base model's id or path. */
  baseModel?: string;
  /** Keep only the newest N checkpoints (default: all). */
  keepLast?: number | null;
  /** Processes of the data-parallel run (default 1). */
  worldSize?: number;
  /** The policy's loss scale, where the run scales it. */
  lossScale?: LossScaleState;
}

/**
 * The seed of update u: seed and u hashed together (and apart from the data
 * order's seeds), an integer in [0, 2^32).
 */
export function updateSeed(seed: number, update: number): number {
  return epochSeed((seed ^ 0x5eed5eed) >>> 0, update);
}

/**
 * Clears what interrupted writes left in a run folder: temporary files of atomic writes
 * (`.<name>.<pid>.<id>.tmp`), half-saved and half-removed checkpoint folders, and checkpoints beyond the
 * newest keepLast (null: all kept; never the one `latest` names). Run by the trainer before it resumes a run, so a run
 * killed at any point, even after its last save, ends tidy.
 */
export async function tidyRunDir(runDir: string, keepLast: number | null): Promise<void> {
  if (!(await isDirectory(runDir))) return;
  for await (const e of Deno.readDir(runDir)) {
    if (TEMP_RE.test(e.name) || (e.isFile && /^\..+\.\d+\.[0-9a-f]{8}\.tmp$/.test(e.name))) {
      await Deno.remove(join(runDir, e.name), { recursive: true }).catch(() => {});
    }
  }
  if (keepLast === null) return;
  const latest = await latestCheckpoint(runDir);
  const all = await listCheckpoints(runDir);
  const old = all.slice(0, Math.max(0, all.length - keepLast)).filter((c) => c.dir !== latest);
  await removeCheckpoints(runDir, old, `${Deno.pid}-tidy`);
}

/** The complete checkpoints of a run, oldest first. */
export async function listCheckpoints(runDir: string): Promise<{ step: number; dir: string }[]> {
  const out: { step: number; dir: string }[] = [];
  if (!(await isDirectory(runDir))) return out;
  for await (const e of Deno.readDir(runDir)) {
    const m = NAME_RE.exec(e.name);
    if (!e.isDirectory || !m) continue;
    const dir = join(runDir, e.name);
    if (await isFile(join(dir, TRAINER_STATE_FILE))) out.push({ step: Number(m[1]), dir });
  }
  return out.sort((a, b) => a.step - b.step);
}

/**
 * The newest checkpoint of a run: the one `latest` names if it is complete,
 * else the complete one with the highest step; null when there is none.
 */
export async function latestCheckpoint(runDir: string): Promise<string | null> {
  try {
    const name = (await Deno.readTextFile(join(runDir, LATEST_FILE))).trim();
    if (NAME_RE.test(name) && (await isFile(join(runDir, name, TRAINER_STATE_FILE)))) {
      return join(runDir, name);
    }
  } catch { /* no pointer: scan */ }
  return (await listCheckpoints(runDir)).at(-1)?.dir ?? null;
}

/**
 * Writes checkpoint-<step> into runDir atomically (see the module doc), then
 * points `latest` at it. Also removes temporary folders left by crashed saves,
 * checkpoints of later steps (left by a run since resumed from an earlier
 * one: their history is being rewritten, as metrics.jsonl's is), and, with
 * keepLast, the oldest checkpoints. One trainer per run folder.
 * @returns the checkpoint's folder
 * @throws {Error} naming the checkpoint when a write fails; earlier checkpoints and `latest` are untouched
 */
export async function saveCheckpoint(runDir: string, input: CheckpointInput): Promise<string> {
  const { policy, optimizer, step } = input;
  if (!(Number.isSafeInteger(step) && step >= 0)) throw new Error(`saveCheckpoint: bad step ${step}`);
  await Deno.mkdir(runDir, { recursive: true });
  for await (const e of Deno.readDir(runDir)) {
    if (TEMP_RE.test(e.name)) await Deno.remove(join(runDir, e.name), { recursive: true }).catch(() => {});
  }
  const name = `checkpoint-${step}`;
  const final = join(runDir, name);
  const tag = `${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  const tmp = join(runDir, `.${name}.${tag}.partial`);
  const state: TrainerState = {
    format: TRAINER_STATE_FORMAT,
    step,
    rng: input.rng,
    metricsTail: input.metricsTail ?? [],
    baseModel: input.baseModel ?? "",
    config: input.config ?? null,
    worldSize: input.worldSize ?? 1,
    ...(input.lossScale ? { lossScale: input.lossScale } : {}),
    savedAt: new Date().toISOString(),
  };
  try {
    await Deno.mkdir(tmp);
    await savePeftAdapter(policy.lora, policy.model.config, join(tmp, ADAPTER_DIR), state.baseModel);
    await policy.valueHead.save(tmp);
    await saveOptimizerState(optimizer, join(tmp, OPTIMIZER_FILE));
    await writeAtomic(join(tmp, TRAINER_STATE_FILE), JSON.stringify(state, null, 2) + "\n");
    if (await exists(final)) {
      const old = join(runDir, `.${name}.${tag}.old`);
      await Deno.rename(final, old);
      await Deno.rename(tmp, final);
      await Deno.remove(old, { recursive: true });
    } else {
      await Deno.rename(tmp, final);
    }
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw new Error(
      `${final}: saving the checkpoint failed (earlier checkpoints are intact): ${(e as Error).message}`,
      {
        cause: e,
      },
    );
  }
  await writeAtomic(join(runDir, LATEST_FILE), `${name}\n`);
  const all = await listCheckpoints(runDir);
  const later = all.filter((c) => c.step > step);
  const kept = all.filter((c) => c.step <= step);
  const old = input.keepLast ? kept.slice(0, Math.max(0, kept.length - input.keepLast)) : [];
  await removeCheckpoints(runDir, [...later, ...old], tag);
  return final;
}

/** Removes checkpoints, each moved out of its name first: a crash mid-removal leaves no half checkpoint. */
async function removeCheckpoints(
  runDir: string,
  gone: readonly { step: number; dir: string }[],
  tag: string,
): Promise<void> {
  for (const c of gone) {
    const old = join(runDir, `.checkpoint-${c.step}.${tag}.old`);
    await Deno.rename(c.dir, old);
    await Deno.remove(old, { recursive: true });
  }
}

/**
 * Reads and checks a checkpoint's trainer_state.json.
 * @throws {Error} naming the file when it is missing or corrupt
 */
export async function readTrainerState(dir: string): Promise<TrainerState> {
  const path = join(dir, TRAINER_STATE_FILE);
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    const hint = (await latestCheckpoint(dir)) ? ` (${dir} is a run folder: use latestCheckpoint())` : "";
    throw new Error(`${path}: cannot read: ${(e as Error).message}${hint}`, { cause: e });
  }
  let s: TrainerState;
  try {
    s = JSON.parse(text);
  } catch (e) {
    throw new Error(`${path}: corrupt (not JSON): ${(e as Error).message}`, { cause: e });
  }
  const r = s?.rng;
  const int = (v: unknown): boolean => Number.isSafeInteger(v) && (v as number) >= 0;
  if (
    s?.format !== TRAINER_STATE_FORMAT || !int(s.step) || !int(r?.seed) || !int(r?.step) ||
    !int(r?.batcherPosition?.epoch) || !int(r?.batcherPosition?.index)
  ) {
    throw new Error(
      `${path}: corrupt or of another format (expected "${TRAINER_STATE_FORMAT}" with step and rng {seed, step, batcherPosition})`,
    );
  }
  const ls = s.lossScale;
  if (ls !== undefined && !isLossScaleState(ls)) {
    throw new Error(
      `${path}: corrupt lossScale ${JSON.stringify(ls)} (expected { scale > 0, goodSteps >= 0 })`,
    );
  }
  return { ...s, metricsTail: Array.isArray(s.metricsTail) ? s.metricsTail : [] };
}

/**
 * Restores a checkpoint into an existing policy and optimizer (built as for
 * the saved run): the adapters' and value head's tensors are copied into
 * place, the optimizer's moments and step counts restored. Every file is
 * opened and checked before anything is changed. Clears gradients.
 * @param dir a checkpoint folder (see {@link latestCheckpoint} for a run's newest)
 * @returns the trainer state (step, random state, metrics tail, config)
 * @throws {Error} naming the file for a missing, corrupt or mismatched part
 */
export async function loadCheckpoint(
  dir: string,
  policy: CheckpointPolicy,
  optimizer: AdamW,
): Promise<TrainerState> {
  const state = await readTrainerState(dir);
  const adapter = join(dir, ADAPTER_DIR);
  for (
    const f of [join(adapter, ADAPTER_CONFIG), join(adapter, ADAPTER_WEIGHTS), join(dir, VALUE_HEAD_FILE)]
  ) {
    if (!(await isFile(f))) throw new Error(`${f}: missing (incomplete checkpoint?)`);
  }
  const prepared: PreparedRestore[] = [];
  try {
    prepared.push(await prepareAdapterCopy(policy.lora, policy.model.config, adapter));
    prepared.push(await prepareValueHeadCopy(policy.valueHead, dir));
    prepared.push(await prepareOptimizerRestore(optimizer, join(dir, OPTIMIZER_FILE)));
    optimizer.zeroGrad();
    for (const p of prepared) await p.apply();
  } finally {
    for (const p of prepared) p.close();
  }
  return state;
}
