/**
 * The policy for PPO: a causal LM with LoRA adapters and a value head. One
 * forward pass gives, for each completion token, its log-probability, the
 * entropy of the distribution it was drawn from and the critic's value; the
 * reference log-probabilities come from the same weights with the adapters
 * switched off (no second copy of the model).
 *
 * Alignment: every per-token tensor is [B, T] like the input ids; position t
 * describes token t given tokens < t (position 0 and non-completion tokens
 * are 0 and masked out).
 * @module
 */
import { cat, embedding, noGrad, type Tensor, tensor, tidy, zeros } from "../ffi/mod.ts";
import type { CausalLM } from "../model/model.ts";
import { type LoraConfig, LoraModel } from "../model/lora_apply.ts";
import { ValueHead } from "../model/value_head.ts";
import type { ForwardInput } from "../model/decoder.ts";

/** Prompt + completion sequences, left-padded, as tensors on the model's device. */
export interface SequenceBatch {
  /** Token ids [B, T], int64. */
  inputIds: Tensor;
  /** 1 for real tokens, 0 for padding [B, T]. */
  attentionMask: Tensor;
  /** Positions [B, T] (cumsum(mask) − 1, pads 1). */
  positionIds: Tensor;
  /** 1 for completion tokens (those the policy generated) [B, T]. */
  completionMask: Tensor;
}

/** Per-token outputs, each [B, T]; see the module doc for the alignment. */
export interface PolicyOutput {
  /** log π(token_t | tokens_<t), float32. */
  logprobs: Tensor;
  /** Entropy of π(· | tokens_<t), float32. */
  entropy: Tensor;
  /** The critic's value of the state before token t (on detached hidden states), float32. */
  values: Tensor;
  /** 1.0 where the quantities above are defined (completion tokens), float32. */
  mask: Tensor;
  /** Router logits [B·T, E] of each MoE layer (plain forward only; not with checkpointing). */
  routerLogits?: Tensor[];
}

/** How to build a {@link Policy}. */
export interface PolicyOptions {
  /** Adapter configuration. */
  lora: LoraConfig;
  /** Recompute each layer in the backward pass instead of keeping its activations. */
  checkpointing?: boolean;
  /** MoE dispatch in training forwards (default "loop": exact, no wasted expert FLOPs). */
  dispatch?: "loop" | "dense";
}

/** Statistics of log-probabilities under a distribution given as logits [N, V] (float32). */
function tokenStats(logits: Tensor, targets: Tensor): { logprobs: Tensor; entropy: Tensor } {
  return tidy(() => {
    const lse = logits.logsumexp(-1, true); // [N, 1]
    const logp = logits.sub(lse);
    const picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1);
    const entropy = logp.exp().mul(logp).sum(-1).neg();
    return { logprobs: picked, entropy };
  });
}

/**
 * One value per sequence [B]: the value at each row's first completion token,
 * i.e. of the prompt's final state (what a scalar reward is regressed on).
 */
export function sequenceValues(out: PolicyOutput): Tensor {
  return tidy(() => out.values.gather(1, out.mask.argmax(1, true)).squeeze(1));
}

/** A LoRA-adapted causal LM with a value head. */
export class Policy {
  /** The model (its base weights frozen). */
  readonly model: CausalLM;
  /** The adapters. */
  readonly lora: LoraModel;
  /** The critic. */
  readonly valueHead: ValueHead;
  /** Options in force. */
  readonly opts: PolicyOptions;
  /** Recompute layers in backward (see {@link PolicyOptions.checkpointing}); may be switched between steps. */
  checkpointing: boolean;

  /** Adds adapters and a fresh value head to model. */
  constructor(model: CausalLM, opts: PolicyOptions, valueHead?: ValueHead) {
    this.model = model;
    this.checkpointing = opts.checkpointing ?? false;
    this.opts = opts;
    this.lora = new LoraModel(model.decoder, model.config, opts.lora);
    const embed = model.decoder.embed;
    this.valueHead = valueHead ?? ValueHead.create(model.config.hiddenSize, { device: embed.device });
  }

  /** Trainable tensors of the policy (the adapters) — updated by the policy loss only. */
  policyParameters(): Tensor[] {
    return this.lora.parameters();
  }

  /** Trainable tensors of the critic — updated by the value loss only. */
  valueParameters(): Tensor[] {
    return this.valueHead.parameters();
  }

  /** Dropout on (training) or off (rollouts, evaluation). */
  train(training: boolean): void {
    this.lora.state.training = training;
  }

  #input(batch: SequenceBatch): ForwardInput {
    return {
      inputIds: batch.inputIds,
      positionIds: batch.positionIds,
      attentionMask: batch.attentionMask,
      skipLogits: true,
      dispatch: this.opts.dispatch ?? "loop",
    };
  }

  /**
   * Log-probs, entropy and values from final hidden states [B, T, H]. Only
   * completion positions go through the LM head (saves a [B, T, V] tensor).
   */
  head(hidden: Tensor, batch: SequenceBatch, withValues = true): PolicyOutput {
    return tidy(() => {
      const [b, t, h] = hidden.shape as [number, number, number];
      const mask = batch.completionMask.narrow(1, 1, t - 1).to("float32"); // token t+1 predicted at t
      const flatMask = mask.reshape([-1]).toArray();
      const rows = flatMask.flatMap((m, i) => (m > 0 ? [i] : []));
      const device = hidden.device;
      const idx = tensor(rows, { dtype: "int64", device });
      const states = hidden.narrow(1, 0, t - 1).reshape([-1, h]).indexSelect(0, idx); // [N, H]
      const targets = batch.inputIds.narrow(1, 1, t - 1).reshape([-1]).indexSelect(0, idx);
      const logits = this.model.decoder.lmHead.forward(states).to("float32");
      const stats = tokenStats(logits, targets);
      const spread = (x: Tensor): Tensor => {
        const full = zeros([b * (t - 1)], { dtype: "float32", device }).indexAdd(0, idx, x);
        return cat([zeros([b, 1], { dtype: "float32", device }), full.reshape([b, t - 1])], 1);
      };
      const values = withValues
        ? spread(this.valueHead.forward(states.detach()))
        : zeros([b, t], { dtype: "float32", device });
      return {
        logprobs: spread(stats.logprobs),
        entropy: spread(stats.entropy),
        values,
        mask: cat([zeros([b, 1], { dtype: "float32", device }), mask], 1),
      };
    });
  }

  /** One forward pass with autograd (unless inside noGrad): the policy's outputs. */
  forward(batch: SequenceBatch): PolicyOutput {
    return tidy(() => {
      const f = this.model.decoder.forward(this.#input(batch));
      return { ...this.head(f.hidden, batch), routerLogits: f.routerLogits };
    });
  }

  /** Log-probs of the completion tokens under the frozen base (adapters off), without autograd. */
  referenceLogprobs(batch: SequenceBatch): Tensor {
    const prev = this.lora.state.enabled;
    this.lora.state.enabled = false;
    try {
      return noGrad(() =>
        tidy(() => this.head(this.model.decoder.forward(this.#input(batch)).hidden, batch, false).logprobs)
      );
    } finally {
      this.lora.state.enabled = prev;
    }
  }

  /**
   * Computes loss = lossFn(outputs) and back-propagates it into the adapters
   * and the value head, with or without gradient checkpointing. Returns the
   * loss value; the outputs are freed.
   */
  backward(batch: SequenceBatch, lossFn: (out: PolicyOutput) => Tensor): number {
    if (this.checkpointing && this.opts.lora.dropout > 0 && this.lora.state.training) {
      throw new Error(
        "gradient checkpointing needs lora dropout 0 (the recomputed pass would draw new dropout masks)",
      );
    }
    if (!this.checkpointing) {
      return tidy(() => {
        const loss = lossFn(this.forward(batch));
        loss.backward();
        return loss.item();
      });
    }
    return this.#checkpointedBackward(batch, lossFn);
  }

  /**
   * Gradient checkpointing by hand: a no-grad pass keeps only each layer's
   * input; the loss is back-propagated to the last hidden state, then each
   * layer is recomputed with autograd and back-propagated in turn. Peak
   * activation memory is one layer's instead of all layers'.
   */
  #checkpointedBackward(batch: SequenceBatch, lossFn: (out: PolicyOutput) => Tensor): number {
    const decoder = this.model.decoder;
    const input = this.#input(batch);
    return tidy(() => {
      const ctx = decoder.prepare(input);
      const inputs: Tensor[] = [];
      let h = noGrad(() => embedding(decoder.embed, batch.inputIds));
      for (let i = 0; i < decoder.layers.length; i++) {
        inputs.push(h);
        h = noGrad(() => decoder.layer(i, h, ctx).h);
      }
      // Loss side: final norm, head, loss; its gradient w.r.t. the last hidden state.
      let grad = tidy(() => {
        const last = h.detach().setRequiresGrad(true);
        const loss = lossFn(this.head(decoder.finalNorm.forward(last), batch));
        loss.backward();
        return { g: last.grad!, loss: loss.item() };
      });
      const lossValue = grad.loss;
      for (let i = decoder.layers.length - 1; i >= 0; i--) {
        const next = tidy(() => {
          const x = inputs[i]!.detach().setRequiresGrad(true);
          decoder.layer(i, x, ctx).h.backward(grad.g);
          return { g: x.grad!, loss: lossValue };
        });
        grad.g.dispose();
        inputs[i]!.dispose();
        grad = next;
      }
      return lossValue;
    });
  }

  /** Removes the adapters and frees them and the value head (the model stays loaded). */
  dispose(): void {
    this.lora.dispose();
    this.valueHead.dispose();
  }
}
