/**
 * The policy for PPO: a causal LM with LoRA adapters, and a value head (the
 * critic). One forward pass gives, for each completion token, its
 * log-probability and the entropy of the distribution it was drawn from; the
 * reference pass runs the same weights with the adapters switched off (no
 * second copy of the model) and also yields the hidden states the critic
 * reads.
 *
 * Alignment: every per-token tensor is [B, T] like the input ids; position t
 * describes token t given tokens < t (position 0 and non-completion tokens
 * are 0 and masked out). "Completion states" are the final hidden states
 * that predict completion tokens, [N, H] in row-major order of the mask: the
 * state before each completion token, so a value read from it never sees the
 * token it judges.
 *
 * The critic reads the frozen base model's states (from the reference pass),
 * not the adapted policy's: its inputs do not drift as the policy trains, and
 * with a KL penalty it costs no pass of its own.
 * @module
 */
import {
  cat,
  embedding,
  noGrad,
  type Tensor,
  tensor,
  tidy,
  tokenLogprobs as fusedLogprobs,
  tokenStats as fusedStats,
  zeros,
} from "../ffi/mod.ts";
import { Linear } from "../model/layers.ts";
import type { CausalLM } from "../model/model.ts";
import { type LoraConfig, LoraModel } from "../model/lora_apply.ts";
import { ValueHead } from "../model/value_head.ts";
import type { ForwardInput } from "../model/decoder.ts";
import type { MoeDispatch } from "../model/moe.ts";

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
  /**
   * Where each row's completion is its last `completionLengths[r]` tokens (as rl/rollout_buffer.ts
   * `sequenceBatch` lays it out), the lengths on the host: the passes then find the completion tokens without
   * reading the mask back from the device. Leave it out for any other layout.
   */
  completionLengths?: readonly number[];
}

/** How a pass computes its distributions. */
export interface PassOptions {
  /** Logits are divided by this before the softmax: the sampling temperature (default 1). */
  temperature?: number;
  /** Routing replay: experts per MoE layer, [B·T, k] with −1 where the router chooses (model/decoder.ts). */
  replay?: readonly Tensor[] | null;
}

/** Per-token outputs, each [B, T]; see the module doc for the alignment. */
export interface PolicyOutput {
  /** log π(token_t | tokens_<t) under the tempered distribution, float32. */
  logprobs: Tensor;
  /** Entropy of the tempered π(· | tokens_<t), float32. */
  entropy: Tensor;
  /** 1.0 where the quantities above are defined (completion tokens), float32. */
  mask: Tensor;
  /** Router logits [B·T, E] of each MoE layer (plain forward only; not with checkpointing). */
  routerLogits?: Tensor[];
}

/** What {@link Policy.reference} returns. */
export interface ReferenceOutput {
  /** Log-probs [B, T] of the completion tokens under the frozen base, or null when not asked for. */
  logprobs: Tensor | null;
  /** The base model's completion states [N, H] (detached), for the critic. */
  states: Tensor;
}

/** How to build a {@link Policy}. */
export interface PolicyOptions {
  /** Adapter configuration. */
  lora: LoraConfig;
  /** Recompute each layer in the backward pass instead of keeping its activations. */
  checkpointing?: boolean;
  /**
   * MoE dispatch in training forwards (default: "grouped" where libtorch has grouped GEMM, else "loop";
   * both do only the routed experts' work).
   */
  dispatch?: MoeDispatch;
  /**
   * Tokens per chunk of the LM head's log-softmax and entropy (default
   * {@link DEFAULT_HEAD_CHUNK}). Each chunk's logits are made, reduced to
   * two numbers per token and dropped; backward makes them again, so no
   * [tokens, vocab] float32 tensor is ever whole. 0: all tokens at once with
   * plain autograd ops, which keep ≈ 3 such tensors until backward. A head
   * that is not a plain {@link Linear} (adapted or 4-bit) always takes the
   * plain path.
   */
  headChunk?: number;
}

/** Default {@link PolicyOptions.headChunk}: 512 tokens × a 152k vocabulary is 311 MB of float32 per temporary. */
export const DEFAULT_HEAD_CHUNK = 512;

function checkHeadChunk(v: unknown): number {
  if (v === undefined) return DEFAULT_HEAD_CHUNK;
  if (typeof v === "number" && Number.isInteger(v) && v >= 0) return v;
  throw new RangeError(
    `Policy: headChunk must be a whole number of tokens ≥ 1, or 0 for the unchunked head; got ${v}`,
  );
}

/**
 * Log-probs of the targets under the tempered distribution given by logits [N, V] (float32), and its entropy
 * when asked for (null otherwise).
 */
function plainStats(
  logits: Tensor,
  targets: Tensor,
  temperature: number,
  withEntropy: boolean,
): { logprobs: Tensor; entropy: Tensor | null } {
  return tidy(() => {
    const x = temperature === 1 ? logits : logits.div(temperature);
    const logp = x.sub(x.logsumexp(-1, true));
    const picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1);
    return { logprobs: picked, entropy: withEntropy ? logp.exp().mul(logp).sum(-1).neg() : null };
  });
}

/** Where the completion tokens of a batch are, and how to lay [N] values out as [B, T]. */
class CompletionLayout {
  readonly mask: Tensor;
  readonly #idx: Tensor;
  readonly #b: number;
  readonly #t: number;

  constructor(batch: SequenceBatch) {
    const [b, t] = batch.inputIds.shape as [number, number];
    const predicted = tidy(() => batch.completionMask.narrow(1, 1, t - 1).to("float32")); // token t+1 predicted at t
    // Row r's completion tokens are predicted at positions t − 1 − c_r ... t − 2 of its t − 1.
    const lengths = batch.completionLengths;
    const rows = lengths
      ? lengths.flatMap((c, r) => Array.from({ length: c }, (_, j) => r * (t - 1) + t - 1 - c + j))
      : predicted.reshape([-1]).toArray().flatMap((m, i) => (m > 0 ? [i] : []));
    this.#idx = tensor(rows, { dtype: "int64", device: batch.inputIds.device });
    this.mask = tidy(() =>
      cat([zeros([b, 1], { dtype: "float32", device: predicted.device }), predicted], 1)
    );
    predicted.dispose();
    [this.#b, this.#t] = [b, t];
  }

  /** The rows [N, H] of hidden [B, T, H] that predict completion tokens. */
  states(hidden: Tensor): Tensor {
    return tidy(() =>
      hidden.narrow(1, 0, this.#t - 1).reshape([-1, hidden.size(-1)]).indexSelect(0, this.#idx)
    );
  }

  /** The completion tokens [N]. */
  targets(inputIds: Tensor): Tensor {
    return tidy(() => inputIds.narrow(1, 1, this.#t - 1).reshape([-1]).indexSelect(0, this.#idx));
  }

  /** x [N] laid out as [B, T] (0 elsewhere), position t holding token t's value. */
  spread(x: Tensor): Tensor {
    return tidy(() => {
      const f = { dtype: "float32" as const, device: x.device };
      const full = zeros([this.#b * (this.#t - 1)], f).indexAdd(0, this.#idx, x.to("float32"));
      return cat([zeros([this.#b, 1], f), full.reshape([this.#b, this.#t - 1])], 1);
    });
  }

  dispose(): void {
    this.#idx.dispose();
    this.mask.dispose();
  }
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
  /** Tokens per LM-head chunk (see {@link PolicyOptions.headChunk}). */
  readonly headChunk: number;
  #disposed = false;

  /** Adds adapters and a fresh value head to model. */
  constructor(model: CausalLM, opts: PolicyOptions, valueHead?: ValueHead) {
    this.model = model;
    this.checkpointing = opts.checkpointing ?? false;
    this.headChunk = checkHeadChunk(opts.headChunk);
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

  /** Dropout on (training) or off (rollouts, evaluation, old and reference passes). */
  train(training: boolean): void {
    this.lora.state.training = training;
  }

  /** True once {@link dispose}d: the model then runs without these adapters, so nothing may use it. */
  get disposed(): boolean {
    return this.#disposed;
  }

  /**
   * Throws when the policy was disposed (its model would silently run as the base model).
   * @throws {Error} naming what tried to use it
   */
  checkAlive(what: string): void {
    if (this.#disposed) throw new Error(`${what}: the policy was disposed (its adapters are gone)`);
  }

  #input(batch: SequenceBatch, opts: PassOptions): ForwardInput {
    this.checkAlive("Policy");
    return {
      inputIds: batch.inputIds,
      positionIds: batch.positionIds,
      attentionMask: batch.attentionMask,
      skipLogits: true,
      dispatch: this.opts.dispatch,
      replay: opts.replay ?? null,
    };
  }

  /**
   * Log-probs and entropy from final hidden states [B, T, H]. Only completion
   * positions go through the LM head (saves a [B, T, V] tensor).
   */
  head(hidden: Tensor, batch: SequenceBatch, opts: PassOptions = {}): PolicyOutput {
    const layout = new CompletionLayout(batch);
    try {
      return tidy(() => this.#stats(layout.states(hidden), layout, batch, opts));
    } finally {
      layout.dispose();
    }
  }

  /** Log-probs and entropy [B, T] from completion states [N, H] laid out by layout. */
  #stats(states: Tensor, layout: CompletionLayout, batch: SequenceBatch, opts: PassOptions): PolicyOutput {
    return tidy(() => {
      const stats = this.#headStats(states, layout, batch, opts, true);
      return {
        logprobs: layout.spread(stats.logprobs),
        entropy: layout.spread(stats.entropy!),
        mask: layout.mask.clone(),
      };
    });
  }

  /** Log-probs [B, T] alone from completion states [N, H]: no entropy is computed. */
  #logprobs(states: Tensor, layout: CompletionLayout, batch: SequenceBatch, opts: PassOptions): Tensor {
    return tidy(() => layout.spread(this.#headStats(states, layout, batch, opts, false).logprobs));
  }

  /**
   * The LM head's [N] log-probs of the completion tokens (and entropies, with withEntropy): chunked (fused)
   * for a plain Linear head when headChunk > 0 (see {@link PolicyOptions.headChunk}), else over full logits.
   */
  #headStats(
    states: Tensor,
    layout: CompletionLayout,
    batch: SequenceBatch,
    opts: PassOptions,
    withEntropy: boolean,
  ): { logprobs: Tensor; entropy: Tensor | null } {
    return tidy(() => {
      const head = this.model.decoder.lmHead, targets = layout.targets(batch.inputIds);
      const temperature = opts.temperature ?? 1;
      if (!(this.headChunk > 0 && head instanceof Linear)) {
        return plainStats(head.forward(states).to("float32"), targets, temperature, withEntropy);
      }
      const { weight, bias } = head;
      return withEntropy ? fusedStats(states, weight, bias, targets, temperature, this.headChunk) : {
        logprobs: fusedLogprobs(states, weight, bias, targets, temperature, this.headChunk),
        entropy: null,
      };
    });
  }

  /** One forward pass with autograd (unless inside noGrad): the policy's outputs. */
  forward(batch: SequenceBatch, opts: PassOptions = {}): PolicyOutput {
    return tidy(() => {
      const f = this.model.decoder.forward(this.#input(batch, opts));
      return { ...this.head(f.hidden, batch, opts), routerLogits: f.routerLogits };
    });
  }

  /**
   * The policy's log-probs [B, T] of the completion tokens, without autograd
   * and without the entropy (the old-policy pass of an update needs no more).
   */
  logprobs(batch: SequenceBatch, opts: PassOptions = {}): Tensor {
    return noGrad(() =>
      tidy(() => {
        const hidden = this.model.decoder.forward(this.#input(batch, opts)).hidden;
        const layout = new CompletionLayout(batch);
        try {
          return this.#logprobs(layout.states(hidden), layout, batch, opts);
        } finally {
          layout.dispose();
        }
      })
    );
  }

  /**
   * The frozen base (adapters off), without autograd: the completion tokens'
   * log-probs (skipped with `logprobs: false`) and the completion states the
   * critic reads.
   */
  reference(batch: SequenceBatch, opts: PassOptions & { logprobs?: boolean } = {}): ReferenceOutput {
    const prev = this.lora.state.enabled;
    this.lora.state.enabled = false;
    try {
      return noGrad(() =>
        tidy(() => {
          const hidden = this.model.decoder.forward(this.#input(batch, opts)).hidden;
          const layout = new CompletionLayout(batch);
          try {
            const states = layout.states(hidden);
            const logprobs = opts.logprobs === false ? null : this.#logprobs(states, layout, batch, opts);
            return { logprobs, states };
          } finally {
            layout.dispose();
          }
        })
      );
    } finally {
      this.lora.state.enabled = prev;
    }
  }

  /** The critic's values [B, T] (0 off the completions) of completion states [N, H], with autograd into the head. */
  values(states: Tensor, batch: SequenceBatch): Tensor {
    const layout = new CompletionLayout(batch);
    try {
      return tidy(() => layout.spread(this.valueHead.forward(states.detach())));
    } finally {
      layout.dispose();
    }
  }

  /**
   * Computes loss = lossFn(outputs) and back-propagates it into the adapters,
   * with or without gradient checkpointing. Returns the loss value; the
   * outputs are freed.
   */
  backward(batch: SequenceBatch, lossFn: (out: PolicyOutput) => Tensor, opts: PassOptions = {}): number {
    using loss = this.backwardLoss(batch, lossFn, opts);
    return loss.item();
  }

  /**
   * As {@link backward}, but the loss stays on the device (detached): reading
   * it waits for the device, so a loop over micro-batches reads once at the end.
   */
  backwardLoss(batch: SequenceBatch, lossFn: (out: PolicyOutput) => Tensor, opts: PassOptions = {}): Tensor {
    if (this.checkpointing && this.opts.lora.dropout > 0 && this.lora.state.training) {
      throw new Error(
        "gradient checkpointing needs lora dropout 0 (the recomputed pass would draw new dropout masks)",
      );
    }
    if (!this.checkpointing) {
      return tidy(() => {
        const loss = lossFn(this.forward(batch, opts));
        loss.backward();
        return loss.detach();
      });
    }
    return this.#checkpointedBackward(batch, lossFn, opts);
  }

  /**
   * Gradient checkpointing by hand: a no-grad pass keeps only each layer's
   * input; the loss is back-propagated to the last hidden state, then each
   * layer is recomputed with autograd and back-propagated in turn. Peak
   * activation memory is one layer's instead of all layers'.
   */
  #checkpointedBackward(
    batch: SequenceBatch,
    lossFn: (out: PolicyOutput) => Tensor,
    opts: PassOptions,
  ): Tensor {
    const decoder = this.model.decoder;
    const input = this.#input(batch, opts);
    return tidy(() => {
      const ctx = decoder.prepare(input);
      const inputs: Tensor[] = [];
      let h = noGrad(() => embedding(decoder.embed, batch.inputIds));
      for (let i = 0; i < decoder.layers.length; i++) {
        inputs.push(h);
        h = noGrad(() => decoder.layer(i, h, ctx).h);
      }
      // Loss side: final norm, head, loss; its gradient w.r.t. the last hidden state.
      const top = tidy(() => {
        const last = h.detach().setRequiresGrad(true);
        const loss = lossFn(this.head(decoder.finalNorm.forward(last), batch, opts));
        loss.backward();
        return { g: last.grad!, loss: loss.detach() };
      });
      let g = top.g;
      for (let i = decoder.layers.length - 1; i >= 0; i--) {
        const next = tidy(() => {
          const x = inputs[i]!.detach().setRequiresGrad(true);
          decoder.layer(i, x, ctx).h.backward(g);
          return x.grad!;
        });
        g.dispose();
        inputs[i]!.dispose();
        g = next;
      }
      return top.loss;
    });
  }

  /** Removes the adapters and frees them and the value head (the model stays loaded). */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.lora.dispose();
    this.valueHead.dispose();
  }

  /** {@link dispose} at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}
