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
import { BAD_RECORD_POLICIES, GSM8K_HUB_ID, GSM8K_SPLITS, type Gsm8kSplit } from "../data/gsm8k.ts";
import { DEFAULT_INSTRUCTION } from "../data/prompt.ts";
import type { Device } from "../ffi/mod.ts";
import {
  DEFAULT_RL_CONFIG,
  type MoeRoutingConfig,
  type PpoConfig,
  type RolloutConfig,
} from "../rl/config.ts";
import type { RewardConfig } from "../rl/reward.ts";
import { ATTENTION_CHECK, type AttentionImpl } from "../model/layers.ts";
import { DEFAULT_LORA, LORA_CHECKS, type LoraConfig, loraConflicts } from "../model/lora_apply.ts";
import { bool, type Check, int, nullable, num, oneOf, str, text } from "../model/settings.ts";
import { MOE_CHECKS, PPO_CHECKS, rlConfig, ROLLOUT_CHECKS } from "../rl/config.ts";
import { DEFAULT_HEAD_CHUNK } from "../rl/policy.ts";
import { DEFAULT_POLICY_OPTIMIZER } from "../rl/ppo.ts";
import { DEFAULT_MAX_GRAD_NORM } from "../rl/learn.ts";
import { REWARD_CHECKS } from "../rl/reward.ts";
import { parseSets, parseYaml, type Schema, SettingsSchema, TrainConfigError } from "./config_schema.ts";

export { parseSets, parseYaml, TrainConfigError } from "./config_schema.ts";

/** The model and how it is held in memory. */
export interface ModelSettings {
  /** A Hub repo id ("org/name", "org/name@revision") or a local folder in Hugging Face layout. */
  id: string;
  /** Weight dtype of the frozen base (the LoRA adapters and the value head are float32 whatever it is). */
  dtype: "bfloat16" | "float16" | "float32";
  /** "cuda", "cuda:N" or "cpu". */
  device: Device;
  /** Quantise the frozen base to NF4 (QLoRA): every linear layer and expert bank but the LM head. */
  quantize4bit: boolean;
  /** With quantize4bit: also quantise the NF4 scales (bnb's double quantisation, QLoRA's setting). */
  doubleQuant: boolean;
  /** "auto": libtorch's fused attention (SDPA) where the build has it, else eager; "sdpa" or "eager" to force. */
  attention: AttentionImpl;
}

/** The training problems. */
export interface DataSettings {
  /** A `.jsonl` / `.parquet` file, or a Hub dataset id (data/gsm8k.ts loadGsm8k). */
  source: string;
  /** The split to read from a Hub dataset (and the ids' prefix). */
  split: Gsm8kSplit;
  /** Hub only: the dataset config ("main"; openai/gsm8k also has "socratic"). */
  config: string;
  /** A malformed record is skipped with a warning, or ends the run. */
  onBadRecord: typeof BAD_RECORD_POLICIES[number];
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
  /**
   * Dynamic scaling of the policy's loss (rl/loss_scale.ts): "auto" scales a float16 model's and leaves the
   * others as they are; "dynamic" scales any; "off" none.
   */
  lossScale: "auto" | "dynamic" | "off";
  /** Updates of linear warm-up from lr/warmupUpdates to lr (0: none). */
  warmupUpdates: number;
  /** After warm-up: constant, or cosine decay to minLrRatio·lr at the last update. */
  schedule: "constant" | "cosine";
  /** The cosine schedule's floor, as a fraction of the peak. */
  minLrRatio: number;
  /**
   * Recompute each layer in the backward pass: less memory, for a second forward pass in every step
   * (estimated at about a third more time, a forward being about a third of forward and backward; not
   * measured).
   */
  gradientCheckpointing: boolean;
  /** Tokens per chunk of the LM head's log-softmax and entropy (0: all at once; see PolicyOptions.headChunk). */
  headChunk: number;
}

/** Evaluation on held-out problems: greedy, or sampled (pass@k, maj@k). */
export interface EvalSettings {
  /** Evaluate every N updates during training (0: never; the last update always is unless 0). */
  every: number;
  /** Problems per evaluation during training (null: the whole split). `deno task evaluate` uses --limit. */
  limit: number | null;
  /** A `.jsonl` / `.parquet` file or a Hub dataset id. */
  source: string;
  /** The split. */
  split: Gsm8kSplit;
  /** Prompts per generation batch. */
  batchSize: number;
  /** Token cap (null: rollout.maxNewTokens). */
  maxNewTokens: number | null;
  /** Completions per problem: more than 1 reports pass@k and maj@k (k = samples) and needs temperature > 0. */
  samples: number;
  /** 0: greedy; above 0, completions are sampled at this temperature (seeded from `seed`). */
  temperature: number;
  /** Nucleus mass of sampled completions, in (0, 1]. */
  topP: number;
}

/** Console and sample logging. */
export interface LoggingSettings {
  /** Write sample completions to samples.jsonl every N updates (0: never). */
  sampleEvery: number;
  /** How many completions each time. */
  samplesToLog: number;
  /** Also write each update's metrics as TensorBoard scalars (event files in the run folder). */
  tensorboard: boolean;
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
  /** The adapters (model/lora_apply.ts). */
  lora: Required<LoraConfig>;
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
    attention: "auto",
  },
  lora: { ...DEFAULT_LORA, targetModules: [...DEFAULT_LORA.targetModules] },
  data: {
    source: GSM8K_HUB_ID,
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
    // In configs/default.yaml's order (config.yaml and --print-config follow it).
    learningRate: DEFAULT_POLICY_OPTIMIZER.learningRate,
    valueLearningRate: DEFAULT_POLICY_OPTIMIZER.valueLearningRate,
    betas: [...DEFAULT_POLICY_OPTIMIZER.betas],
    eps: DEFAULT_POLICY_OPTIMIZER.eps,
    weightDecay: DEFAULT_POLICY_OPTIMIZER.weightDecay,
    valueWeightDecay: DEFAULT_POLICY_OPTIMIZER.valueWeightDecay,
    maxGradNorm: DEFAULT_MAX_GRAD_NORM,
    lossScale: "auto",
    warmupUpdates: 20,
    schedule: "constant",
    minLrRatio: 0.1,
    gradientCheckpointing: false,
    headChunk: DEFAULT_HEAD_CHUNK,
  },
  // The RL sections are the library's (rl/config.ts): one set of defaults.
  rollout: { ...DEFAULT_RL_CONFIG.rollout },
  ppo: { ...DEFAULT_RL_CONFIG.ppo },
  reward: { ...DEFAULT_RL_CONFIG.reward, markerMethods: [...DEFAULT_RL_CONFIG.reward.markerMethods] },
  moe: { ...DEFAULT_RL_CONFIG.moe },
  eval: {
    every: 100,
    limit: 500,
    source: GSM8K_HUB_ID,
    split: "test",
    batchSize: 64,
    maxNewTokens: null,
    samples: 1,
    temperature: 0,
    topP: 1,
  },
  logging: { sampleEvery: 10, samplesToLog: 4, tensorboard: false },
  output: { dir: null, checkpointEvery: 50, keepLast: 3 },
});

const isInt = (v: unknown): v is number => typeof v === "number" && Number.isSafeInteger(v);
const device: Check = {
  expected: '"cuda", "cuda:N" or "cpu"',
  ok: (v) => typeof v === "string" && /^(cpu|cuda(:\d+)?)$/.test(v),
};

/** Every key's check: the library's for its sections (LoRA, rollout, ppo, reward, moe), the job's for the rest. */
const SCHEMA: Schema<TrainConfig> = {
  name: {
    expected: 'a folder name (letters, digits, ".", "_", "-")',
    ok: (v) => typeof v === "string" && /^[A-Za-z0-9_][A-Za-z0-9._-]*$/.test(v),
  },
  seed: { expected: "an integer in [0, 2^32)", ok: (v) => isInt(v) && v >= 0 && v < 2 ** 32 },
  model: {
    id: str,
    dtype: oneOf("bfloat16", "float16", "float32"),
    device,
    quantize4bit: bool,
    doubleQuant: bool,
    attention: ATTENTION_CHECK,
  },
  lora: LORA_CHECKS as Schema<TrainConfig["lora"]>,
  data: {
    source: str,
    split: oneOf(...GSM8K_SPLITS),
    config: str,
    onBadRecord: oneOf(...BAD_RECORD_POLICIES),
    instruction: text,
    system: nullable(text),
    limit: nullable(int(1)),
  },
  train: {
    microBatch: int(1),
    gradAccum: int(1),
    updates: int(1),
    learningRate: num(0, Infinity, true),
    valueLearningRate: num(0),
    betas: {
      expected: "two numbers in [0, 1), as [0.9, 0.999]",
      ok: (v) => Array.isArray(v) && v.length === 2 && v.every((b) => num(0, 1).ok(b) && b < 1),
    },
    eps: num(0, Infinity, true),
    weightDecay: num(0),
    valueWeightDecay: num(0),
    maxGradNorm: num(0),
    lossScale: oneOf("auto", "dynamic", "off"),
    warmupUpdates: int(0),
    schedule: oneOf("constant", "cosine"),
    minLrRatio: num(0, 1),
    gradientCheckpointing: bool,
    headChunk: int(0),
  },
  rollout: ROLLOUT_CHECKS,
  ppo: PPO_CHECKS,
  reward: REWARD_CHECKS as Schema<TrainConfig["reward"]>,
  moe: MOE_CHECKS,
  eval: {
    every: int(0),
    limit: nullable(int(1)),
    source: str,
    split: oneOf(...GSM8K_SPLITS),
    batchSize: int(1),
    maxNewTokens: nullable(int(1)),
    samples: int(1),
    temperature: num(0),
    topP: num(0, 1, true),
  },
  logging: { sampleEvery: int(0), samplesToLog: int(0), tensorboard: bool },
  output: { dir: nullable(str), checkpointEvery: int(0), keepLast: nullable(int(1)) },
};

/** Other trainers' names (TRL, PEFT, nanoGPT), folded, for suggestions. */
const ALIASES: Readonly<Record<string, string>> = {
  lr: "train.learningRate",
  learningrate: "train.learningRate",
  maxsteps: "train.updates",
  gradientaccumulationsteps: "train.gradAccum",
  perdevicetrainbatchsize: "train.microBatch",
  batchsize: "train.microBatch",
  warmupsteps: "train.warmupUpdates",
  lrschedulertype: "train.schedule",
  maxgradnorm: "train.maxGradNorm",
  weightdecay: "train.weightDecay",
  numgenerations: "rollout.k",
  maxcompletionlength: "rollout.maxNewTokens",
  numiterations: "ppo.epochs",
  beta: "ppo.klCoef",
  klcoef: "ppo.klCoef",
  epsilon: "ppo.clip",
  epsilonhigh: "ppo.clipHigh",
  clipratioc: "ppo.clipRatioC",
  cliprange: "ppo.clip",
  importancesamplinglevel: "ppo.ratioLevel",
  loraalpha: "lora.alpha",
  lorar: "lora.r",
  loradropout: "lora.dropout",
  modelnameorpath: "model.id",
};

/** Checks that involve several keys. */
function crossChecks(cfg: TrainConfig): string[] {
  const p: string[] = [];
  p.push(...loraConflicts(cfg.lora));
  if (cfg.data.limit !== null && cfg.data.limit < cfg.train.microBatch) {
    p.push(
      `data.limit (${cfg.data.limit}) is below train.microBatch (${cfg.train.microBatch}): no full micro-batch`,
    );
  }
  if (cfg.train.gradientCheckpointing && cfg.lora.dropout > 0) {
    p.push("train.gradientCheckpointing needs lora.dropout 0 (the recomputed pass would draw new masks)");
  }
  if (cfg.train.gradientCheckpointing && cfg.ppo.routerAuxCoef > 0) {
    p.push(
      "ppo.routerAuxCoef > 0 needs router logits, which train.gradientCheckpointing's backward does not keep",
    );
  }
  try {
    rlConfig({ rollout: cfg.rollout, ppo: cfg.ppo, reward: cfg.reward, moe: cfg.moe });
  } catch (e) {
    p.push((e as Error).message);
  }
  const sequences = cfg.train.microBatch * cfg.train.gradAccum * cfg.rollout.k;
  if (sequences % cfg.ppo.minibatches !== 0) {
    p.push(
      `ppo.minibatches (${cfg.ppo.minibatches}) must divide the update's ${sequences} sequences ` +
        "(train.microBatch × train.gradAccum × rollout.k)",
    );
  }
  if (cfg.eval.samples > 1 && cfg.eval.temperature === 0) {
    p.push(
      `eval.samples: ${cfg.eval.samples} greedy completions of a problem are all the same: set eval.temperature > 0`,
    );
  }
  const t = cfg.lora.targetModules;
  if (typeof t === "string" && t !== "all-linear") {
    try {
      new RegExp(t);
    } catch (e) {
      p.push(`lora.targetModules: not a regular expression: ${(e as Error).message}`);
    }
  }
  return p;
}

const SETTINGS = new SettingsSchema<TrainConfig>(SCHEMA, ALIASES, crossChecks);

/**
 * Applies one layer of overrides (a parsed YAML document) to a config.
 * @param where names the source in errors (a file path, "--set")
 * @param crossWhere names the sources of the checks across keys (default: where); null skips them
 * @throws {TrainConfigError} listing every unknown key, bad value and inconsistency
 */
export function applyOverrides(
  base: DeepReadonly<TrainConfig>,
  overrides: unknown,
  where: string,
  crossWhere: string | null = where,
): TrainConfig {
  return SETTINGS.apply(base as TrainConfig, overrides, where, crossWhere);
}

/** The closest known key for a misspelt one among siblings, else in other sections, else another tool's name. */
export function suggestKey(key: string, siblings: readonly string[]): string | null {
  return SETTINGS.suggest(key, siblings);
}

/**
 * For a command line's unknown option `--name`: the `--set` that sets a setting of that name (a key path, a
 * key of any section, or another tool's name for one), or null.
 */
export function setOptionHint(name: string): string | null {
  return setHint(optionSettings(name));
}

/** The settings an unknown option `--name` may mean (a key path, a key of any section, another tool's name). */
export function optionSettings(name: string): string[] {
  const keys = configKeys().includes(name) ? name : suggestKey(name, []);
  return keys ? keys.split(" or ") : [];
}

/** How to set keys from the command line, or null for none. */
export function setHint(keys: readonly string[]): string | null {
  return keys.length
    ? `settings are given as --set key=value: ${keys.map((k) => `--set ${k}=…`).join(" or ")}`
    : null;
}

/** Every leaf key path of the config ("train.learningRate", …). */
export function configKeys(): string[] {
  return SETTINGS.keys();
}

/**
 * The training config: {@link DEFAULTS}, then the YAML file at path (if any),
 * then the `--set` overrides (if any).
 * @throws {TrainConfigError} for an unreadable file, invalid YAML, unknown keys or bad values
 * @example
 * ```ts ignore
 * const cfg = await loadTrainConfig("configs/tiny.yaml", ["train.updates=3"]);
 * console.log(formatConfig(cfg));
 * ```
 */
export async function loadTrainConfig(path?: string, sets: readonly string[] = []): Promise<TrainConfig> {
  let cfg = structuredClone(DEFAULTS) as TrainConfig;
  if (path !== undefined) {
    let text: string;
    try {
      text = await Deno.readTextFile(path);
    } catch (e) {
      throw new TrainConfigError([`${path}: cannot read the config: ${(e as Error).message}`]);
    }
    // Checks across keys wait for the --set layer, which may complete what the file leaves inconsistent.
    cfg = applyOverrides(cfg, parseYaml(text, path), path, sets.length ? null : path);
  }
  if (sets.length) cfg = applyOverrides(cfg, parseSets(sets), "--set", path ? `${path} with --set` : "--set");
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
