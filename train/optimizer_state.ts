/**
 * AdamW's state in a safetensors file: each parameter's first and second
 * moments under `<group>.<index>.exp_avg` / `.exp_avg_sq`, the position of
 * the parameter in `optimizer.groups` being its stable name (the groups and
 * their order come from the config, so a fresh optimizer built the same way
 * lists the same tensors in the same order). Step counts, shapes and the
 * groups' hyperparameters go in the header's metadata.
 * @module
 */
import type { AdamW, Tensor } from "../ffi/mod.ts";
import { SafetensorsFile } from "../model/safetensors.ts";
import { writeSafetensors } from "../model/safetensors_write.ts";
import { applyEntries, checkEntries, type RestoreEntry } from "../model/safetensors_copy.ts";
import type { PreparedRestore } from "./restore.ts";

/** The metadata format tag. */
export const OPTIMIZER_FORMAT = "moerl-adamw/1";

/** What the metadata records per group. */
interface GroupMeta {
  lr: number;
  weightDecay: number;
  betas: [number, number];
  eps: number;
  /** Per parameter: updates applied (0: no state yet). */
  steps: number[];
  /** Per parameter: its shape. */
  shapes: number[][];
}

/** Writes optimizer's state to path (atomically). */
export async function saveOptimizerState(optimizer: AdamW, path: string): Promise<void> {
  const tensors: Record<string, Tensor> = {};
  const groups: GroupMeta[] = optimizer.groups.map((g, gi) => ({
    lr: g.lr,
    weightDecay: g.weightDecay,
    betas: g.betas,
    eps: g.eps,
    steps: g.params.map((p, pi) => {
      const st = optimizer.state(p);
      if (!st) return 0;
      tensors[`${gi}.${pi}.exp_avg`] = st.expAvg;
      tensors[`${gi}.${pi}.exp_avg_sq`] = st.expAvgSq;
      return st.step;
    }),
    shapes: g.params.map((p) => [...p.shape]),
  }));
  await writeSafetensors(path, tensors, { format: OPTIMIZER_FORMAT, groups: JSON.stringify(groups) });
}

/**
 * Opens and checks a saved state against optimizer (same groups, parameter
 * counts and shapes) without changing it.
 * @throws {Error} naming the file when it is missing, corrupt, or from a differently built optimizer
 */
export async function prepareOptimizerRestore(optimizer: AdamW, path: string): Promise<PreparedRestore> {
  const f = await SafetensorsFile.open(path);
  try {
    const meta = f.metadata;
    if (meta.format !== OPTIMIZER_FORMAT) {
      throw new Error(`${path}: format ${JSON.stringify(meta.format)}, expected "${OPTIMIZER_FORMAT}"`);
    }
    let groups: GroupMeta[];
    try {
      groups = JSON.parse(meta.groups ?? "");
      if (!Array.isArray(groups)) throw new Error("not a list");
    } catch (e) {
      throw new Error(`${path}: corrupt "groups" metadata: ${(e as Error).message}`);
    }
    const have = optimizer.groups.map((g) => g.params.length);
    const saved = groups.map((g) => g.steps?.length);
    if (have.length !== saved.length || have.some((n, i) => n !== saved[i])) {
      throw new Error(
        `${path}: saved groups of [${saved.join(", ")}] parameters; this optimizer has [${
          have.join(", ")
        }] (built from another config?)`,
      );
    }
    const entries: RestoreEntry[] = [];
    const restored: { p: Tensor; step: number }[] = [];
    optimizer.groups.forEach((g, gi) =>
      g.params.forEach((p, pi) => {
        const shape = groups[gi]!.shapes[pi]!, step = groups[gi]!.steps[pi]!;
        if (shape.length !== p.shape.length || shape.some((s, i) => s !== p.shape[i])) {
          throw new Error(
            `${path}: parameter ${gi}.${pi} was [${shape.join(", ")}], is [${p.shape.join(", ")}]`,
          );
        }
        if (!(Number.isSafeInteger(step) && step >= 0)) {
          throw new Error(`${path}: bad step ${step} for ${gi}.${pi}`);
        }
        restored.push({ p, step });
        if (step === 0) return;
        const opts = { dtype: p.dtype, device: p.device };
        for (const m of ["exp_avg", "exp_avg_sq"] as const) {
          entries.push({
            key: `${gi}.${pi}.${m}`,
            shape: p.shape,
            like: opts,
            assign: (src) => void stateOf(optimizer, p)[m === "exp_avg" ? "expAvg" : "expAvgSq"].copy_(src),
          });
        }
      })
    );
    checkEntries(f, entries);
    return {
      apply: async () => {
        primeState(optimizer, restored.filter((r) => r.step > 0 && !optimizer.state(r.p)).map((r) => r.p));
        await applyEntries(f, entries);
        for (const { p, step } of restored) {
          const st = optimizer.state(p);
          if (!st) continue;
          st.step = step;
          if (step === 0) {
            // Saved without state: zero moments at step 0 are exactly a fresh state.
            st.expAvg.fill_(0);
            st.expAvgSq.fill_(0);
          }
        }
      },
      close: () => f.close(),
    };
  } catch (e) {
    f.close();
    throw e;
  }
}

function stateOf(optimizer: AdamW, p: Tensor): NonNullable<ReturnType<AdamW["state"]>> {
  const st = optimizer.state(p);
  if (!st) throw new Error("optimizer state was not primed");
  return st;
}

/** Allocates AdamW state (zero moments, step 0) for params that have none. */
function primeState(optimizer: AdamW, params: Tensor[]): void {
  for (const p of params) optimizer.initState(p);
}
