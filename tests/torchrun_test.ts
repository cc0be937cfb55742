/**
 * torchrun launches moerl's ranks (train/launch.ts): with a fixed master
 * address (as several machines are launched by hand) and with torchrun's c10d
 * rendezvous (`--standalone`, as elastic jobs are), each rank joins the
 * agent's store and the group reduces across both. Runs where
 * MOERL_TEST_PYTHON's torch is the version the shim was built on (their
 * stores must speak the same protocol) and the shim has Gloo; ignored
 * elsewhere (CI's Debian libtorch comes without a Python torch).
 */
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { distBackends, torchVersion } from "../ffi/mod.ts";
import { freePort } from "../train/spawn.ts";
import { PYTHON } from "./util.ts";

const WORKER = fileURLToPath(new URL("./dist_worker.ts", import.meta.url));

/** The Python torch's version without its local part ("2.15.0+cu132" → "2.15.0"), or null without one. */
function pythonTorch(): string | null {
  try {
    const r = new Deno.Command(PYTHON, {
      args: ["-c", "import torch, torch.distributed.run; print(torch.__version__.split('+')[0])"],
      stdout: "piped",
      stderr: "null",
    }).outputSync();
    return r.success ? new TextDecoder().decode(r.stdout).trim() : null;
  } catch {
    return null;
  }
}

const runnable = distBackends().includes("gloo") && pythonTorch() === torchVersion();

/** Runs torchrun with `rendezvous` arguments over 2 local ranks of the worker; their JSON lines by rank. */
async function torchrun(
  rendezvous: string[],
): Promise<{ code: number; ranks: Record<string, unknown>[]; log: string }> {
  const r = await new Deno.Command(PYTHON, {
    args: [
      "-m",
      "torch.distributed.run",
      "--no-python",
      "--nnodes",
      "1",
      "--nproc-per-node",
      "2",
      ...rendezvous,
      Deno.execPath(),
      "run",
      "-A",
      WORKER,
      "launch",
    ],
    env: { MOERL_DIST_TIMEOUT_MS: "30000", OMP_NUM_THREADS: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  const ranks = dec.decode(r.stdout).split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
  ranks.sort((a, b) => (a.rank as number) - (b.rank as number));
  return { code: r.code, ranks, log: dec.decode(r.stderr) };
}

for (
  const [how, rendezvous] of [
    ["a fixed master address", () => ["--master-addr", "127.0.0.1", "--master-port", String(freePort())]],
    ["c10d rendezvous (--standalone)", () => ["--standalone"]],
  ] as const
) {
  Deno.test({
    name: `torchrun: 2 ranks join through its agent's store with ${how}, and reduce`,
    ignore: !runnable,
    async fn(): Promise<void> {
      const { code, ranks, log } = await torchrun(rendezvous());
      assert.equal(code, 0, log.slice(-3000));
      assert.equal(ranks.length, 2, log.slice(-3000));
      for (const [r, j] of ranks.entries()) {
        assert.equal(j.error, undefined, `rank ${r}: ${j.error}`);
        assert.equal(j.rank, r);
        assert.equal(j.world, 2);
        assert.equal(j.localRank, r);
        assert.equal(j.agentStore, true, "torchrun's agent hosts the store");
        assert.deepEqual(j.gathered, [[0, 0], [1, 1]]);
        assert.deepEqual(j.summed, [3]);
      }
    },
  });
}
