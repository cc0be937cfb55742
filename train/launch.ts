/**
 * Launching a data-parallel run the way PyTorch jobs are launched.
 *
 * - **torchrun's environment contract** ({@link launchEnv}): `RANK`,
 *   `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
 *   `MASTER_PORT`. Under torchrun (`TORCHELASTIC_USE_AGENT_STORE=True`) the
 *   ranks join the agent's TCPStore as clients, under the attempt's prefix,
 *   as torch.distributed does; otherwise rank 0 hosts the store.
 * - **`--nproc N`** (train/spawn.ts): N local processes of the same
 *   command with those variables set, for users without torchrun.
 *
 * Each rank takes one GPU by `LOCAL_RANK` (NCCL) or, on the CPU, a share of
 * the cores (Gloo).
 * @module
 */
import { type Device, ProcessGroup } from "../ffi/mod.ts";
import { Replicas } from "../rl/replicas.ts";

/** The torchrun variables of this process. */
export interface LaunchEnv {
  /** RANK: this process among all. */
  rank: number;
  /** LOCAL_RANK: this process among those on its machine (its GPU index). */
  localRank: number;
  /** WORLD_SIZE. */
  worldSize: number;
  /** LOCAL_WORLD_SIZE: processes on this machine. */
  localWorldSize: number;
  /** MASTER_ADDR: the TCPStore's host. */
  masterAddr: string;
  /** MASTER_PORT. */
  masterPort: number;
  /** Whether torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE=True). */
  agentStore: boolean;
  /** TORCHELASTIC_RESTART_COUNT: torchrun's attempt, which prefixes the store's keys. */
  restartCount: number;
}

/** Seconds a collective or the rendezvous may wait (MOERL_DIST_TIMEOUT_S, default 600). */
export function distTimeoutSeconds(env: Record<string, string | undefined> = Deno.env.toObject()): number {
  const raw = env.MOERL_DIST_TIMEOUT_S;
  if (raw === undefined || raw === "") return 600;
  const s = Number(raw);
  if (!(s > 0 && Number.isFinite(s))) {
    throw new RangeError(`MOERL_DIST_TIMEOUT_S: expected seconds > 0, got "${raw}"`);
  }
  return s;
}

/**
 * The torchrun variables, or null when WORLD_SIZE is unset (a single
 * process). A variable that is missing or malformed is an error naming it;
 * LOCAL_RANK and LOCAL_WORLD_SIZE, which launchers of one process per
 * machine may leave out, default to 0 and 1 as in PyTorch scripts.
 */
export function launchEnv(env: Record<string, string | undefined> = Deno.env.toObject()): LaunchEnv | null {
  if (env.WORLD_SIZE === undefined) return null;
  const int = (name: string, min: number, fallback?: number): number => {
    const raw = env[name];
    if (raw === undefined && fallback !== undefined) return fallback;
    const v = Number(raw);
    if (raw === undefined || raw === "" || !Number.isSafeInteger(v) || v < min) {
      throw new RangeError(
        `${name}: expected an integer >= ${min}, got ${raw === undefined ? "nothing" : `"${raw}"`}`,
      );
    }
    return v;
  };
  const worldSize = int("WORLD_SIZE", 1);
  const rank = int("RANK", 0);
  if (rank >= worldSize) throw new RangeError(`RANK ${rank} is not below WORLD_SIZE ${worldSize}`);
  const localWorldSize = int("LOCAL_WORLD_SIZE", 1, 1);
  const localRank = int("LOCAL_RANK", 0, 0);
  if (localRank >= localWorldSize) {
    throw new RangeError(`LOCAL_RANK ${localRank} is not below LOCAL_WORLD_SIZE ${localWorldSize}`);
  }
  const masterAddr = env.MASTER_ADDR;
  if (!masterAddr) throw new RangeError("MASTER_ADDR: not set (the host of rank 0's store)");
  const masterPort = int("MASTER_PORT", 1);
  if (masterPort > 65535) throw new RangeError(`MASTER_PORT: ${masterPort} is not a port`);
  return {
    rank,
    localRank,
    worldSize,
    localWorldSize,
    masterAddr,
    masterPort,
    agentStore: env.TORCHELASTIC_USE_AGENT_STORE === "True",
    restartCount: int("TORCHELASTIC_RESTART_COUNT", 0, 0),
  };
}

/**
 * The device a rank uses: its own GPU (`cuda:LOCAL_RANK`) when the config says "cuda", else as given.
 * @throws {RangeError} for one named GPU ("cuda:1") shared by several ranks of a machine (NCCL refuses that)
 */
export function rankDevice(device: Device, env: LaunchEnv | null): Device {
  if (env && device.startsWith("cuda:") && env.localWorldSize > 1) {
    throw new RangeError(
      `model.device "${device}" names one GPU for the ${env.localWorldSize} ranks of this machine: ` +
        'use "cuda" (each rank takes cuda:LOCAL_RANK)',
    );
  }
  return env && device === "cuda" ? `cuda:${env.localRank}` : device;
}

/**
 * Throws on every rank when the ranks' resolved configs differ (a rank with another learning rate would
 * silently diverge from the others).
 * @throws {Error} naming the first rank whose config is not rank 0's
 */
export function checkSameConfig(replicas: Replicas, config: string): void {
  if (replicas.size === 1) return;
  const configs = replicas.gatherText(config);
  const other = configs.findIndex((c) => c !== configs[0]);
  if (other > 0) {
    throw new Error(`rank ${other}'s config differs from rank 0's: give every rank the same settings`);
  }
}

/**
 * Runs fetch (Hub downloads into the shared cache) on one rank per machine while the others wait, so that
 * ranks never write the same partial files at once; then every rank goes on, finding the files cached. A
 * failed fetch fails every rank. A single process skips it (it downloads as it loads).
 * @throws {Error} the fetching rank's own error there, and a pointer to it on the others
 */
export async function fetchFirst(
  replicas: Replicas,
  localRank: number,
  fetch: () => Promise<unknown>,
): Promise<void> {
  if (replicas.size === 1) return; // alone: it downloads as it loads
  await onSomeRanks(
    replicas,
    localRank === 0 ? fetch : null,
    "downloading the model or data failed on another rank (its error says why)",
  );
}

/**
 * Runs work on the ranks that have some (null: none here), then has every rank throw if it failed anywhere:
 * a rank that threw alone would leave the others waiting in their next collective.
 * @throws {Error} a failing rank's own error there, and `elsewhere` on the others
 */
export async function onSomeRanks(
  replicas: Replicas,
  work: (() => Promise<unknown>) | null,
  elsewhere: string,
): Promise<void> {
  let error: unknown = null;
  if (work) {
    try {
      await work();
    } catch (e) {
      error = e;
    }
  }
  const [failed] = replicas.sum([error === null ? 0 : 1]);
  if (error !== null) throw error;
  if (failed! > 0) throw new Error(elsewhere);
}

/**
 * Joins the run's process group: NCCL when the rank trains on a GPU, Gloo on
 * the CPU. A single process (env null) gets {@link Replicas.single}.
 */
export function joinReplicas(env: LaunchEnv | null, device: Device, timeoutSeconds: number): Replicas {
  if (!env) return Replicas.single();
  const onGpu = device.startsWith("cuda");
  let group: ProcessGroup;
  try {
    group = ProcessGroup.init({
      backend: onGpu ? "nccl" : "gloo",
      host: env.masterAddr,
      port: env.masterPort,
      worldSize: env.worldSize,
      rank: env.rank,
      timeoutMs: timeoutSeconds * 1000,
      server: env.agentStore ? false : env.rank === 0,
      prefix: env.agentStore ? `/worker/attempt_${env.restartCount}/moerl/` : "moerl/",
    });
  } catch (e) {
    if (!/time(d)? ?out/i.test((e as Error).message)) throw e;
    // libtorch says "Socket Timeout" where the ranks never all met: say which wait ended and what decides it.
    throw new Error(
      `rank ${env.rank} of ${env.worldSize}: not every rank joined at ${env.masterAddr}:${env.masterPort} ` +
        `within ${timeoutSeconds} s (MOERL_DIST_TIMEOUT_S). Were all ${env.worldSize} started, with the same ` +
        `MASTER_ADDR, MASTER_PORT and WORLD_SIZE? (${(e as Error).message})`,
      { cause: e },
    );
  }
  return new Replicas(group, onGpu ? device : "cpu");
}
