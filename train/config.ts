/**
 * The training configuration: every setting has a typed default in code
 * ({@link DEFAULTS}); a YAML file holds overrides only, and `--set a.b=value`
 * on the command line overrides the file (nanoGPT's configurator, without
 * executing anything). Unknown keys, at any depth, and type mismatches are
 * errors that name the file and the full key path, with a suggestion for a
 * misspelt key; the resolved config is printed and saved with each run.
 *
 * Keys are camelCase, as in the interfaces below. Paths inside a config
 * (model folder, data files, output folder) are relative to the working
 * folder, which under `deno task` is the project root.
 * @module
 */
import { stringify } from "yaml";
import { DEFAULT_INSTRUCTION } from "../data/prompt.ts";
import type { Device } from "../ffi/mod.ts";
import {
  DEFAULT_RL_CONFIG,
  type MoeRoutingConfig,
  type PpoConfig,
  type RolloutConfig,
} from "../rl/config.ts";
import type { RewardConfig } from "../rl/reward.ts";
import { applyOverrides, ConfigError, parseSets, parseYaml } from "./config_schema.ts";

export {
  applyOverrides,
  ConfigError,
  configKeys,
  parseSets,
  parseYaml,
  suggestKey,
} from "./config_schema.ts";

/** The model and how it is held in memory. */
export interface ModelSettings {
  /** A Hub repo id ("org/name", "org/name@revision") or a local folder in Hugging Face layout. */
  id: string;
  /** Weight dtype of the frozen base (LoRA adapters take the same dtype; the value head is float32). */
  dtype: "bfloat16" | "float16" | "float32";
  /** "cuda", "cuda:N" or "cpu". */
  device: Device;
  /** Quantise the frozen base to NF4 (QLoRA): every linear layer and expert bank but the LM head. */
  quantize4bit: boolean;
  /** With quantize4bit: also quantise the NF4 scales (bnb's double quantisation, QLoRA's setting). */
  doubleQuant: boolean;
}

/** LoRA adapters (model/lora_apply.ts's LoraConfig). */
export interface LoraSettings {
  /** Rank. */
  r: number;
  /** Scale numerator: the update is (alpha / r)·B·A. */
  alpha: number;
  /** Dropout on the adapter input (must be 0 with gradient checkpointing). */
  dropout: number;
  /** PEFT's target_modules: module-name suffixes, one regular expression, or "all-linear". */
  targetModules: string[] | string;
  /** Adapters on every expert's gate, up and down projections too. */
  targetExperts: boolean;
}

/** The training problems. */
export interface DataSettings {
  /** A `.jsonl` / `.parquet` file, or a Hub dataset id (data/gsm8k.ts loadGsm8k). */
  source: string;
  /** The split to read from a Hub dataset (and the ids' prefix). */
  split: "train" | "test";
  /** Hub only: the dataset config ("main"; openai/gsm8k also has "socratic"). */
  config: string;
  /** A malformed record is skipped with a warning, or ends the run. */
  onBadRecord: "skip" | "error";
  /** Appended to each question (data/prompt.ts); "" for none. */
  instruction: string;
  /** A system message, or null for the chat template's default. */
  system: string | null;
  /** Use only the first N valid problems (null: all). */
  limit: number | null;
}

/** Batch sizes, length of the run, and the optimiser. */
export interface TrainSettings {
  /** Prompts per forward/backward pass of the learn phase (microBatch × rollout.k sequences). */
  microBatch: number;
  /** Micro-batches per update: an update collects microBatch × gradAccum prompts. */
  gradAccum: number;
  /** Optimiser updates in the run. */
  updates: number;
  /** Peak learning rate of the LoRA adapters. */
  learningRate: number;
  /** Peak learning rate of the value head. */
  valueLearningRate: number;
  /** AdamW's (β1, β2), both groups. */
  betas: [number, number];
  /** AdamW's epsilon, both groups. */
  eps: number;
  /** Decoupled weight decay of the adapters. */
  weightDecay: number;
  /** Decoupled weight decay of the value head. */
  valueWeightDecay: number;
  /** Clip each group's gradient (adapters; value head) to this global L2 norm (0: no clipping). */
  maxGradNorm: number;
  /** Updates of linear warm-up from lr/warmupUpdates to lr (0: none). */
  warmupUpdates: number;
  /** After warm-up: constant, or cosine decay to minLrRatio·lr at the last update. */
  schedule: "constant" | "cosine";
  /** The cosine schedule's floor, as a fraction of the peak. */
  minLrRatio: number;
  /** Recompute each layer in the backward pass (less memory, about a third more time). */
  gradientCheckpointing: boolean;
}

/** Greedy evaluation on held-out problems. */
export interface EvalSettings {
  /** Evaluate every N updates during training (0: never; the last update always is unless 0). */
  every: number;
  /** Problems per evaluation during training (null: the whole split). `deno task evaluate` uses --limit. */
  limit: number | null;
  /** A `.jsonl` / `.parquet` file or a Hub dataset id. */
  source: string;
  /** The split. */
  split: "train" | "test";
  /** Prompts per generation batch. */
  batchSize: number;
  /** Token cap (null: rollout.maxNewTokens). */
  maxNewTokens: number | null;
}

/** Console and sample logging. */
export interface LoggingSettings {
  /** Write sample completions to samples.jsonl every N updates (0: never). */
  sampleEvery: number;
  /** How many completions each time. */
  samplesToLog: number;
}

/** Where the run's files go. */
export interface OutputSettings {
  /** The run folder (null: runs/<name>). */
  dir: string | null;
  /** Save a checkpoint every N updates (0: only at the end). */
  checkpointEvery: number;
  /** Keep the newest N checkpoints (null: all). */
  keepLast: number | null;
}

/** The whole training configuration. */
export interface TrainConfig {
  /** The run's name (a folder name: letters, digits, ".", "_", "-"). */
  name: string;
  /** Seeds the data order and every update's sampling (see train/checkpoint.ts). */
  seed: number;
  /** The model. */
  model: ModelSettings;
  /** The adapters. */
  lora: LoraSettings;
  /** The training problems. */
  data: DataSettings;
  /** Batches, run length, optimiser. */
  train: TrainSettings;
  /** Sampling (rl/config.ts). */
  rollout: RolloutConfig;
  /** The objective and the learn phase (rl/config.ts). */
  ppo: PpoConfig;
  /** The reward (rl/reward.ts). */
  reward: RewardConfig;
  /** Mixture-of-experts handling (rl/config.ts). */
  moe: MoeRoutingConfig;
  /** Evaluation. */
  eval: EvalSettings;
  /** Logging. */
  logging: LoggingSettings;
  /** Output. */
  output: OutputSettings;
}

/** A config's nested parts, read-only. */
export type DeepReadonly<T> = T extends (infer U)[] ? readonly DeepReadonly<U>[]
  : T extends object ? { readonly [K in keyof T]: DeepReadonly<T[K]> }
  : T;

/**
 * The defaults: Huihui-MoE-1B-A0.6B-SFT, LoRA r 16 / α 32 on attention, dense
 * MLPs and experts; 4 prompts × 32 micro-batches = 128 prompts per update,
 * k = 4 completions each, 1200 updates. configs/default.yaml restates them
 * with the reasons for each choice.
 */
export const DEFAULTS: DeepReadonly<TrainConfig> = deepFreeze<TrainConfig>({
  name: "huihui-moe-gsm8k",
  seed: 0,
  model: {
    id: "huihui-ai/Huihui-MoE-1B-A0.6B-SFT",
    dtype: "bfloat16",
    device: "cuda",
    quantize4bit: false,
    doubleQuant: true,
  },
  lora: {
    r: 16,
    alpha: 32,
    dropout: 0,
    targetModules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    targetExperts: true,
  },
  data: {
    source: "openai/gsm8k",
    split: "train",
    config: "main",
    onBadRecord: "skip",
    instruction: DEFAULT_INSTRUCTION,
    system: null,
    limit: null,
  },
  train: {
    microBatch: 4,
    gradAccum: 32,
    updates: 1200,
    learningRate: 1e-5,
    valueLearningRate: 5e-5,
    betas: [0.9, 0.999],
    eps: 1e-8,
    weightDecay: 0,
    valueWeightDecay: 0,
    maxGradNorm: 1.0,
    warmupUpdates: 20,
    schedule: "constant",
    minLrRatio: 0.1,
    gradientCheckpointing: false,
  },
  // The RL sections are the library's (rl/config.ts): one set of defaults.
  rollout: { ...DEFAULT_RL_CONFIG.rollout },
  ppo: { ...DEFAULT_RL_CONFIG.ppo },
  reward: { ...DEFAULT_RL_CONFIG.reward, markerMethods: [...DEFAULT_RL_CONFIG.reward.markerMethods] },
  moe: { ...DEFAULT_RL_CONFIG.moe },
  eval: { every: 100, limit: 500, source: "openai/gsm8k", split: "test", batchSize: 64, maxNewTokens: null },
  logging: { sampleEvery: 10, samplesToLog: 4 },
  output: { dir: null, checkpointEvery: 50, keepLast: 3 },
});

/**
 * The config: {@link DEFAULTS}, then the YAML file at path (if any), then the
 * `--set` overrides (if any).
 * @throws {ConfigError} for an unreadable file, invalid YAML, unknown keys or type mismatches
 * @example
 * ```ts ignore
 * const cfg = await loadConfig("configs/tiny.yaml", ["train.updates=3"]);
 * console.log(formatConfig(cfg));
 * ```
 */
export async function loadConfig(path?: string, sets: readonly string[] = []): Promise<TrainConfig> {
  let cfg = structuredClone(DEFAULTS) as TrainConfig;
  if (path !== undefined) {
    let text: string;
    try {
      text = await Deno.readTextFile(path);
    } catch (e) {
      throw new ConfigError([`${path}: cannot read the config: ${(e as Error).message}`]);
    }
    cfg = applyOverrides(cfg, parseYaml(text, path), path);
  }
  if (sets.length) cfg = applyOverrides(cfg, parseSets(sets), "--set");
  return cfg;
}

/** The resolved config's file in a run folder (written by the trainer, read by train/report.ts). */
export const RUN_CONFIG_FILE = "config.yaml";

/** The resolved config as YAML: printed at start, saved as the run's config.yaml (itself a valid config file). */
export function formatConfig(cfg: DeepReadonly<TrainConfig>): string {
  return stringify(cfg, { lineWidth: 0 });
}

/** The run folder: output.dir, or runs/<name>. */
export function runDir(cfg: DeepReadonly<TrainConfig>): string {
  return cfg.output.dir ?? `runs/${cfg.name}`;
}

/** Prompts per optimiser update (microBatch × gradAccum). */
export function promptsPerUpdate(cfg: DeepReadonly<TrainConfig>): number {
  return cfg.train.microBatch * cfg.train.gradAccum;
}

function deepFreeze<T>(v: T): DeepReadonly<T> {
  if (typeof v === "object" && v !== null) {
    for (const x of Object.values(v)) deepFreeze(x);
    Object.freeze(v);
  }
  return v as DeepReadonly<T>;
}
