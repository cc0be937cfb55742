/**
 * 0-shot GSM8K accuracy of a model, with or without a trained adapter, greedy or sampled:
 *
 * ```sh
 * deno task evaluate [--config configs/default.yaml] [--adapter runs/<name>/checkpoint-N] [--limit N]
 *                    [--split test] [--out DIR] [--set key.path=value ...] [--nproc N]
 * ```
 *
 * The model, dtype, device, 4-bit setting, prompt (instruction, system) and
 * token cap come from the config (eval.maxNewTokens, else rollout's): --config,
 * else the run's own config.yaml for a checkpoint's adapter, else the defaults; the
 * problems from eval.source and --split (default eval.split), all of them
 * unless --limit. `--adapter` takes a PEFT adapter folder, a checkpoint
 * folder (its `adapter/`), or a run folder (its newest checkpoint).
 * Completions are scored as `deno task score` does (eval/score.ts, data/answer.ts):
 * strict (`#### n` only) and flexible (`####`, a final-answer phrase, `\boxed`,
 * else the last number). With `eval.samples` > 1 (and `eval.temperature` > 0)
 * each problem gets that many sampled completions, and the summary adds pass@k
 * and maj@k to the mean accuracy.
 *
 * Writes, each atomically, into --out (default `<run>/eval/<checkpoint, "base" or
 * the adapter's folder>-<split>/`, the run being the adapter's own when it is a checkpoint's, else the config's;
 * sampled: `…-<split>-t<temperature>[-p<topP>]-n<samples>/`):
 * `predictions.jsonl`, one line per completion, and
 * `summary.json`, also printed. Relative paths on the command line are taken
 * from the folder the command was started in (`INIT_CWD` under `deno task`);
 * paths inside the config from the project root. Exit status: 0, 1 on an
 * error while running, 2 for bad arguments or a bad config.
 *
 * The evaluation itself is rl/evaluate.ts's `evaluateExamples`, which the
 * training loop runs too. Data parallel as `deno task train` (train/launch.ts and train/spawn.ts:
 * `--nproc N`, or one rank per process under torchrun): rank r takes every
 * W-th problem from r, and rank 0 gathers the predictions and writes.
 * @module
 */
import { basename, dirname, join } from "node:path";
import { failureText, fromStartDir, nprocOption, numberOption, parseCommandLine } from "../train/cli.ts";
import { type Device, useAvailableCores } from "../ffi/mod.ts";
import { GSM8K_SPLITS, type Gsm8kSplit } from "../data/gsm8k.ts";
import { writeAtomic } from "../model/atomic_write.ts";
import { isFile } from "../model/json.ts";
import { loadPeftAdapter } from "../model/peft.ts";
import { resolveModel } from "../model/hub.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { type EvalTotals, evaluateExamples, type Prediction } from "../rl/evaluate.ts";
import { Replicas } from "../rl/replicas.ts";
import {
  checkSameConfig,
  distTimeoutSeconds,
  fetchFirst,
  joinReplicas,
  launchEnv,
  onSomeRanks,
  rankDevice,
} from "../train/launch.ts";
import { exitWithLauncher, spawnLocal, withoutNproc } from "../train/spawn.ts";
import { evalTotalsOverRanks } from "../train/rank_metrics.ts";
import { ADAPTER_DIR } from "../train/checkpoint.ts";
import { adapterConfig, checkpointOf, loadAdapterOnRanks, resolveAdapter } from "./adapter.ts";
import { formatConfig, runDir, setOptionHint, type TrainConfig, TrainConfigError } from "../train/config.ts";
import {
  configuredEvaluation,
  dataWarnings,
  loadConfiguredData,
  loadConfiguredModel,
  rankShare,
} from "../train/model.ts";

/** summary.json. */
export interface EvalSummary extends EvalTotals {
  /** The config's run name. */
  run: string;
  /** The model id or folder. */
  model: string;
  /** The adapter folder, or null for the base model. */
  adapter: string | null;
  /** The problems' source and split. */
  source: string;
  /** The split. */
  split: Gsm8kSplit;
  /** --limit, or null for all. */
  limit: number | null;
  /** Malformed records skipped while loading. */
  skipped_records: number;
  /** Token cap. */
  max_new_tokens: number;
  /** Sampling temperature (0: greedy). */
  temperature: number;
  /** Nucleus mass of sampled completions (1 when greedy). */
  top_p: number;
  /** Generation batch size. */
  batch_size: number;
  /** Device and dtype. */
  device: string;
  /** The weights' dtype (and "nf4" when quantised). */
  dtype: string;
  /** When the evaluation finished (ISO 8601). */
  finished_at: string;
}

/**
 * Where an evaluation goes by default: a checkpoint's adapter into its own run folder
 * (`<run>/eval/checkpoint-N-<split>`), whatever the config's name; the base model or a standalone adapter into
 * the config's run folder (`<run>/eval/base-<split>`, `<run>/eval/<adapter folder>-<split>`).
 */
function defaultOutput(cfg: TrainConfig, adapterDir: string | null, split: string): string {
  // Sampled results go beside the greedy ones, not over them, nor over those sampled otherwise.
  const { temperature, topP, samples } = cfg.eval;
  const tail = temperature > 0 ? `${split}-t${temperature}${topP < 1 ? `-p${topP}` : ""}-n${samples}` : split;
  if (adapterDir === null) return join(runDir(cfg), "eval", `base-${tail}`);
  const checkpoint = checkpointOf(adapterDir);
  if (checkpoint !== null) return join(dirname(checkpoint), "eval", `${basename(checkpoint)}-${tail}`);
  const label = basename(adapterDir) === ADAPTER_DIR ? basename(dirname(adapterDir)) : basename(adapterDir);
  return join(runDir(cfg), "eval", `${label}-${tail}`);
}

/** Options of {@link runEvaluation}. */
export interface RunEvaluationOptions {
  /** A PEFT adapter, checkpoint or run folder. */
  adapter?: string;
  /** Evaluate the first N problems only. */
  limit?: number;
  /** The split (default eval.split). */
  split?: Gsm8kSplit;
  /** The output folder (default `<run>/eval/<label>-<split>`). */
  out?: string;
  /** Progress lines (default console.log). */
  log?: (line: string) => void;
  /** The ranks of a data-parallel evaluation (default: one process). */
  replicas?: Replicas;
  /** This rank's device, when it differs from the config's (e.g. `cuda:LOCAL_RANK`). */
  device?: Device;
  /** This rank's LOCAL_RANK (default: its rank): local rank 0 downloads for its machine. */
  localRank?: number;
}

/** Makes the output folder on rank 0 and writes a probe there; every rank throws if that fails. */
async function checkWritable(dir: string, dp: Replicas): Promise<void> {
  const probe = async (): Promise<void> => {
    try {
      await Deno.mkdir(dir, { recursive: true });
      await Deno.remove(await Deno.makeTempFile({ dir, prefix: ".probe-" }));
    } catch (e) {
      throw new Error(`${dir}: cannot write the results there: ${(e as Error).message}`, { cause: e });
    }
  };
  await onSomeRanks(
    dp,
    dp.rank === 0 ? probe : null,
    `${dir}: rank 0 cannot write the results there (its error says why)`,
  );
}

/** Loads what the config names, evaluates, and writes predictions.jsonl and summary.json. */
export async function runEvaluation(
  cfg: TrainConfig,
  opts: RunEvaluationOptions = {},
): Promise<{ summary: EvalSummary; dir: string }> {
  const dp = opts.replicas ?? Replicas.single();
  const log = dp.rank === 0 ? opts.log ?? console.log : () => {};
  const split = opts.split ?? cfg.eval.split;
  checkSameConfig(dp, JSON.stringify([cfg, opts.limit, opts.split])); // what decides the problems and answers
  if (dp.rank === 0) {
    for (const w of dataWarnings(cfg, { training: false, evalSplit: split })) console.warn(`data: ${w}`);
  }
  const adapter = opts.adapter;
  if (adapter !== undefined) { // a mistyped --adapter is said before the model is downloaded and loaded
    await onSomeRanks(dp, () => resolveAdapter(adapter), `${adapter}: another rank found no adapter there`);
  }
  // One rank per machine downloads; the others then find the files cached (train/launch.ts fetchFirst).
  await fetchFirst(dp, opts.localRank ?? dp.rank, async () => {
    await resolveModel(cfg.model.id);
    await loadConfiguredData(cfg, "eval", split);
  });
  const data = await loadConfiguredData(cfg, "eval", split, opts.limit);
  for (const s of data.skipped) log(`skipped record at line ${s.line}: ${s.reason}`);
  if (data.examples.length === 0) throw new Error(`${cfg.eval.source} (${split}): no problems to evaluate`);
  log(
    `loading ${cfg.model.id} (${cfg.model.dtype}, ${cfg.model.device}${
      cfg.model.quantize4bit ? ", NF4" : ""
    })`,
  );
  using model = await loadConfiguredModel({ ...cfg.model, device: opts.device ?? cfg.model.device });
  const loaded = opts.adapter === undefined
    ? null
    : await loadAdapterOnRanks(opts.adapter, dp, (d) => loadPeftAdapter(d, model));
  const adapterDir = loaded?.dir ?? null, lora = loaded?.adapter ?? null;
  try {
    if (lora) log(`adapter ${adapterDir}: ${lora.trainableCount().toLocaleString("en-US")} parameters`);
    const dir = opts.out ?? defaultOutput(cfg, adapterDir, split);
    await checkWritable(dir, dp); // before the evaluation, whose results would be lost
    if (await isFile(join(dir, "summary.json"))) log(`replacing the earlier results in ${dir}`);
    const tok = await Tokenizer.load(model.dir);
    const pct = (x: number): string => `${(100 * x).toFixed(1)}%`;
    const mine = rankShare(data.examples.length, dp);
    const k = cfg.eval.samples;
    const atK = (r: EvalTotals): string =>
      k > 1
        ? `; pass@${k} ${pct(r.pass_at_k_strict)} / ${pct(r.pass_at_k_flexible)}, maj@${k} ${
          pct(r.maj_at_k_strict)
        } / ${pct(r.maj_at_k_flexible)}`
        : "";
    using _casts = lora?.state.holdCasts() ?? null;
    const own = await evaluateExamples(model.decoder, tok, mine.map((i) => data.examples[i]!), {
      ...configuredEvaluation(cfg),
      onBatch: (done, r) =>
        log(
          `  ${done}/${mine.length}${dp.size > 1 ? " (rank 0's share)" : ""}: strict ${
            pct(r.accuracy_strict)
          }, flexible ${pct(r.accuracy_flexible)}${atK(r)}`,
        ),
    });
    const t = evalTotalsOverRanks(own.totals, dp);
    // Every rank's predictions, back in the problems' order: rank r's j-th problem is problem j·size + r.
    const shares = dp.gatherText(JSON.stringify(own.predictions)).map((s) => JSON.parse(s) as Prediction[]);
    const predictions = data.examples.flatMap((_, i) => {
      const j = Math.floor(i / dp.size);
      return shares[i % dp.size]!.slice(j * k, (j + 1) * k);
    });
    const summary: EvalSummary = {
      run: cfg.name,
      model: cfg.model.id,
      adapter: adapterDir,
      source: cfg.eval.source,
      split,
      limit: opts.limit ?? null,
      skipped_records: data.skipped.length,
      max_new_tokens: configuredEvaluation(cfg).maxNewTokens,
      temperature: cfg.eval.temperature,
      top_p: cfg.eval.temperature > 0 ? cfg.eval.topP : 1,
      batch_size: cfg.eval.batchSize,
      device: cfg.model.device,
      dtype: cfg.model.quantize4bit ? `nf4+${cfg.model.dtype}` : cfg.model.dtype,
      ...t,
      finished_at: new Date().toISOString(),
    };
    if (dp.rank !== 0) return { summary, dir };
    await Deno.mkdir(dir, { recursive: true });
    await writeAtomic(
      join(dir, "predictions.jsonl"),
      predictions.map((p) => JSON.stringify(p) + "\n").join(""),
    );
    await writeAtomic(join(dir, "summary.json"), JSON.stringify(summary, null, 2) + "\n");
    return { summary, dir };
  } finally {
    lora?.dispose();
  }
}

const USAGE =
  `usage: deno task evaluate [--config configs/x.yaml] [--adapter DIR] [--limit N] [--split test|train]
                          [--out DIR] [--set key.path=value ...] [--nproc N]

  -c, --config F     the training config whose model, prompt, token cap and eval data are used (without it:
                     the config.yaml of the run a checkpoint adapter is from, else the built-in defaults,
                     which configs/default.yaml lists)
  --adapter DIR      a PEFT adapter folder, a checkpoint folder, or a run folder (its newest checkpoint);
                     without it: the base model
  --limit N          the first N problems only
  --split S          test or train (default: the config's eval.split)
  -o, --out DIR      where predictions.jsonl and summary.json go (default:
                     <run>/eval/<checkpoint, base or adapter folder>-<split>, sampled: …-t<T>[-p<topP>]-n<samples>)
  --set key=value    a config override (repeatable); e.g. --set eval.samples=8 --set eval.temperature=0.6
                     samples 8 completions per problem and adds pass@8 and maj@8 to the mean accuracy
  --nproc N          split the problems over N local processes
  -h, --help         this text

Exit status: 0 done, 1 an error while running, 2 a bad argument or config.`;

/** The command line: returns the exit status. */
export async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(
    "evaluate",
    USAGE,
    args,
    {
      config: { type: "string", short: "c" },
      adapter: { type: "string" },
      limit: { type: "string" },
      split: { type: "string" },
      out: { type: "string", short: "o" },
      set: { type: "string", multiple: true },
      nproc: { type: "string" },
    },
    false,
    setOptionHint,
  );
  if (typeof parsed === "number") return parsed;
  const v = parsed.values;
  let limit: number | undefined;
  try {
    limit = v.limit === undefined ? undefined : numberOption("limit", v.limit, { integer: true, min: 1 });
  } catch (e) {
    console.error(`evaluate: ${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  if (v.split !== undefined && !(GSM8K_SPLITS as readonly string[]).includes(v.split)) {
    console.error(`evaluate: --split must be "train" or "test", got ${v.split}\n${USAGE}`);
    return 2;
  }
  let env;
  try {
    env = launchEnv();
  } catch (e) {
    console.error(`evaluate: ${(e as Error).message}`);
    return 2;
  }
  if (v.nproc !== undefined) {
    let n: number;
    try {
      n = nprocOption(v.nproc, env !== null);
    } catch (e) {
      console.error(`evaluate: ${(e as Error).message}\n${USAGE}`);
      return 2;
    }
    return await spawnLocal(n, ["run", "-A", import.meta.filename!, ...withoutNproc(args)]);
  }
  try {
    exitWithLauncher("evaluate"); // a rank of --nproc whose launcher was killed outright stops, as train's do
  } catch (e) {
    console.error(`evaluate: ${(e as Error).message}`);
    return 2;
  }
  const say = (env?.rank ?? 0) === 0 ? console.log : () => {};
  const at = fromStartDir;
  // Without --config, a checkpoint is evaluated as its run trained it (the run's config.yaml).
  let cfg: TrainConfig, from: string;
  try {
    ({ cfg, from } = await adapterConfig(at(v.config), at(v.adapter), v.set ?? []));
  } catch (e) {
    console.error(`evaluate: ${(e as Error).message}`);
    return e instanceof TrainConfigError ? 2 : 1;
  }
  say(`config ${from}:\n${formatConfig(cfg)}`);
  try {
    const threads = useAvailableCores(env?.localWorldSize ?? 1);
    say(`libtorch: ${threads} CPU thread${threads === 1 ? "" : "s"} per process (OMP_NUM_THREADS to change)`);
    const device = rankDevice(cfg.model.device, env);
    using replicas = joinReplicas(env, device, distTimeoutSeconds());
    const { summary, dir } = await runEvaluation(cfg, {
      adapter: at(v.adapter),
      limit,
      split: v.split as Gsm8kSplit | undefined,
      out: at(v.out),
      replicas,
      device,
      localRank: env?.localRank,
    });
    say(JSON.stringify(summary, null, 2));
    say(`predictions and summary in ${dir}`);
    return 0;
  } catch (e) {
    console.error(`evaluate: ${failureText(e)}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
