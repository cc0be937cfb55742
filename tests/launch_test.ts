/** torchrun's environment contract (train/launch.ts): parsed as torch.distributed reads it, bad values named. */
import assert from "node:assert/strict";
import { distTimeoutSeconds, launchEnv, rankDevice } from "../train/launch.ts";

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
  // A plain launcher may leave out the local variables: one machine.
  const plain = launchEnv({ RANK: "1", WORLD_SIZE: "2", MASTER_ADDR: "127.0.0.1", MASTER_PORT: "1234" })!;
  assert.deepEqual([plain.localRank, plain.localWorldSize, plain.agentStore], [1, 2, false]);
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
});
