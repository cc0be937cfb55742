/**
 * Checkpoints: save → load into a fresh policy and optimizer gives the same
 * parameters and optimizer state (and the same next update); a save that
 * fails midway leaves the earlier checkpoint and `latest` intact; missing and
 * corrupt files are named and change nothing; pruning; PEFT adapters copied
 * into existing adapters for every expert layout. Runs on MOERL_TEST_DEVICE / MOERL_TEST_DTYPE.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { AdamW, liveTensors, manualSeed, noGrad, randn, type Tensor, tidy } from "../ffi/mod.ts";
import { DEFAULT_LORA, type LoraConfig, LoraModel } from "../model/lora_apply.ts";
import { type CausalLM, loadModel } from "../model/model.ts";
import { savePeftAdapter } from "../model/peft.ts";
import type { ValueHead } from "../model/value_head.ts";
import { Policy } from "../rl/policy.ts";
import {
  latestCheckpoint,
  listCheckpoints,
  loadCheckpoint,
  type RngState,
  saveCheckpoint,
  updateSeed,
} from "../train/checkpoint.ts";
import { copyAdapterInto } from "../train/restore.ts";
import { DEVICE, FLOAT } from "./util.ts";

const MODELS = join(import.meta.dirname!, "fixtures", "models");
const LORA: LoraConfig = { ...DEFAULT_LORA, r: 4, alpha: 8 };
const RNG: RngState = { seed: 7, step: 2, batcherPosition: { epoch: 1, index: 3 } };

const values = (ts: readonly Tensor[]): number[][] => ts.map((t) => t.toArray());

function optimizerFor(policy: Policy): AdamW {
  return new AdamW([
    { params: policy.policyParameters(), lr: 1e-2, weightDecay: 0 },
    { params: policy.valueParameters(), lr: 5e-2, weightDecay: 0.01 },
  ]);
}

/** A deterministic loss on every parameter but the last adapter tensor (which so gets no state). */
function trainStep(policy: Policy, opt: AdamW): void {
  const ps = [...policy.policyParameters().slice(0, -1), ...policy.valueParameters()];
  tidy(() => ps.map((p, i) => p.sub(0.01 * (i + 1)).square().sum()).reduce((a, b) => a.add(b)).backward());
  opt.step();
  opt.zeroGrad();
}

function perturb(policy: Policy): void {
  noGrad(() =>
    tidy(() => {
      for (const p of [...policy.policyParameters(), ...policy.valueParameters()]) {
        p.copy_(randn(p.shape, { device: p.device }).mul(0.05));
      }
    })
  );
}

function optimizerState(opt: AdamW): ({ step: number; m: number[]; v: number[] } | null)[] {
  return opt.groups.flatMap((g) =>
    g.params.map((p) => {
      const s = opt.state(p);
      return s ? { step: s.step, m: s.expAvg.toArray(), v: s.expAvgSq.toArray() } : null;
    })
  );
}

async function treeSnapshot(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (d: string, rel: string): Promise<void> => {
    for await (const e of Deno.readDir(d)) {
      if (e.isDirectory) await walk(join(d, e.name), `${rel}${e.name}/`);
      else {
        const bytes = await Deno.readFile(join(d, e.name));
        out[`${rel}${e.name}`] = `${bytes.length}:${bytes.reduce((h, b) => (h * 31 + b) >>> 0, 7)}`;
      }
    }
  };
  await walk(dir, "");
  return out;
}

Deno.test("checkpoint: save, load into a fresh policy, crash safety, bad files, pruning", async (t) => {
  const live = liveTensors();
  const run = await Deno.makeTempDir({ prefix: "moerl-ckpt-" });
  {
    using modelA = await loadModel(join(MODELS, "qwen3-moe-tiny"), { device: DEVICE, dtype: FLOAT });
    using modelB = await loadModel(join(MODELS, "qwen3-moe-tiny"), { device: DEVICE, dtype: FLOAT });
    manualSeed(1);
    const a = new Policy(modelA, { lora: LORA });
    perturb(a);
    using optA = optimizerFor(a);
    trainStep(a, optA);
    trainStep(a, optA);
    const b = new Policy(modelB, { lora: LORA });
    using optB = optimizerFor(b);
    let first = "";

    await t.step("the layout: PEFT adapter, value head, optimizer, trainer state, latest", async () => {
      first = await saveCheckpoint(run, {
        policy: a,
        optimizer: optA,
        step: 2,
        rng: RNG,
        metricsTail: [{ step: 2, reward_mean: 0.5 }],
        config: { name: "t" },
        baseModel: "qwen3-moe-tiny",
      });
      assert.equal(first, join(run, "checkpoint-2"));
      for (
        const f of [
          "adapter/adapter_config.json",
          "adapter/adapter_model.safetensors",
          "value_head.safetensors",
        ]
      ) {
        assert.ok((await Deno.stat(join(first, f))).isFile, f);
      }
      assert.ok((await Deno.stat(join(first, "optimizer.safetensors"))).isFile);
      assert.equal((await Deno.readTextFile(join(run, "latest"))).trim(), "checkpoint-2");
      assert.equal(await latestCheckpoint(run), first);
    });

    await t.step(
      "loading gives identical parameters and optimizer state, and the same next update",
      async () => {
        assert.notDeepEqual(values(b.policyParameters()), values(a.policyParameters()));
        const state = await loadCheckpoint(first, b, optB);
        assert.equal(state.step, 2);
        assert.deepEqual(state.rng, RNG);
        assert.deepEqual(state.metricsTail, [{ step: 2, reward_mean: 0.5 }]);
        assert.deepEqual(state.config, { name: "t" });
        assert.deepEqual(values(b.policyParameters()), values(a.policyParameters()));
        assert.deepEqual(values(b.valueParameters()), values(a.valueParameters()));
        const sa = optimizerState(optA), sb = optimizerState(optB);
        assert.deepEqual(sb, sa);
        assert.equal(
          sa.at(-5),
          null,
          "the parameter that never had a gradient has no state, before and after",
        );
        assert.equal(sa[0]!.step, 2);
        trainStep(a, optA);
        trainStep(b, optB);
        assert.deepEqual(values(b.policyParameters()), values(a.policyParameters()));
        assert.deepEqual(values(b.valueParameters()), values(a.valueParameters()));
        assert.deepEqual(optimizerState(optB), optimizerState(optA));
      },
    );

    await t.step("a save that fails midway leaves the previous checkpoint and latest intact", async () => {
      const before = await treeSnapshot(run);
      const failing = {
        model: a.model,
        lora: a.lora,
        valueHead: { save: () => Promise.reject(new Error("disk full")) } as unknown as ValueHead,
      };
      await assert.rejects(
        () => saveCheckpoint(run, { policy: failing, optimizer: optA, step: 3, rng: { ...RNG, step: 3 } }),
        /checkpoint-3: saving the checkpoint failed \(earlier checkpoints are intact\): disk full/,
      );
      assert.deepEqual(await treeSnapshot(run), before, "nothing changed, no temporary folder left");
      assert.equal(await latestCheckpoint(run), first);
    });

    await t.step("missing and corrupt files are named, and nothing is changed", async () => {
      const bad = join(run, "broken");
      const copy = async (): Promise<void> => {
        await Deno.remove(bad, { recursive: true }).catch(() => {});
        await Deno.mkdir(join(bad, "adapter"), { recursive: true });
        for (const f of ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]) {
          await Deno.copyFile(join(first, f), join(bad, f));
        }
        for (const f of ["value_head.safetensors", "optimizer.safetensors", "trainer_state.json"]) {
          await Deno.copyFile(join(first, f), join(bad, f));
        }
      };
      const paramsBefore = values(b.policyParameters()), optBefore = optimizerState(optB);
      const expectError = async (re: RegExp): Promise<void> => {
        await assert.rejects(() => loadCheckpoint(bad, b, optB), re);
        assert.deepEqual(values(b.policyParameters()), paramsBefore);
        assert.deepEqual(optimizerState(optB), optBefore);
      };
      await copy();
      await Deno.remove(join(bad, "trainer_state.json"));
      await expectError(/broken[\\/]trainer_state\.json: cannot read/);
      await copy();
      await Deno.writeTextFile(
        join(bad, "trainer_state.json"),
        '{"format": "moerl-trainer-state/1", "step": ',
      );
      await expectError(/trainer_state\.json: corrupt \(not JSON\)/);
      // JSON, but no position in the epoch to resume the data from.
      const state = JSON.parse(await Deno.readTextFile(join(first, "trainer_state.json")));
      for (const batcherPosition of [{ epoch: 1 }, { epoch: 1, index: -1 }, { index: 3 }]) {
        await Deno.writeTextFile(
          join(bad, "trainer_state.json"),
          JSON.stringify({ ...state, rng: { ...state.rng, batcherPosition } }),
        );
        await expectError(/trainer_state\.json: corrupt or of another format/);
      }
      await copy();
      await Deno.remove(join(bad, "value_head.safetensors"));
      await expectError(/value_head\.safetensors: missing \(incomplete checkpoint\?\)/);
      await copy();
      const opt = await Deno.readFile(join(bad, "optimizer.safetensors"));
      await Deno.writeFile(join(bad, "optimizer.safetensors"), opt.subarray(0, opt.length - 100));
      await expectError(/optimizer\.safetensors/);
      await copy();
      const ad = await Deno.readFile(join(bad, "adapter", "adapter_model.safetensors"));
      await Deno.writeFile(join(bad, "adapter", "adapter_model.safetensors"), ad.subarray(0, 20));
      await expectError(/adapter_model\.safetensors/);
      await copy();
      const cfgPath = join(bad, "adapter", "adapter_config.json");
      const pc = JSON.parse(await Deno.readTextFile(cfgPath));
      await Deno.writeTextFile(cfgPath, JSON.stringify({ ...pc, r: 8 }));
      await expectError(/adapter_config\.json: r 8, lora_alpha 8; these adapters have r 4, alpha 8/);
      await Deno.writeTextFile(cfgPath, JSON.stringify({ ...pc, use_dora: true }));
      await expectError(/adapter_config\.json: use_dora is not supported/);
      // Read as loadPeftAdapter reads it: an absent lora_alpha is PEFT's default 8, which these adapters have.
      const { lora_alpha: _, ...withoutAlpha } = pc;
      await Deno.writeTextFile(cfgPath, JSON.stringify(withoutAlpha));
      assert.equal((await loadCheckpoint(bad, b, optB)).step, 2);
      // A differently built optimizer (one group) is refused.
      using other = new AdamW([{ params: b.policyParameters(), lr: 1 }]);
      await assert.rejects(() => loadCheckpoint(first, b, other), /saved groups of \[\d+, 4\] parameters/);
      await Deno.remove(bad, { recursive: true });
    });

    await t.step("pruning keeps the newest; a resumed run drops later checkpoints", async () => {
      // A process killed mid-save leaves a hidden partial folder: ignored, and removed by the next save.
      await Deno.mkdir(join(run, ".checkpoint-9.123-abcd.partial", "adapter"), { recursive: true });
      assert.equal(await latestCheckpoint(run), first);
      for (const step of [4, 6, 8]) {
        await saveCheckpoint(run, { policy: a, optimizer: optA, step, rng: { ...RNG, step }, keepLast: 2 });
      }
      assert.deepEqual((await listCheckpoints(run)).map((c) => c.step), [6, 8]);
      await saveCheckpoint(run, { policy: a, optimizer: optA, step: 7, rng: { ...RNG, step: 7 } });
      assert.deepEqual((await listCheckpoints(run)).map((c) => c.step), [6, 7]);
      assert.equal(await latestCheckpoint(run), join(run, "checkpoint-7"));
      // Saving the same step again replaces it.
      await saveCheckpoint(run, { policy: a, optimizer: optA, step: 7, rng: { ...RNG, step: 7 } });
      assert.deepEqual((await listCheckpoints(run)).map((c) => c.step), [6, 7]);
      const names = [];
      for await (const e of Deno.readDir(run)) names.push(e.name);
      assert.deepEqual(names.sort(), ["checkpoint-6", "checkpoint-7", "latest"]);
      // A stale `latest` falls back to the newest complete checkpoint.
      await Deno.writeTextFile(join(run, "latest"), "checkpoint-99\n");
      assert.equal(await latestCheckpoint(run), join(run, "checkpoint-7"));
    });

    a.dispose();
    b.dispose();
  }
  await Deno.remove(run, { recursive: true });
  assert.equal(liveTensors(), live, "no tensor leaked");
});

/** Random adapters on model, saved with savePeftAdapter and copied into fresh ones. */
async function roundTrip(model: CausalLM, cfg: LoraConfig): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "moerl-peft-" });
  const src = new LoraModel(model.decoder, model.config, cfg);
  noGrad(() => tidy(() => src.parameters().forEach((p) => p.copy_(randn(p.shape, { device: p.device })))));
  const want = values(src.parameters());
  await savePeftAdapter(src, model.config, dir);
  src.dispose();
  const dst = new LoraModel(model.decoder, model.config, cfg);
  try {
    assert.notDeepEqual(values(dst.parameters()), want);
    await copyAdapterInto(dst, model.config, dir);
    assert.deepEqual(values(dst.parameters()), want);
  } finally {
    dst.dispose();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("checkpoint: PEFT adapters copy into existing adapters (fused, split, PhiMoE names)", async () => {
  const live = liveTensors();
  manualSeed(3);
  {
    using qwen = await loadModel(join(MODELS, "qwen3-moe-tiny"), { device: DEVICE, dtype: FLOAT });
    await roundTrip(qwen, LORA);
    await roundTrip(qwen, { ...LORA, expertForm: "split" });
    using phi = await loadModel(join(MODELS, "phimoe-tiny"), { device: DEVICE, dtype: FLOAT });
    await roundTrip(phi, { ...LORA, targetModules: ["q_proj", "v_proj", "gate"] });
  }
  assert.equal(liveTensors(), live);
});

Deno.test("checkpoint: update seeds depend on (seed, update) only", () => {
  assert.equal(updateSeed(0, 5), updateSeed(0, 5));
  const seeds = new Set(Array.from({ length: 1000 }, (_, u) => updateSeed(0, u)));
  assert.equal(seeds.size, 1000);
  assert.notEqual(updateSeed(0, 1), updateSeed(1, 1));
  assert.ok([...seeds].every((s) => Number.isInteger(s) && s >= 0 && s < 2 ** 32));
});
