/**
 * `deno task train --config configs/x.yaml [--set key.path=value ...] [--resume] [--print-config] [--nproc N]`
 *
 * Loads and prints the resolved config, then trains (train/loop.ts) into
 * runs/<name>/, or continues the latest checkpoint there with --resume.
 * Data parallel: `--nproc N` starts N local ranks of this command; under
 * torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR,
 * MASTER_PORT) this process is one rank (train/launch.ts).
 * Relative paths on the command line are taken from the folder the command
 * was started in (`INIT_CWD` under `deno task`). Exit status: 0 done, 2 for
 * bad arguments or a bad config, 1 for a failed run.
 * @module
 */
import {
  formatConfig,
  loadTrainConfig,
  promptsPerUpdate,
  runDir,
  setOptionHint,
  type TrainConfig,
  TrainConfigError,
} from "./config.ts";
import { failureText, fromStartDir, nprocOption, parseCommandLine } from "./cli.ts";
import { train } from "./loop.ts";
import { formatValue } from "./progress.ts";
import { distTimeoutSeconds, joinReplicas, type LaunchEnv, launchEnv, rankDevice } from "./launch.ts";
import { exitWithLauncher, spawnLocal, withoutNproc } from "./spawn.ts";
import { torchVersion, useAvailableCores } from "../ffi/mod.ts";

const USAGE =
  `usage: deno task train [--config configs/x.yaml] [--set key.path=value ...] [--resume] [--print-config]
                       [--nproc N]

  -c, --config F     a YAML file of overrides (without it: the built-in defaults, which configs/default.yaml lists)
  --set key=value    one more override, e.g. --set train.learningRate=2e-5 (repeatable; after the file)
  --resume           continue the run folder (runs/<name>, or output.dir) from its latest checkpoint; refused
                     when settings that change what is learnt differ from the checkpoint's
  --print-config     print the resolved config and exit
  --nproc N          start N local processes (data parallel; one GPU each by LOCAL_RANK, or CPU cores shared);
                     under torchrun or another launcher (WORLD_SIZE set) leave it out
  -h, --help         this text

Exit status: 0 done, 1 an error while running, 2 a bad argument or config.`;

/** The command line: returns the exit status. */
export async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(
    "train",
    USAGE,
    args,
    {
      config: { type: "string", short: "c" },
      set: { type: "string", multiple: true },
      "print-config": { type: "boolean" },
      resume: { type: "boolean" },
      nproc: { type: "string" },
    },
    false,
    setOptionHint,
  );
  if (typeof parsed === "number") return parsed;
  const v = parsed.values;
  let env: LaunchEnv | null;
  try {
    env = launchEnv();
  } catch (e) {
    console.error(`train: ${(e as Error).message}`);
    return 2;
  }
  let cfg: TrainConfig;
  try {
    cfg = await loadTrainConfig(fromStartDir(v.config), v.set ?? []);
  } catch (e) {
    console.error(`train: ${(e as Error).message}`);
    return e instanceof TrainConfigError ? 2 : 1;
  }
  if (v.nproc !== undefined && !v["print-config"]) {
    let n: number;
    try {
      n = nprocOption(v.nproc, env !== null);
    } catch (e) {
      console.error(`train: ${(e as Error).message}\n${USAGE}`);
      return 2;
    }
    if (promptsPerUpdate(cfg) % n !== 0) { // said once here, rather than by every rank it would start
      console.error(
        `train: --nproc ${n}: an update's ${promptsPerUpdate(cfg)} prompts (train.microBatch × ` +
          "train.gradAccum) do not split evenly over the processes",
      );
      return 2;
    }
    return await spawnLocal(n, ["run", "-A", import.meta.filename!, ...withoutNproc(args)]);
  }
  try {
    exitWithLauncher("train");
  } catch (e) {
    console.error(`train: ${(e as Error).message}`);
    return 2;
  }
  const lead = (env?.rank ?? 0) === 0;
  const say = lead ? console.log : () => {};
  say(`# resolved config${v.config ? ` (${v.config} over the defaults)` : " (defaults)"}`);
  say(formatConfig(cfg));
  say(
    `# ${
      promptsPerUpdate(cfg)
    } prompts × ${cfg.rollout.k} completions per update, ${cfg.train.updates} updates; ` +
      `run folder ${runDir(cfg)}`,
  );
  if (v["print-config"]) return 0;
  // Said up front: a signal ends the process at once (a handler could not run while libtorch holds the thread).
  say(
    "# stopping at any point is safe (every file is written whole); --resume goes on from the last checkpoint",
  );

  try {
    const threads = useAvailableCores(env?.localWorldSize ?? 1);
    say(
      `# libtorch ${torchVersion()}: ${threads} CPU thread${
        threads === 1 ? "" : "s"
      } per process (OMP_NUM_THREADS to change)`,
    );
    const device = rankDevice(cfg.model.device, env);
    using replicas = joinReplicas(env, device, distTimeoutSeconds());
    if (env) say(`# data parallel: ${env.worldSize} processes (${replicas.group!.backend})`);
    const result = await train(cfg, {
      resume: v.resume ?? false,
      replicas,
      device,
      localRank: env?.localRank,
    });
    const last = result.records[result.records.length - 1];
    say(
      `done: ${result.dir} (${result.records.length} update${
        result.records.length === 1 ? "" : "s"
      } this run; ` +
        `last reward ${typeof last?.reward_mean === "number" ? formatValue(last.reward_mean) : "–"})`,
    );
    return 0;
  } catch (e) {
    console.error(`train: ${failureText(e)}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
