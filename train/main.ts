/**
 * `deno task train --config configs/x.yaml [--set key.path=value ...] [--print-config]`
 *
 * For now a skeleton: parses the arguments, loads and prints the resolved
 * config, and checks that the PPO step (rl/ppo.ts) is there; the update loop
 * is still to be wired. Relative paths on the command line are taken from
 * the folder the command was started in (`INIT_CWD` under `deno task`).
 * Exit status: 0 with --print-config, 2 for bad arguments or a bad config,
 * 1 otherwise (the loop is not written yet).
 * @module
 */
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import {
  ConfigError,
  formatConfig,
  loadConfig,
  promptsPerUpdate,
  runDir,
  type TrainConfig,
} from "./config.ts";

const USAGE = "usage: deno task train --config configs/x.yaml [--set key.path=value ...] [--print-config]";

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
    cfg = await loadConfig(v.config === undefined ? undefined : resolve(base, v.config), v.set ?? []);
  } catch (e) {
    console.error(`train: ${(e as Error).message}`);
    return e instanceof ConfigError ? 2 : 1;
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

  const ppoUrl = new URL("../rl/ppo.ts", import.meta.url);
  let hasPpo = true;
  try {
    await Deno.stat(ppoUrl);
  } catch {
    hasPpo = false;
  }
  if (!hasPpo) {
    console.error("train: training loop not wired yet: rl/ppo.ts (ppoStep) does not exist");
    return 1;
  }
  const ppo = await import(ppoUrl.href) as Record<string, unknown>;
  if (typeof ppo.ppoStep !== "function") {
    console.error("train: rl/ppo.ts does not export ppoStep");
    return 1;
  }
  console.error(
    "train: rl/ppo.ts is in place, but this update loop (train/main.ts) is a skeleton still to be written",
  );
  return 1;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
