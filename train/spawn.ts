/**
 * `--nproc N`: N local ranks of the same command with torchrun's variables
 * set (train/launch.ts reads them), for users without torchrun; signals to
 * the launcher reach its ranks, a rank that fails stops the others, and a
 * rank whose launcher is killed outright stops itself.
 * @module
 */
import { exitWithParent } from "../ffi/runtime.ts";

/**
 * Under `--nproc` (MOERL_LAUNCHER_PID set): stops this rank when the launcher is gone (killed with -9, by the
 * OOM killer), which could not pass a signal on; orphaned ranks would go on writing the run folder, or wait out
 * a rendezvous. The check runs on a native thread, so a rank blocked in a collective stops too.
 * @param command the command's name, for the message
 * @throws {Error} when MOERL_LAUNCHER_PID is not a pid
 */
export function exitWithLauncher(
  command: string,
  env: Record<string, string | undefined> = Deno.env.toObject(),
): void {
  const launcher = env.MOERL_LAUNCHER_PID;
  if (!launcher) return;
  const pid = Number(launcher);
  if (!/^\d+$/.test(launcher) || !Number.isSafeInteger(pid) || pid < 1) {
    throw new Error(`MOERL_LAUNCHER_PID: expected the launcher's pid, got "${launcher}"`);
  }
  exitWithParent(pid, `${command}: the --nproc launcher (pid ${pid}) is gone; stopping this rank`);
  // This rank's own: a process it starts (a verifier, a nested evaluate) has this rank as its parent.
  if (env.MOERL_LAUNCHER_PID === Deno.env.get("MOERL_LAUNCHER_PID")) Deno.env.delete("MOERL_LAUNCHER_PID");
}

/** The arguments without `--nproc N` / `--nproc=N`: what each local rank of a `--nproc` launch gets. */
export function withoutNproc(args: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--nproc") i++;
    else if (!args[i]!.startsWith("--nproc=")) out.push(args[i]!);
  }
  return out;
}

/** A free TCP port on this machine (the OS picks one; it is released for the store to take). */
export function freePort(hostname = "127.0.0.1"): number {
  const listener = Deno.listen({ hostname, port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** Options of {@link spawnLocal}. */
export interface SpawnOptions {
  /** The program (default: this Deno). */
  program?: string;
  /** Seconds the other ranks get to stop on their own after one fails, before they are killed (default 30). */
  graceSeconds?: number;
  /** Where lines of rank r > 0 go, prefixed with "[rank r]" (default: this process's stdout/stderr). */
  quietRanks?: boolean;
}

/**
 * Runs nproc local copies of `program args` with the torchrun variables set
 * (MASTER_ADDR 127.0.0.1, a free port), rank 0's output as is and the
 * others' prefixed with their rank. When a rank fails, the others get
 * graceSeconds to stop (they fail at their next collective), then are
 * killed. Returns the first failing rank's exit code, or 0.
 */
export async function spawnLocal(
  nproc: number,
  args: readonly string[],
  opts: SpawnOptions = {},
): Promise<number> {
  if (!Number.isSafeInteger(nproc) || nproc < 1) {
    throw new RangeError(`--nproc: expected an integer >= 1, got ${nproc}`);
  }
  const port = freePort();
  let stopping = false;
  const children: Deno.ChildProcess[] = Array.from(
    { length: nproc },
    (_, rank) =>
      new Deno.Command(opts.program ?? Deno.execPath(), {
        args: [...args],
        env: {
          RANK: String(rank),
          LOCAL_RANK: String(rank),
          WORLD_SIZE: String(nproc),
          LOCAL_WORLD_SIZE: String(nproc),
          MASTER_ADDR: "127.0.0.1",
          MASTER_PORT: String(port),
          MOERL_LAUNCHER_PID: String(Deno.pid),
        },
        stdin: "null",
        stdout: rank === 0 ? "inherit" : "piped",
        stderr: rank === 0 ? "inherit" : "piped",
      }).spawn(),
  );
  const pumps = children.flatMap((child, rank) =>
    rank === 0 ? [] : [
      prefixLines(child.stdout, `[rank ${rank}] `, (s) => opts.quietRanks || Deno.stdout.writeSync(s)),
      prefixLines(child.stderr, `[rank ${rank}] `, (s) => Deno.stderr.writeSync(s)),
    ]
  );
  const send = (signal: Deno.Signal): void => {
    for (const c of children) {
      try {
        c.kill(signal);
      } catch { /* already gone */ }
    }
  };
  // A signal to the launcher (a scheduler's TERM, a kill, a hang-up) goes to the ranks, which would otherwise
  // outlive it, holding their GPUs; the launcher then waits for them as after any exit.
  const forwarded = (["SIGINT", "SIGTERM", "SIGHUP"] as const).map((signal) => {
    const handler = (): void => {
      stopping = true;
      send(signal);
    };
    Deno.addSignalListener(signal, handler);
    return () => Deno.removeSignalListener(signal, handler);
  });
  let failed: { rank: number; code: number } | null = null;
  const timers: ReturnType<typeof setTimeout>[] = [];
  try {
    await Promise.all(children.map(async (child, rank) => {
      const { code } = await child.status;
      if (code !== 0 && !failed) {
        failed = { rank, code };
        if (!stopping) console.error(`launch: rank ${rank} exited with code ${code}; stopping the others`);
        const grace = (opts.graceSeconds ?? 30) * 1000;
        timers.push(
          setTimeout(() => send("SIGTERM"), grace),
          setTimeout(() => send("SIGKILL"), grace + 10_000),
        );
      }
    }));
  } finally {
    timers.forEach(clearTimeout);
    forwarded.forEach((remove) => remove());
  }
  await Promise.all(pumps);
  return (failed as { rank: number; code: number } | null)?.code ?? 0;
}

async function prefixLines(
  stream: ReadableStream<Uint8Array>,
  prefix: string,
  write: (bytes: Uint8Array) => unknown,
): Promise<void> {
  const enc = new TextEncoder();
  let rest = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    const lines = (rest + chunk).split("\n");
    rest = lines.pop()!;
    for (const line of lines) write(enc.encode(`${prefix}${line}\n`));
  }
  if (rest) write(enc.encode(`${prefix}${rest}\n`));
}
