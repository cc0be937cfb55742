/**
 * 4-bit NF4 base weights (QLoRA): {@link Nf4Linear} and {@link Nf4Experts}
 * hold bitsandbytes-compatible NF4 weights (model/nf4_codec.ts) and
 * dequantise them on the fly in each forward pass, in the activation dtype;
 * {@link quantizeModel} swaps every linear layer and every expert bank of a
 * decoder, as bnb's `load_in_4bit` does for every nn.Linear except the LM
 * head, and experts too (no expert silently stays in full precision).
 * Adapters (LoRA) wrap these layers and train on top.
 *
 * @example
 * ```ts ignore
 * using model = await loadModel(dir, { dtype: "bfloat16", device: "cuda" });
 * using q = quantizeModel(model.decoder, { doubleQuant: true });
 * console.log(q.toString()); // params, bytes before/after, bytes per parameter
 * ```
 * @module
 */
import { ELEMENT_SIZE } from "../ffi/dtype.ts";
import { type Device, linear, type Tensor, tidy } from "../ffi/mod.ts";
import type { Decoder } from "./decoder.ts";
import { LayerNorm, Linear, type LinearLayer, RmsNorm } from "./layers.ts";
import { expertSlots, linearSlots } from "./modules.ts";
import { type ExpertBank, type ExpertNames, StackedExperts } from "./moe.ts";
import { Nf4Tables, type Nf4Weight, quantizeNf4 } from "./nf4_codec.ts";

/**
 * Where a 4-bit layer's backward pass gets its weight. "redequantize" (the
 * default, as bitsandbytes' 4-bit matmul): decode it again, so autograd keeps
 * only the 4-bit parts. "keep": autograd keeps the forward pass's
 * full-precision copy until backward (one decode fewer, one dense weight per
 * layer call held through the step).
 */
export type Nf4Backward = "redequantize" | "keep";

/** Quantisation settings shared by the layers. */
export interface Nf4LayerOptions {
  /** Double-quantise the absmax (bnb compress_statistics). */
  doubleQuant?: boolean;
  /** Shared tables on the weight's device. */
  tables?: Nf4Tables;
  /** How the backward pass gets the weight (default "redequantize"). */
  backward?: Nf4Backward;
}

function checkBackward(b: unknown): Nf4Backward {
  if (b === undefined) return "redequantize";
  if (b === "redequantize" || b === "keep") return b;
  throw new RangeError(`NF4 backward must be "redequantize" or "keep", got ${JSON.stringify(b)}`);
}

/** A linear layer over an NF4 weight [out, in]; the bias (if any) stays in full precision. */
export class Nf4Linear implements LinearLayer {
  /** The 4-bit weight (owned). */
  readonly weight: Nf4Weight;
  /** Bias [out] (borrowed), or null. */
  readonly bias: Tensor | null;
  /** How the backward pass gets the weight. */
  readonly backward: Nf4Backward;
  /** Takes ownership of weight; the caller keeps the bias. */
  constructor(weight: Nf4Weight, bias: Tensor | null = null, backward: Nf4Backward = "redequantize") {
    if (weight.shape.length !== 2 || weight.batchDims !== 0) {
      throw new RangeError(`Nf4Linear: weight must be [out, in], got [${weight.shape.join(", ")}]`);
    }
    this.backward = checkBackward(backward);
    this.weight = weight;
    this.bias = bias;
  }
  /** Quantises a dense layer's weight (the original is not freed; the bias is shared). */
  static fromLinear(layer: Linear, opts: Nf4LayerOptions = {}): Nf4Linear {
    const backward = checkBackward(opts.backward);
    return new Nf4Linear(quantizeNf4(layer.weight, opts), layer.bias, backward);
  }
  /** y = x·dequant(W)ᵀ + b, W dequantised to x's dtype. */
  forward(x: Tensor): Tensor {
    if (this.backward === "redequantize") return this.weight.linear(x, this.bias);
    return tidy(() => linear(x, this.weight.dequantize(x.dtype), this.bias));
  }
  /** Frees the 4-bit weight (not the borrowed bias). */
  dispose(): void {
    this.weight.dispose();
  }
  /** Frees at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * SwiGLU experts over NF4 weights, each expert's matrix quantised on its own:
 * gateUp [E, 2I, H] and down [E, H, I]. Per-expert calls dequantise only
 * that expert; the batched calls dequantise all.
 */
export class Nf4Experts implements ExpertBank {
  /** [E, 2I, H], per expert (owned). */
  readonly gateUpWeight: Nf4Weight;
  /** [E, H, I], per expert (owned). */
  readonly downWeight: Nf4Weight;
  /** Names and stored layout (a copy of the source bank's). */
  readonly names: ExpertNames;
  /** How the backward pass gets the weights. */
  readonly backward: Nf4Backward;
  /** Takes ownership of both weights (batchDims 1). */
  constructor(
    gateUp: Nf4Weight,
    down: Nf4Weight,
    names: ExpertNames,
    backward: Nf4Backward = "redequantize",
  ) {
    this.backward = checkBackward(backward);
    for (const w of [gateUp, down]) {
      if (w.shape.length !== 3 || w.batchDims !== 1) {
        throw new RangeError(
          `Nf4Experts: weights must be [E, out, in] per expert, got [${w.shape.join(", ")}]`,
        );
      }
    }
    this.gateUpWeight = gateUp;
    this.downWeight = down;
    this.names = { ...names };
  }
  /** Quantises stacked experts (the originals are not freed). */
  static fromStacked(src: StackedExperts, opts: Nf4LayerOptions = {}): Nf4Experts {
    const backward = checkBackward(opts.backward);
    const gateUp = quantizeNf4(src.gateUpWeight, { ...opts, batchDims: 1 });
    try {
      const down = quantizeNf4(src.downWeight, { ...opts, batchDims: 1 });
      return new Nf4Experts(gateUp, down, src.names, backward);
    } catch (e) {
      gateUp.dispose();
      throw e;
    }
  }
  /** Number of experts. */
  get count(): number {
    return this.gateUpWeight.rows;
  }
  /** x W_gu[e]ᵀ, dequantising expert e only. */
  gateUp(e: number, x: Tensor): Tensor {
    return this.#one(this.gateUpWeight, e, x);
  }
  /** h W_d[e]ᵀ, dequantising expert e only. */
  down(e: number, h: Tensor): Tensor {
    return this.#one(this.downWeight, e, h);
  }
  /** Batched over experts. */
  gateUpAll(x: Tensor): Tensor {
    return this.#all(this.gateUpWeight, x);
  }
  /** Batched over experts. */
  downAll(h: Tensor): Tensor {
    return this.#all(this.downWeight, h);
  }
  #one(w: Nf4Weight, e: number, x: Tensor): Tensor {
    if (this.backward === "redequantize") return w.linear(x, null, e);
    return tidy(() => linear(x, w.dequantize(x.dtype, e)));
  }
  #all(w: Nf4Weight, x: Tensor): Tensor {
    if (this.backward === "redequantize") return w.linear(x);
    return tidy(() => x.bmm(w.dequantize(x.dtype).transpose(1, 2)));
  }
  /** Bytes held by both weights. */
  bytes(): number {
    return this.gateUpWeight.bytes() + this.downWeight.bytes();
  }
  /** Frees both weights. */
  dispose(): void {
    this.gateUpWeight.dispose();
    this.downWeight.dispose();
  }
  /** Frees at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Role of a quantisable part: as {@link linearSlots}' roles, plus "experts". */
export type Nf4Role = "linear" | "router" | "lm_head" | "experts";

/** Options for {@link quantizeModel}. */
export interface QuantizeModelOptions {
  /** Double-quantise the absmax (bnb compress_statistics; ≈ 0.516 instead of 0.5625 bytes/param). */
  doubleQuant?: boolean;
  /**
   * Parts to keep in full precision, by Hugging Face module name. Default:
   * only "lm_head" (transformers' BitsAndBytesConfig default); routers
   * (`*.mlp.gate`) are quantised as bnb does unless skipped here.
   */
  skip?: (name: string, role: Nf4Role) => boolean;
  /** Dispose the replaced full-precision weights right away (default true). */
  disposeOriginals?: boolean;
  /** How the layers' backward passes get their weights (default "redequantize"; see {@link Nf4Backward}). */
  backward?: Nf4Backward;
}

/** One quantised part. */
export interface QuantEntry {
  /** Hugging Face module name. */
  name: string;
  /** What it is. */
  role: Nf4Role;
  /** Parameters quantised (for an expert bank, both weights of every expert). */
  params: number;
  /** Bytes of the full-precision weights replaced (biases excluded: they stay). */
  bytesBefore: number;
  /** Bytes of their NF4 replacement. */
  bytesAfter: number;
}

/**
 * What {@link quantizeModel} did, and the owner of the NF4 weights it made.
 * A CausalLM adopts the report and frees it with itself.
 */
export class QuantReport {
  /** Quantised parts, in model order. */
  readonly entries: QuantEntry[];
  /** Names kept in full precision (skipped). */
  readonly skipped: string[];
  /** Whether the absmax was double quantised. */
  readonly doubleQuant: boolean;
  /** Bytes of the shared code tables (one set per device, ≈ 4 KB). */
  readonly tableBytes: number;
  readonly #owned: { dispose(): void }[];

  /** Made by {@link quantizeModel}. */
  constructor(
    entries: QuantEntry[],
    skipped: string[],
    doubleQuant: boolean,
    tableBytes: number,
    owned: { dispose(): void }[],
  ) {
    this.entries = entries;
    this.skipped = skipped;
    this.doubleQuant = doubleQuant;
    this.tableBytes = tableBytes;
    this.#owned = owned;
  }
  /** Parameters quantised. */
  get params(): number {
    return this.entries.reduce((a, e) => a + e.params, 0);
  }
  /** Bytes those parameters took in full precision. */
  get bytesBefore(): number {
    return this.entries.reduce((a, e) => a + e.bytesBefore, 0);
  }
  /** Bytes they take now (packed codes and statistics; tables excluded). */
  get bytesAfter(): number {
    return this.entries.reduce((a, e) => a + e.bytesAfter, 0);
  }
  /** bytesAfter / params: 0.5625 without double quantisation, ≈ 0.516 with. */
  get bytesPerParam(): number {
    return this.params === 0 ? 0 : this.bytesAfter / this.params;
  }
  /** A one-line summary. */
  toString(): string {
    const mb = (b: number): string => (b / 2 ** 20).toFixed(2);
    const perParam = this.bytesPerParam.toFixed(4);
    return `NF4${this.doubleQuant ? "+DQ" : ""}: ${this.entries.length} parts, ${this.params} params, ` +
      `${mb(this.bytesBefore)} MiB → ${mb(this.bytesAfter)} MiB (${perParam} B/param), ` +
      `skipped: ${this.skipped.join(", ") || "none"}`;
  }
  /** Frees every NF4 weight made (the decoder's quantised layers become unusable). */
  dispose(): void {
    for (const o of this.#owned.splice(0)) o.dispose();
  }
  /** Frees at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

const bytesOf = (t: Tensor): number => t.numel * ELEMENT_SIZE[t.dtype];

/**
 * Replaces every linear layer (attention, dense MLP, routers) and every
 * expert bank of decoder with NF4 versions, except the parts `skip` keeps
 * (default: lm_head), and frees the replaced full-precision weights unless
 * something else in the decoder still uses them (the embedding, tied to an
 * unquantised LM head; skipped parts; biases, which stay in full precision).
 * Throws before changing anything if a part to quantise is neither a plain
 * {@link Linear} / {@link StackedExperts} nor already NF4 (e.g. an adapter
 * was attached first), and after, if any expert bank or linear layer not
 * skipped is not NF4. Takes a decoder or a loaded model (CausalLM). The NF4
 * weights made belong to the returned report; a CausalLM adopts the report
 * and frees it with the model (disposing it earlier is allowed).
 */
export function quantizeModel(
  model: Decoder | { decoder: Decoder; adopt?(d: { dispose(): void }): void },
  opts: QuantizeModelOptions = {},
): QuantReport {
  const decoder = "decoder" in model ? model.decoder : model;
  const owner = "adopt" in model ? model : null;
  const skip = opts.skip ?? ((name: string) => name === "lm_head");
  const doubleQuant = opts.doubleQuant ?? false;
  const backward = checkBackward(opts.backward);
  const lin = linearSlots(decoder).map((s) => ({ ...s, skip: skip(s.name, s.role) }));
  const exp = expertSlots(decoder).map((s) => ({ ...s, skip: skip(s.name, "experts") }));
  for (const s of lin) {
    const l = s.get();
    if (!s.skip && !(l instanceof Linear) && !(l instanceof Nf4Linear)) {
      throw new TypeError(
        `quantizeModel: ${s.name} is a ${l.constructor.name}, not a Linear; quantise before adapting`,
      );
    }
  }
  for (const s of exp) {
    const b = s.get();
    if (!s.skip && !(b instanceof StackedExperts) && !(b instanceof Nf4Experts)) {
      throw new TypeError(
        `quantizeModel: ${s.name} is a ${b.constructor.name}, not StackedExperts; quantise before adapting`,
      );
    }
  }
  // Tensors that stay in use, and how many parts to quantise use each weight.
  const kept = new Set<Tensor>([decoder.embed]);
  const uses = new Map<Tensor, number>();
  const use = (t: Tensor): void => void uses.set(t, (uses.get(t) ?? 0) + 1);
  for (const s of lin) {
    const l = s.get();
    if (!(l instanceof Linear)) continue;
    if (l.bias) kept.add(l.bias);
    if (s.skip) kept.add(l.weight);
    else use(l.weight);
  }
  for (const s of exp) {
    const b = s.get();
    if (!(b instanceof StackedExperts)) continue;
    for (const t of [b.gateUpWeight, b.downWeight]) {
      if (s.skip) kept.add(t);
      else use(t);
    }
  }
  const release = (t: Tensor): void => {
    const left = uses.get(t)! - 1;
    uses.set(t, left);
    if (left === 0 && !kept.has(t) && opts.disposeOriginals !== false) t.dispose();
  };

  const tables = new Map<Device, Nf4Tables>();
  const tablesFor = (d: Device): Nf4Tables => tables.get(d) ?? tables.set(d, Nf4Tables.create(d)).get(d)!;
  const entries: QuantEntry[] = [], skipped: string[] = [], owned: { dispose(): void }[] = [];
  const report = (): QuantReport => {
    const tb = [...tables.values()].reduce((a, t) => a + t.bytes(), 0);
    return new QuantReport(entries, skipped, doubleQuant, tb, owned);
  };
  try {
    for (const s of lin) {
      const l = s.get();
      if (s.skip) skipped.push(s.name);
      if (s.skip || !(l instanceof Linear)) continue;
      const q = Nf4Linear.fromLinear(l, { doubleQuant, backward, tables: tablesFor(l.weight.device) });
      owned.push(q);
      s.set(q);
      const e = { name: s.name, role: s.role, params: l.weight.numel, bytesBefore: bytesOf(l.weight) };
      entries.push({ ...e, bytesAfter: q.weight.bytes() });
      release(l.weight);
    }
    for (const s of exp) {
      const b = s.get();
      if (s.skip) skipped.push(s.name);
      if (s.skip || !(b instanceof StackedExperts)) continue;
      const q = Nf4Experts.fromStacked(b, {
        doubleQuant,
        backward,
        tables: tablesFor(b.gateUpWeight.device),
      });
      owned.push(q);
      s.set(q);
      const params = b.gateUpWeight.numel + b.downWeight.numel;
      const bytesBefore = bytesOf(b.gateUpWeight) + bytesOf(b.downWeight);
      entries.push({ name: s.name, role: "experts", params, bytesBefore, bytesAfter: q.bytes() });
      release(b.gateUpWeight);
      release(b.downWeight);
    }
  } catch (e) {
    report().dispose(); // half-done: the model is unusable either way; free what was made
    throw e;
  } finally {
    for (const t of tables.values()) t.release(); // the weights hold their own references
  }
  for (const s of lin) {
    if (!s.skip && !(s.get() instanceof Nf4Linear)) {
      throw new Error(`quantizeModel: ${s.name} left unquantised`);
    }
  }
  for (const s of exp) {
    if (!s.skip && !(s.get() instanceof Nf4Experts)) {
      throw new Error(`quantizeModel: expert bank ${s.name} left in full precision`);
    }
  }
  const done = report();
  owner?.adopt?.(done); // a loaded model frees its NF4 weights with the rest
  return done;
}

/** Parameters and bytes of a decoder's weights, with the NF4 share. */
export interface WeightBytes {
  /** Every parameter counted (embedding, linear weights and biases, experts, norms). */
  params: number;
  /** Bytes they hold now. */
  bytes: number;
  /** Parameters stored as NF4. */
  nf4Params: number;
  /** Bytes of those NF4 weights (codes and statistics). */
  nf4Bytes: number;
  /** Names of parts of unknown type, not counted. */
  unknown: string[];
}

/** The frozen base under adapters (anything with a `base` layer, as LoraLinear and LoraExperts). */
function unwrap<T extends object>(layer: T): T {
  let l = layer;
  while ("base" in l && typeof l.base === "object" && l.base !== null) l = l.base as T;
  return l;
}

/**
 * Counts what the decoder's base weights hold, each tensor once, looking
 * through adapters (their own parameters are not counted); for memory
 * benches and reports.
 */
export function nf4Bytes(decoder: Decoder): WeightBytes {
  const out: WeightBytes = { params: 0, bytes: 0, nf4Params: 0, nf4Bytes: 0, unknown: [] };
  const seen = new Set<Tensor>();
  const dense = (t: Tensor | null): void => {
    if (!t || seen.has(t) || t.disposed) return;
    seen.add(t);
    out.params += t.numel;
    out.bytes += bytesOf(t);
  };
  const nf4 = (w: Nf4Weight): void => {
    out.params += w.numel;
    out.bytes += w.bytes();
    out.nf4Params += w.numel;
    out.nf4Bytes += w.bytes();
  };
  dense(decoder.embed);
  for (const s of linearSlots(decoder)) {
    const l = unwrap(s.get());
    if (l instanceof Linear) [l.weight, l.bias].forEach(dense);
    else if (l instanceof Nf4Linear) {
      nf4(l.weight);
      dense(l.bias);
    } else out.unknown.push(s.name);
  }
  for (const s of expertSlots(decoder)) {
    const b = unwrap(s.get());
    if (b instanceof StackedExperts) [b.gateUpWeight, b.downWeight].forEach(dense);
    else if (b instanceof Nf4Experts) [b.gateUpWeight, b.downWeight].forEach(nf4);
    else out.unknown.push(s.name);
  }
  const norms = decoder.layers.flatMap((l) => [l.inputNorm, l.postNorm, l.attn.qNorm, l.attn.kNorm]);
  for (const n of [...norms, decoder.finalNorm]) {
    if (n instanceof RmsNorm) dense(n.weight);
    else if (n instanceof LayerNorm) [n.weight, n.bias].forEach(dense);
  }
  return out;
}
