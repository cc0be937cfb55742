/**
 * Writing files so that a reader, or a run resumed after a crash, sees the
 * old content or the new one, never a part: a temporary file in the same
 * folder, flushed to disk, then renamed over the target.
 * @module
 */
import { basename, dirname, join } from "node:path";

/** A temporary name beside path, unique to this process and call. */
export function tempPath(path: string, tag = "tmp"): string {
  return join(dirname(path), `.${basename(path)}.${Deno.pid}.${crypto.randomUUID().slice(0, 8)}.${tag}`);
}

/**
 * Writes text (or bytes) to path atomically.
 * @throws {Error} naming path when the folder is missing or not writable; no temporary file is left
 */
export async function writeAtomic(path: string, data: string | Uint8Array): Promise<void> {
  const tmp = tempPath(path);
  try {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    using f = await Deno.open(tmp, { write: true, createNew: true });
    let done = 0;
    while (done < bytes.length) done += await f.write(bytes.subarray(done));
    await f.syncData();
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw new Error(`cannot write ${path}: ${(e as Error).message}`, { cause: e });
  }
  try {
    await Deno.rename(tmp, path);
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw new Error(`cannot write ${path}: ${(e as Error).message}`, { cause: e });
  }
}

/** Whether path exists (any kind). */
export async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}
