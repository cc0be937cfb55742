/**
 * Checking a config against its schema: every known key with its expected
 * type, unknown keys reported with a suggestion, overrides merged onto a
 * base config. train/config.ts re-exports what is public here.
 * @module
 */
import { parse } from "yaml";
import { ADVANTAGE_ESTIMATORS } from "../rl/advantages.ts";
import { EXTRACT_METHODS } from "../data/answer.ts";
import { rlConfig } from "../rl/config.ts";
import type { DeepReadonly, TrainConfig } from "./config.ts";

// ---------------------------------------------------------------------------------------------
// The schema: one check per key; its keys are the known keys.

/** One leaf's check: what it expects, in words, and whether a value is that. */
interface Check {
  expected: string;
  ok(v: unknown): boolean;
}

/** A check for every leaf of T; nested objects are nested schemas (checked by the compiler). */
type Schema<T> = {
  [K in keyof T]-?: T[K] extends readonly unknown[] | string | number | boolean | null ? Check : Schema<T[K]>;
};

const isInt = (v: unknown): v is number => typeof v === "number" && Number.isSafeInteger(v);
const isNum = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);
const int = (min: number): Check => ({ expected: `an integer ≥ ${min}`, ok: (v) => isInt(v) && v >= min });
const num = (min: number, max = Infinity, open = false): Check => ({
  expected: max === Infinity
    ? `a number ${open ? ">" : "≥"} ${min}`
    : `a number in ${open ? "(" : "["}${min}, ${max}]`,
  ok: (v) => isNum(v) && (open ? v > min : v >= min) && v <= max,
});
const anyNum: Check = { expected: "a number", ok: isNum };
const bool: Check = { expected: "true or false", ok: (v) => typeof v === "boolean" };
const str: Check = { expected: "a non-empty string", ok: (v) => typeof v === "string" && v !== "" };
const text: Check = { expected: "a string", ok: (v) => typeof v === "string" };
const oneOf = (...values: string[]): Check => ({
  expected: `one of ${values.map((s) => JSON.stringify(s)).join(", ")}`,
  ok: (v) => typeof v === "string" && values.includes(v),
});
const nullable = (c: Check): Check => ({
  expected: `${c.expected}, or null`,
  ok: (v) => v === null || c.ok(v),
});
const device: Check = {
  expected: '"cuda", "cuda:N" or "cpu"',
  ok: (v) => typeof v === "string" && /^(cpu|cuda(:\d+)?)$/.test(v),
};

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
  },
  lora: {
    r: int(1),
    alpha: num(0, Infinity, true),
    dropout: { expected: "a number in [0, 1)", ok: (v) => isNum(v) && v >= 0 && v < 1 },
    targetModules: {
      expected: 'a non-empty list of module names, or one string (a regular expression or "all-linear")',
      ok: (v) =>
        (typeof v === "string" && v !== "") ||
        (Array.isArray(v) && v.length > 0 && v.every((s) => typeof s === "string" && s !== "")),
    },
    targetExperts: bool,
  },
  data: {
    source: str,
    split: oneOf("train", "test"),
    config: str,
    onBadRecord: oneOf("skip", "error"),
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
      ok: (v) => Array.isArray(v) && v.length === 2 && v.every((b) => isNum(b) && b >= 0 && b < 1),
    },
    eps: num(0, Infinity, true),
    weightDecay: num(0),
    valueWeightDecay: num(0),
    maxGradNorm: num(0),
    warmupUpdates: int(0),
    schedule: oneOf("constant", "cosine"),
    minLrRatio: num(0, 1),
    gradientCheckpointing: bool,
  },
  rollout: {
    k: int(1),
    maxNewTokens: int(1),
    temperature: num(0, Infinity, true),
    topP: num(0, 1, true),
    topK: int(0),
    generationBatch: nullable(int(1)),
  },
  ppo: {
    epochs: int(1),
    minibatches: int(1),
    clip: num(0, Infinity, true),
    clipHigh: nullable(num(0, Infinity, true)),
    ratioLevel: oneOf("token", "sequence"),
    klCoef: num(0),
    klEstimator: {
      expected: '"k2" or "k3" (k1\'s expected gradient is zero: it is only logged, as kl_k1)',
      ok: (v) => v === "k2" || v === "k3",
    },
    entropyCoef: num(0),
    advantage: oneOf(...ADVANTAGE_ESTIMATORS),
    gaeLambda: num(0, 1),
    normalizeAdvantages: bool,
    rolloutCorrection: nullable(num(1)),
    routerAuxCoef: num(0),
  },
  reward: {
    correct: anyNum,
    wrong: anyNum,
    markerBonus: anyNum,
    overLengthPenalty: anyNum,
    maxCompletionTokens: nullable(int(1)),
    mode: oneOf("strict", "flexible"),
    markerMethods: {
      expected: `a list of ${EXTRACT_METHODS.map((m) => JSON.stringify(m)).join(", ")}`,
      ok: (v) => Array.isArray(v) && v.every((m) => EXTRACT_METHODS.includes(m)),
    },
  },
  moe: { routingReplay: oneOf("off", "rollout") },
  eval: {
    every: int(0),
    limit: nullable(int(1)),
    source: str,
    split: oneOf("train", "test"),
    batchSize: int(1),
    maxNewTokens: nullable(int(1)),
  },
  logging: { sampleEvery: int(0), samplesToLog: int(0) },
  output: { dir: nullable(str), checkpointEvery: int(0), keepLast: nullable(int(1)) },
};

// ---------------------------------------------------------------------------------------------
// Errors and suggestions

/** A bad config: its message lists every problem, one a line, each naming the file and the key. */
export class ConfigError extends Error {
  /** The problems, one string each. */
  readonly problems: string[];
  /** Wraps problems into one error. */
  constructor(problems: string[]) {
    super(
      problems.length === 1 ? problems[0] : `${problems.length} config errors:\n  ${problems.join("\n  ")}`,
    );
    this.name = "ConfigError";
    this.problems = problems;
  }
}

const isCheck = (node: unknown): node is Check =>
  typeof node === "object" && node !== null && typeof (node as Check).ok === "function";
const isMapping = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);

/** Levenshtein distance. */
function distance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length]!;
}

/** Case, "_" and "-" do not count: learning_rate ≈ learningRate. */
const fold = (s: string): string => s.toLowerCase().replace(/[_-]/g, "");

/** Every leaf path of the schema. */
function leafPaths(node: Record<string, unknown> = SCHEMA, prefix = ""): string[] {
  return Object.entries(node).flatMap(([k, v]) =>
    isCheck(v) ? [`${prefix}${k}`] : leafPaths(v as Record<string, unknown>, `${prefix}${k}.`)
  );
}

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
  beta: "ppo.klCoef",
  klcoef: "ppo.klCoef",
  epsilon: "ppo.clip",
  cliprange: "ppo.clip",
  loraalpha: "lora.alpha",
  lorar: "lora.r",
  loradropout: "lora.dropout",
  modelnameorpath: "model.id",
};

/**
 * The closest known key for a misspelt one: a sibling within a small edit
 * distance (case, "_" and "-" ignored), else a key of that name in other
 * sections (full paths), else another trainer's name for a setting; null
 * when nothing is close.
 */
export function suggestKey(key: string, siblings: readonly string[]): string | null {
  const k = fold(key);
  let best: string | null = null, bestD = Infinity, ties = 0;
  for (const c of siblings) {
    const d = distance(k, fold(c));
    if (d < bestD) [best, bestD, ties] = [c, d, 0];
    else if (d === bestD) ties++;
  }
  if (best !== null && ties === 0 && bestD <= Math.max(1, Math.floor(k.length / 4))) return best;
  const same = leafPaths().filter((p) => fold(p.slice(p.lastIndexOf(".") + 1)) === k);
  if (same.length) return same.join(" or ");
  return ALIASES[k] ?? null;
}

/** A value and its type, for "got …". */
function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return `${JSON.stringify(v).slice(0, 60)} (a list)`;
  if (isMapping(v)) return "a mapping";
  return `${JSON.stringify(v).slice(0, 60)} (a ${typeof v})`;
}

// ---------------------------------------------------------------------------------------------
// Merging

/**
 * Overrides merged into base (a copy): mappings merge key by key, every
 * other value (lists included) replaces. Every problem is collected.
 */
function merge(
  base: Record<string, unknown>,
  over: Record<string, unknown>,
  schema: Record<string, unknown>,
  where: string,
  path: string,
  problems: string[],
): Record<string, unknown> {
  const out = { ...base };
  for (const [key, value] of Object.entries(over)) {
    const full = `${path}${key}`;
    const node = Object.hasOwn(schema, key) ? schema[key] : undefined;
    if (node === undefined) {
      const hint = suggestKey(key, Object.keys(schema));
      problems.push(`${where}: unknown key ${full}${hint ? ` (did you mean ${hint}?)` : ""}`);
    } else if (isCheck(node)) {
      if (node.ok(value)) out[key] = Array.isArray(value) ? [...value] : value;
      else problems.push(`${where}: ${full}: expected ${node.expected}, got ${describe(value)}`);
    } else if (!isMapping(value)) {
      problems.push(
        `${where}: ${full} is a section (keys ${Object.keys(node as object).join(", ")}), got ${
          describe(value)
        }`,
      );
    } else {
      out[key] = merge(
        base[key] as Record<string, unknown>,
        value,
        node as Record<string, unknown>,
        where,
        `${full}.`,
        problems,
      );
    }
  }
  return out;
}

/** Checks that involve several keys; returns the problems. */
function crossChecks(cfg: TrainConfig, where: string): string[] {
  const p: string[] = [];
  if (cfg.train.gradientCheckpointing && cfg.lora.dropout > 0) {
    p.push(
      `${where}: train.gradientCheckpointing needs lora.dropout 0 (the recomputed pass would draw new masks)`,
    );
  }
  try {
    rlConfig({ rollout: cfg.rollout, ppo: cfg.ppo, reward: cfg.reward, moe: cfg.moe });
  } catch (e) {
    p.push(`${where}: ${(e as Error).message}`);
  }
  const sequences = cfg.train.microBatch * cfg.train.gradAccum * cfg.rollout.k;
  if (sequences % cfg.ppo.minibatches !== 0) {
    p.push(
      `${where}: ppo.minibatches (${cfg.ppo.minibatches}) must divide the update's ${sequences} sequences ` +
        "(train.microBatch × train.gradAccum × rollout.k)",
    );
  }
  const t = cfg.lora.targetModules;
  if (typeof t === "string" && t !== "all-linear") {
    try {
      new RegExp(t);
    } catch (e) {
      p.push(`${where}: lora.targetModules: not a regular expression: ${(e as Error).message}`);
    }
  }
  return p;
}

/**
 * Applies one layer of overrides (a parsed YAML document) to a config.
 * @param where names the source in errors (a file path, "--set")
 * @throws {ConfigError} listing every unknown key, type mismatch and inconsistency
 */
export function applyOverrides(
  base: DeepReadonly<TrainConfig>,
  overrides: unknown,
  where: string,
): TrainConfig {
  if (overrides === null || overrides === undefined) return structuredClone(base) as TrainConfig;
  if (!isMapping(overrides)) {
    throw new ConfigError([
      `${where}: expected a mapping of settings at the top, got ${describe(overrides)}`,
    ]);
  }
  const problems: string[] = [];
  const cfg = merge(
    structuredClone(base) as unknown as Record<string, unknown>,
    overrides,
    SCHEMA,
    where,
    "",
    problems,
  ) as unknown as TrainConfig;
  if (problems.length === 0) problems.push(...crossChecks(cfg, where));
  if (problems.length) throw new ConfigError(problems);
  return cfg;
}

/**
 * Parses `--set` arguments ("a.b=value", the value read as a YAML scalar or
 * flow list: `train.learningRate=2e-5`, `lora.targetModules=[q_proj, v_proj]`,
 * `data.system=null`) into one overrides mapping. A value that YAML would read
 * as a mapping ("a: b") is taken as the plain string.
 * @throws {ConfigError} for an argument without "=" or with an empty key
 */
export function parseSets(sets: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const problems: string[] = [];
  for (const s of sets) {
    const eq = s.indexOf("=");
    const path = eq < 0 ? [] : s.slice(0, eq).trim().split(".");
    if (eq < 0 || path.some((k) => k === "")) {
      problems.push(`--set ${s}: expected key.path=value`);
      continue;
    }
    const raw = s.slice(eq + 1);
    let value: unknown;
    try {
      value = parse(raw);
    } catch {
      value = raw;
    }
    if (isMapping(value)) value = raw;
    let node = out;
    for (const k of path.slice(0, -1)) {
      if (!isMapping(node[k])) node[k] = {};
      node = node[k] as Record<string, unknown>;
    }
    node[path.at(-1)!] = value;
  }
  if (problems.length) throw new ConfigError(problems);
  return out;
}

/**
 * Parses YAML text into overrides.
 * @throws {ConfigError} naming where and the line for a YAML syntax error (duplicate keys included)
 */
export function parseYaml(text: string, where: string): unknown {
  try {
    return parse(text);
  } catch (e) {
    const msg = (e as Error).message.split("\n")[0];
    throw new ConfigError([`${where}: invalid YAML: ${msg}`]);
  }
}

/** Every leaf key path of the config ("train.learningRate", …). */
export function configKeys(): string[] {
  return leafPaths();
}
