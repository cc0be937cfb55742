/**
 * Copying saved tensors into tensors that already exist: a PEFT adapter into
 * a policy's LoRA adapters (model/peft.ts's loadPeftAdapter makes new ones),
 * and a value head into a policy's head. Everything is checked first (every
 * key present, no stranger, every shape right), then copied, so a bad file
 * leaves the targets as they were.
 *
 * The PEFT key layout mirrors model/peft.ts's savePeftAdapter (tests/
 * train_checkpoint_test.ts round-trips the two).
 * @module
 */
import { join } from "node:path";
import { type Device, type DType, noGrad, type Tensor, tidy } from "../ffi/mod.ts";
import type { MoeConfig } from "../model/config.ts";
import type { LoraModel } from "../model/lora_apply.ts";
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS } from "../model/peft.ts";
import { SafetensorsFile } from "../model/safetensors.ts";
import { VALUE_HEAD_FILE, type ValueHead } from "../model/value_head.ts";

/** One tensor to restore: the saved key and shape, and where the data goes. */
export interface RestoreEntry {
  /** The name in the file. */
  key: string;
  /** The shape the file must hold. */
  shape: readonly number[];
  /** dtype and device to load as (the target's). */
  like: { dtype: DType; device: Device };
  /** Copies the loaded tensor into place (called inside noGrad and tidy). */
  assign(src: Tensor): void;
}

const sameShape = (a: readonly number[], b: readonly number[]): boolean =>
  a.length === b.length && a.every((s, i) => s === b[i]);

/**
 * Checks a file's header against entries: every key present with its shape,
 * and (unless allowExtra) no other key.
 * @throws {Error} naming the file and the first bad keys
 */
export function checkEntries(f: SafetensorsFile, entries: readonly RestoreEntry[], allowExtra = false): void {
  const problems: string[] = [];
  const want = new Set(entries.map((e) => e.key));
  for (const e of entries) {
    if (!f.has(e.key)) {
      problems.push(`missing tensor "${e.key}"`);
      continue;
    }
    const got = f.info(e.key).shape;
    if (!sameShape(got, e.shape)) {
      problems.push(`"${e.key}" has shape [${got.join(", ")}], expected [${e.shape.join(", ")}]`);
    }
  }
  if (!allowExtra) {
    for (const k of f.names()) if (!want.has(k)) problems.push(`unexpected tensor "${k}"`);
  }
  if (problems.length) {
    const more = problems.length > 5 ? ` (and ${problems.length - 5} more)` : "";
    throw new Error(`${f.path}: ${problems.slice(0, 5).join("; ")}${more}`);
  }
}

/** Loads every entry's tensor and copies it into place. */
export async function applyEntries(f: SafetensorsFile, entries: readonly RestoreEntry[]): Promise<void> {
  for (const e of entries) {
    using src = await f.load(e.key, e.like);
    noGrad(() => tidy(() => e.assign(src)));
  }
}

const like = (t: Tensor): { dtype: DType; device: Device } => ({ dtype: t.dtype, device: t.device });

/** A leaf copied whole. */
function whole(key: string, dst: Tensor): RestoreEntry {
  return { key, shape: dst.shape, like: like(dst), assign: (src) => void dst.copy_(src) };
}

/** Our module name as transformers v5 names it (as model/peft.ts). */
function v5Name(name: string, cfg: MoeConfig): string {
  if (cfg.modelType !== "phimoe") return name;
  return name.replace(".block_sparse_moe.", ".mlp.").replace(/\.mlp\.gate$/, ".mlp.router");
}

const PREFIX = "base_model.model.";

/**
 * The entries of a LoRA model's adapters under PEFT's key names and layouts
 * (what savePeftAdapter writes): linears as they are; fused experts as
 * A [r·E, in] (expert-major rows) and B [out, r·E] (column j·E + e); split
 * experts one module per expert.
 */
export function adapterEntries(lora: LoraModel, cfg: MoeConfig): RestoreEntry[] {
  const out: RestoreEntry[] = [];
  for (const [name, l] of lora.linears) {
    out.push(whole(`${PREFIX}${v5Name(name, cfg)}.lora_A.weight`, l.A));
    out.push(whole(`${PREFIX}${v5Name(name, cfg)}.lora_B.weight`, l.B));
  }
  for (const [name, ex] of lora.experts) {
    if (ex.form === "fused") {
      const mod = `${PREFIX}${v5Name(name, cfg)}`;
      const pairs: [string, { A: Tensor; B: Tensor }][] = [
        [`${mod}.base_layer`, ex.gateUpAdapters[0]!],
        [mod, ex.downAdapter],
      ];
      for (const [k, ad] of pairs) {
        const [e, r, inp] = ad.A.shape as [number, number, number];
        const size = ad.B.size(1);
        out.push({
          key: `${k}.lora_A.weight`,
          shape: [e * r, inp],
          like: like(ad.A),
          assign: (src) => void ad.A.copy_(src.reshape([e, r, inp])),
        });
        out.push({
          key: `${k}.lora_B.weight`,
          shape: [size, r * e],
          like: like(ad.B),
          assign: (src) => void ad.B.copy_(src.reshape([size, r, e]).permute([2, 0, 1])),
        });
      }
      continue;
    }
    const n = ex.names;
    const parts: [string, { A: Tensor; B: Tensor }][] = [
      [n.gate, ex.gateUpAdapters[0]!],
      [n.up, ex.gateUpAdapters[1]!],
      [n.down, ex.downAdapter],
    ];
    for (const [leaf, ad] of parts) {
      for (let e = 0; e < ex.count; e++) {
        const k = `${PREFIX}${name}.${e}.${leaf}`;
        out.push({
          key: `${k}.lora_A.weight`,
          shape: ad.A.shape.slice(1),
          like: like(ad.A),
          assign: (src) => void ad.A.select(0, e).copy_(src),
        });
        out.push({
          key: `${k}.lora_B.weight`,
          shape: ad.B.shape.slice(1),
          like: like(ad.B),
          assign: (src) => void ad.B.select(0, e).copy_(src),
        });
      }
    }
  }
  return out;
}

/** A checked restore, ready to apply; close it either way. */
export interface PreparedRestore {
  /** Copies the tensors into place. */
  apply(): Promise<void>;
  /** Closes the file. */
  close(): void;
}

async function prepare(path: string, entries: RestoreEntry[]): Promise<PreparedRestore> {
  const f = await SafetensorsFile.open(path);
  try {
    checkEntries(f, entries);
  } catch (e) {
    f.close();
    throw e;
  }
  return { apply: () => applyEntries(f, entries), close: () => f.close() };
}

/**
 * Opens and checks a PEFT adapter folder against lora's adapters (same rank,
 * α, modules and shapes) without changing them.
 * @throws {Error} naming the file for a missing or unreadable file, another peft_type, r or α, or a key or
 *   shape that does not match these adapters
 */
export async function prepareAdapterCopy(
  lora: LoraModel,
  cfg: MoeConfig,
  dir: string,
): Promise<PreparedRestore> {
  const cfgPath = join(dir, ADAPTER_CONFIG);
  let pc: Record<string, unknown>;
  try {
    pc = JSON.parse(await Deno.readTextFile(cfgPath));
  } catch (e) {
    throw new Error(`${cfgPath}: cannot read the adapter config: ${(e as Error).message}`, { cause: e });
  }
  if (pc.peft_type !== "LORA") {
    throw new Error(`${cfgPath}: peft_type ${JSON.stringify(pc.peft_type)}, not LORA`);
  }
  if (pc.r !== lora.config.r || pc.lora_alpha !== lora.config.alpha) {
    throw new Error(
      `${cfgPath}: r ${pc.r}, lora_alpha ${pc.lora_alpha}; these adapters have r ${lora.config.r}, alpha ${lora.config.alpha}`,
    );
  }
  return await prepare(join(dir, ADAPTER_WEIGHTS), adapterEntries(lora, cfg));
}

/**
 * Copies a PEFT adapter folder (as savePeftAdapter writes it) into lora's
 * existing adapters; nothing is changed when a check fails.
 * @throws {Error} as {@link prepareAdapterCopy}
 */
export async function copyAdapterInto(lora: LoraModel, cfg: MoeConfig, dir: string): Promise<void> {
  const p = await prepareAdapterCopy(lora, cfg, dir);
  try {
    await p.apply();
  } finally {
    p.close();
  }
}

/**
 * Opens and checks dir/value_head.safetensors against head.
 * @throws {Error} naming the file when it is missing, corrupt, or of another hidden size
 */
export async function prepareValueHeadCopy(head: ValueHead, dir: string): Promise<PreparedRestore> {
  const entries = (["w1", "b1", "w2", "b2"] as const).map((k) => whole(k, head[k]));
  return await prepare(join(dir, VALUE_HEAD_FILE), entries);
}
