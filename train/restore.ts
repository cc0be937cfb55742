/**
 * Restoring a checkpoint into a policy that exists: a PEFT adapter into its
 * LoRA adapters (model/peft.ts's loadPeftAdapter makes new ones instead) and
 * a value head into its head. Everything is checked first (every key
 * present, no stranger, every shape right), then copied, so a bad file
 * leaves the targets as they were. The adapter layout is model/peft.ts's
 * `adapterEntries`, the one walk that saving and loading use too.
 * @module
 */
import { join } from "node:path";
import type { MoeConfig } from "../model/config.ts";
import type { LoraModel } from "../model/lora_apply.ts";
import { ADAPTER_WEIGHTS, adapterEntries, readAdapterConfig } from "../model/peft.ts";
import { SafetensorsFile } from "../model/safetensors.ts";
import { applyEntries, checkEntries, type RestoreEntry, wholeEntry } from "../model/safetensors_copy.ts";
import { VALUE_HEAD_FILE, type ValueHead } from "../model/value_head.ts";

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
  const pc = await readAdapterConfig(dir);
  if (pc.r !== lora.config.r || pc.alpha !== lora.config.alpha) {
    throw new Error(
      `${pc.path}: r ${pc.r}, lora_alpha ${pc.alpha}; these adapters have r ${lora.config.r}, alpha ${lora.config.alpha}`,
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
  const entries = (["w1", "b1", "w2", "b2"] as const).map((k) => wholeEntry(k, head[k]));
  return await prepare(join(dir, VALUE_HEAD_FILE), entries);
}
