/**
 * torchrun's environment contract (train/launch.ts): parsed as torch.distributed reads it, bad values named;
 * and --nproc's launcher (train/spawn.ts).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Replicas } from "../rl/replicas.ts";
import { distTimeoutSeconds, fetchFirst, joinReplicas, launchEnv, rankDevice } from "../train/launch.ts";
import { freePort } from "../train/spawn.ts";

const ROOT = join(import.meta.dirname!, "..");

const TORCHRUN = {
  RANK: "3",
  LOCAL_RANK: "1",
  WORLD_SIZE: "4",
  LOCAL_WORLD_SIZE: "2",
  MASTER_ADDR: "10.0.0.7",
  MASTER_PORT: "29500",
  TORCHELASTIC_USE_AGENT_STORE: "True",
  TORCHELASTIC_RESTART_COUNT: "2",
};

Deno.test("launch: torchrun's variables, the agent store, and a rank's GPU", () => {
  assert.equal(launchEnv({}), null, "no WORLD_SIZE: a single process");
  const env = launchEnv(TORCHRUN)!;
  assert.deepEqual(env, {
    rank: 3,
    localRank: 1,
    worldSize: 4,
    localWorldSize: 2,
    masterAddr: "10.0.0.7",
    masterPort: 29500,
    agentStore: true,
    restartCount: 2,
  });
  assert.equal(rankDevice("cuda", env), "cuda:1");
  assert.equal(rankDevice("cpu", env), "cpu");
  assert.equal(rankDevice("cuda", null), "cuda");
  // A launcher of one process per machine (a Kubernetes PyTorchJob) may leave out the local variables: as
  // PyTorch scripts read them, local rank 0 of 1, so the rank takes cuda:0 and all of its machine's cores.
  const plain = launchEnv({ RANK: "3", WORLD_SIZE: "4", MASTER_ADDR: "10.0.0.7", MASTER_PORT: "1234" })!;
  assert.deepEqual([plain.localRank, plain.localWorldSize, plain.agentStore], [0, 1, false]);
  assert.equal(rankDevice("cuda", plain), "cuda:0");
  // One named GPU cannot serve several ranks of a machine (NCCL refuses it): said before anything starts.
  assert.throws(() => rankDevice("cuda:1", env), /model\.device "cuda:1" names one GPU for the 2 ranks/);
  assert.equal(rankDevice("cuda:1", plain), "cuda:1", "one rank on this machine: its GPU as named");
});

Deno.test("launch: a missing or malformed variable is an error naming it", () => {
  const bad = (patch: Record<string, string | undefined>, re: RegExp): void =>
    assert.throws(() => launchEnv({ ...TORCHRUN, ...patch }), re);
  bad({ RANK: undefined }, /RANK: expected an integer >= 0, got nothing/);
  bad({ RANK: "4" }, /RANK 4 is not below WORLD_SIZE 4/);
  bad({ WORLD_SIZE: "two" }, /WORLD_SIZE: expected an integer >= 1, got "two"/);
  bad({ MASTER_ADDR: undefined }, /MASTER_ADDR: not set/);
  bad({ MASTER_PORT: "70000" }, /MASTER_PORT: 70000 is not a port/);
  bad({ LOCAL_RANK: "2" }, /LOCAL_RANK 2 is not below LOCAL_WORLD_SIZE 2/);
  assert.equal(distTimeoutSeconds({}), 600);
  assert.equal(distTimeoutSeconds({ MOERL_DIST_TIMEOUT_S: "12.5" }), 12.5);
  assert.throws(
    () => distTimeoutSeconds({ MOERL_DIST_TIMEOUT_S: "0" }),
    /MOERL_DIST_TIMEOUT_S: expected seconds > 0/,
  );
  assert.throws(() => distTimeoutSeconds({ MOERL_DIST_TIMEOUT_S: "Infinity" }), /expected seconds > 0/);
});

Deno.test("launch: one rank per machine downloads first; a failed download fails every rank", async () => {
  /** Rank r of two whose peer's contribution to every sum is given. */
  class Peer extends Replicas {
    constructor(private readonly peerSum: number) {
      super(null);
    }
    override get size(): number {
      return 2;
    }
    override sum(xs: readonly number[]): number[] {
      return xs.map((x) => x + this.peerSum);
    }
  }
  let fetched = 0;
  const fetch = (): Promise<void> => Promise.resolve(void fetched++);
  await fetchFirst(new Peer(0), 0, fetch);
  await fetchFirst(new Peer(0), 1, fetch);
  assert.equal(fetched, 1, "local rank 0 fetched, local rank 1 waited");
  await assert.rejects(
    () => fetchFirst(new Peer(1), 1, fetch),
    /downloading the model or data failed on another rank/,
  );
  await assert.rejects(
    () => fetchFirst(new Peer(0), 0, () => Promise.reject(new Error("offline"))),
    /^Error: offline$/,
  );
  await fetchFirst(Replicas.single(), 0, fetch);
  assert.equal(fetched, 1, "a single process downloads as it loads, without a separate fetch");
});

Deno.test("launch: a signal to the --nproc launcher reaches its ranks, which would otherwise outlive it", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_launch_sig_" });
  try {
    // The launcher: two ranks that each write their pid, then wait a minute.
    const rank = join(tmp, "rank.ts"), launcher = join(tmp, "launcher.ts");
    await Deno.writeTextFile(
      rank,
      `Deno.writeTextFileSync(${JSON.stringify(tmp)} + "/rank" + Deno.env.get("RANK"), String(Deno.pid));\n` +
        "await new Promise((r) => setTimeout(r, 60_000));\n",
    );
    await Deno.writeTextFile(
      launcher,
      `import { spawnLocal } from ${JSON.stringify(join(ROOT, "train", "spawn.ts"))};\n` +
        `Deno.exit(await spawnLocal(2, ["run", "-A", ${JSON.stringify(rank)}], { graceSeconds: 1 }));\n`,
    );
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", launcher],
      stdout: "null",
      stderr: "null",
    })
      .spawn();
    const pids: number[] = [];
    for (let i = 0; i < 200 && pids.length < 2; i++) {
      await new Promise((r) => setTimeout(r, 100));
      pids.length = 0;
      for (const r of ["rank0", "rank1"]) {
        try {
          pids.push(Number(await Deno.readTextFile(join(tmp, r))));
        } catch { /* not yet */ }
      }
    }
    assert.equal(pids.length, 2, "both ranks started");
    child.kill("SIGTERM");
    const status = await child.status;
    assert.notEqual(status.code, 0);
    const alive = (pid: number): boolean => {
      try {
        Deno.kill(pid, "SIGCONT"); // no effect on a live process; throws for a gone one
        return true;
      } catch {
        return false;
      }
    };
    assert.deepEqual(pids.map(alive), [false, false], "the ranks stopped with the launcher");
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("launch: a rank whose --nproc launcher is gone (kill -9) stops, rather than writing on alone", async () => {
  // The rank's check, as main() runs it: its parent must be the launcher spawnLocal named.
  const rank = (launcher: number): Deno.Command =>
    new Deno.Command(Deno.execPath(), {
      args: [
        "eval",
        `import { exitWithLauncher } from ${JSON.stringify(join(ROOT, "train", "spawn.ts"))};` +
        "exitWithLauncher('train'); " +
        "setTimeout(() => console.log('still running;', Deno.env.get('MOERL_LAUNCHER_PID') ?? 'unset'), 2500);",
      ],
      env: { MOERL_LAUNCHER_PID: String(launcher) },
      stdout: "piped",
      stderr: "piped",
    });
  const dec = new TextDecoder();
  // Its parent is this test: with another pid named as its launcher, the launcher is gone.
  const orphan = await rank(Deno.pid + 100000).output();
  assert.equal(orphan.code, 1);
  assert.match(dec.decode(orphan.stderr), /the --nproc launcher \(pid \d+\) is gone; stopping this rank/);
  assert.equal(dec.decode(orphan.stdout), "");
  const child = await rank(Deno.pid).output();
  assert.equal(child.code, 0, dec.decode(child.stderr));
  // Still running, and its own children (a verifier, a nested evaluate) do not inherit its launcher's pid.
  assert.equal(dec.decode(child.stdout).trim(), "still running; unset");
});

Deno.test("launch: an orphaned rank stops even while it blocks in the rendezvous; a bad launcher pid is named", async () => {
  const dec = new TextDecoder();
  // Rank 1 of 2 joins a store that nobody hosts: it blocks in a native call for up to MOERL_DIST_TIMEOUT_S,
  // where no JavaScript timer runs.
  const rankEnv = (): Record<string, string> => ({
    RANK: "1",
    LOCAL_RANK: "1",
    WORLD_SIZE: "2",
    LOCAL_WORLD_SIZE: "2",
    MASTER_ADDR: "127.0.0.1",
    MASTER_PORT: String(freePort()),
    MOERL_DIST_TIMEOUT_S: "60",
    OMP_NUM_THREADS: "1",
  });
  const mainArgs = (main: string): string[] => [
    "run",
    "-A",
    join(ROOT, main),
    "--config",
    join(ROOT, "configs", "tiny.yaml"),
  ];
  // A launcher (bash here) that is killed with -9 once its rank waits in the rendezvous.
  const launcher = new Deno.Command("bash", {
    args: [
      "-c",
      'MOERL_LAUNCHER_PID=$$ "$@" & wait',
      "bash",
      Deno.execPath(),
      ...mainArgs("eval/evaluate.ts"),
    ],
    env: rankEnv(),
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  await new Promise((resolve) => setTimeout(resolve, 5000)); // it starts in about 1 s
  const killed = performance.now();
  launcher.kill("SIGKILL");
  const out = await launcher.output(); // its pipes stay open until the rank ends too
  const stderr = dec.decode(out.stderr);
  assert.match(stderr, /^evaluate: the --nproc launcher \(pid \d+\) is gone; stopping this rank$/m);
  assert.doesNotMatch(stderr, /rendezvous|timed out|process group/i, "it did not wait out the timeout");
  assert.ok(performance.now() - killed < 30_000, "well before the rendezvous timeout (60 s)");

  for (const [command, main] of [["train", "train/main.ts"], ["evaluate", "eval/evaluate.ts"]]) {
    const run = (launcherPid: string): Promise<Deno.CommandOutput> =>
      new Deno.Command(Deno.execPath(), {
        args: mainArgs(main!),
        env: { ...rankEnv(), MOERL_LAUNCHER_PID: launcherPid },
        stdout: "piped",
        stderr: "piped",
      }).output();
    // The launcher named is not this rank's parent (this test is): it is gone from the start.
    const orphan = await run(String(Deno.pid + 100000));
    assert.equal(orphan.code, 1, dec.decode(orphan.stderr));
    assert.match(dec.decode(orphan.stderr), new RegExp(`^${command}: the --nproc launcher .* is gone`, "m"));
    const bad = await run("12abc");
    assert.equal(bad.code, 2);
    assert.match(
      dec.decode(bad.stderr),
      new RegExp(`^${command}: MOERL_LAUNCHER_PID: expected the launcher's pid, got "12abc"`),
    );
  }
});

Deno.test("launch: a rank left waiting for the others says so, with the timeout that ended the wait", () => {
  const env = launchEnv({
    RANK: "0",
    WORLD_SIZE: "2",
    MASTER_ADDR: "127.0.0.1",
    MASTER_PORT: String(freePort()),
  })!;
  assert.throws(
    () => joinReplicas(env, "cpu", 1),
    /rank 0 of 2: not every rank joined at 127\.0\.0\.1:\d+ within 1 s \(MOERL_DIST_TIMEOUT_S\)\. Were all 2 started/,
  );
});

Deno.test("launch: a training stopped by a signal ends at once, and --resume goes on", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_sigint_" });
  try {
    const run = (...extra: string[]): Deno.Command =>
      new Deno.Command(Deno.execPath(), {
        args: [
          ...["run", "-A", join(ROOT, "train", "main.ts"), "--config", join(ROOT, "configs", "tiny.yaml")],
          ...["--set", `output.dir=${tmp}`, "--set", "train.updates=400", "--set", "eval.every=0", ...extra],
        ],
        stdout: "piped",
        stderr: "piped",
      });
    const child = run().spawn();
    for (let i = 0; i < 600 && !(await Deno.stat(join(tmp, "latest")).then(() => true, () => false)); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    child.kill("SIGINT");
    const out = await child.output();
    assert.equal(out.signal, "SIGINT", "the default action: no handler waits for libtorch to return");
    assert.match(new TextDecoder().decode(out.stdout), /stopping at any point is safe .* --resume goes on/);
    const step = Number((await Deno.readTextFile(join(tmp, "latest"))).trim().replace("checkpoint-", ""));
    const again = await run("--resume", "--set", `train.updates=${step + 1}`).output();
    assert.equal(again.code, 0, new TextDecoder().decode(again.stderr));
    const steps = (await Deno.readTextFile(join(tmp, "metrics.jsonl"))).trim().split("\n").map((l) =>
      JSON.parse(l).step
    );
    assert.deepEqual(steps, Array.from({ length: step + 1 }, (_, i) => i + 1), "one more update, none twice");
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
