/**
 * The memory-bandwidth bound of a decode step: a step must read every weight
 * it uses and the whole KV cache once, so with B rows, bandwidth BW and the
 * bytes a step reads,
 *
 *   bytes/step = b·(W_shared + L_moe·E_hit·W_expert) + b·B·L·2·n_kv·d·ctx
 *   E_hit      = E·(1 − (1 − k/E)^B)   (experts a layer's B tokens reach, routing uniform)
 *   bound      = B·BW / bytes/step     tokens per second
 *
 * where b is bytes per element, W_shared the parameters every step reads
 * (attention, routers, norms, dense MLPs, the LM head), W_expert one expert's
 * (3·H·I), L the layers (L_moe of them MoE), d the head size and ctx the
 * context each row attends over. Model-bandwidth utilisation (MBU) is the
 * measured rate over this bound.
 * @module
 */
import { isMoeLayer, type MoeConfig } from "../model/config.ts";

/** What a decode step reads, by part. */
export interface StepBytes {
  /** Weights every step reads. */
  shared: number;
  /** Expert weights the step's tokens reach (expected). */
  experts: number;
  /** The KV cache. */
  kv: number;
  /** All of it. */
  total: number;
}

/** Bytes one decode step of `batch` rows reads, each row attending over `context` positions. */
export function decodeStepBytes(
  c: MoeConfig,
  batch: number,
  context: number,
  bytesPerElement: number,
): StepBytes {
  const h = c.hiddenSize, d = c.headDim, layers = c.numHiddenLayers;
  const attention = h * c.numAttentionHeads * d * 2 + h * c.numKeyValueHeads * d * 2;
  const expert = 3 * h * (c.modelType === "qwen3_moe" ? c.moeIntermediateSize : c.intermediateSize);
  let shared = c.vocabSize * h; // the LM head (the embedding reads only B rows)
  let moeLayers = 0;
  for (let i = 0; i < layers; i++) {
    shared += attention + 2 * h; // + the two norms
    if (isMoeLayer(c, i)) {
      shared += h * c.numExperts;
      moeLayers++;
    } else {
      shared += 3 * h * c.intermediateSize;
    }
  }
  const e = c.numExperts, k = c.numExpertsPerTok;
  const hit = e * (1 - Math.pow(1 - k / e, batch));
  const b = bytesPerElement;
  const parts = {
    shared: shared * b,
    experts: moeLayers * hit * expert * b,
    kv: batch * layers * 2 * c.numKeyValueHeads * d * context * b,
  };
  return { ...parts, total: parts.shared + parts.experts + parts.kv };
}

/** Tokens per second at the bandwidth bound: batch rows per step over the time to read a step's bytes. */
export function boundTokensPerSecond(bytes: StepBytes, batch: number, bandwidthGBs: number): number {
  return batch * (bandwidthGBs * 1e9) / bytes.total;
}

/** The formula, for printing beside the numbers. */
export const BANDWIDTH_FORMULA: string =
  "bound tok/s = B·BW / (b·(W_shared + L_moe·E·(1−(1−k/E)^B)·3·H·I) + b·B·L·2·n_kv·d·ctx)";
