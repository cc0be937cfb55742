/**
 * `deno task train --config configs/x.yaml [--set key.path=value ...] [--resume] [--print-config]`
 *
 * Loads and prints the resolved config, then trains (train/loop.ts) into
 * runs/<name>/, or continues the latest checkpoint there with --resume.
 * Relative paths on the command line are taken from the folder the command
 * was started in (`INIT_CWD` under `deno task`). Exit status: 0 done, 2 for
 * bad arguments or a bad config, 1 for a failed run.
 * @module
 */
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import {
  formatConfig,
  loadTrainConfig,
  promptsPerUpdate,
  runDir,
  type TrainConfig,
  TrainConfigError,
} from "./config.ts";
import { train } from "./loop.ts";
import { torchVersion, useAvailableCores } from "../ffi/mod.ts";

const USAGE =
  "usage: deno task train --config configs/x.yaml [--set key.path=value ...] [--resume] [--print-config]";

/** The command line: returns the exit status. */
export async function main(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        config: { type: "string", short: "c" },
        set: { type: "string", multiple: true },
        "print-config": { type: "boolean" },
        resume: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
    });
  } catch (e) {
    console.error(`train: ${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  const v = parsed.values;
  if (v.help) {
    console.log(USAGE);
    return 0;
  }
  const base = Deno.env.get("INIT_CWD") ?? Deno.cwd();
  let cfg: TrainConfig;
  try {
    cfg = await loadTrainConfig(v.config === undefined ? undefined : resolve(base, v.config), v.set ?? []);
  } catch (e) {
    console.error(`train: ${(e as Error).message}`);
    return e instanceof TrainConfigError ? 2 : 1;
  }
  console.log(`# resolved config${v.config ? ` (${v.config} over the defaults)` : " (defaults)"}`);
  console.log(formatConfig(cfg));
  console.log(
    `# ${
      promptsPerUpdate(cfg)
    } prompts × ${cfg.rollout.k} completions per update, ${cfg.train.updates} updates; ` +
      `run folder ${runDir(cfg)}`,
  );
  if (v["print-config"]) return 0;

  try {
    const threads = useAvailableCores();
    console.log(
      `# libtorch ${torchVersion()}: ${threads} CPU thread${
        threads === 1 ? "" : "s"
      } (OMP_NUM_THREADS to change)`,
    );
    const result = await train(cfg, { resume: v.resume ?? false });
    const last = result.records[result.records.length - 1];
    console.log(
      `done: ${result.dir} (${result.records.length} updates this run; last reward ${
        last?.reward_mean ?? "-"
      })`,
    );
    return 0;
  } catch (e) {
    // The message names the problem; the stack is for debugging (MOERL_DEBUG=1).
    const debug = Deno.env.get("MOERL_DEBUG") === "1";
    console.error(`train: ${debug ? (e as Error).stack : (e as Error).message}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
