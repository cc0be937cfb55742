/**
 * Writing files so that a reader, or a run resumed after a crash, sees the
 * old content or the new one, never a part: a temporary file in the same
 * folder, flushed to disk, then renamed over the target. Every file moerl
 * writes (checkpoints, adapters, metrics, reports, evaluations) goes through
 * {@link writeAtomic}.
 * @module
 */
import { basename, dirname, join } from "node:path";

/** Writes all of bytes to an open file. */
export async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) done += await file.write(bytes.subarray(done));
}

/**
 * Writes path atomically: text, bytes, or whatever `fill` writes into the
 * open temporary file (for large files written piece by piece).
 * @throws {Error} "cannot write <path>: ..." when the folder is missing or not writable, or flushing or
 *   renaming fails; an error thrown by fill passes through as it is. No temporary file is left behind.
 */
export async function writeAtomic(
  path: string,
  content: string | Uint8Array | ((file: Deno.FsFile) => Promise<void>),
): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.${Deno.pid}.${crypto.randomUUID().slice(0, 8)}.tmp`);
  let file: Deno.FsFile;
  try {
    file = await Deno.open(tmp, { write: true, createNew: true });
  } catch (e) {
    throw new Error(
      `cannot write ${path}: cannot create a temporary file beside it: ${(e as Error).message}`,
      {
        cause: e,
      },
    );
  }
  let stage = "write";
  try {
    if (typeof content === "function") await content(file);
    else await writeAll(file, typeof content === "string" ? new TextEncoder().encode(content) : content);
    stage = "flush";
    await file.syncData(); // the rename must not publish data still in flight
    file.close();
    stage = "rename";
    await Deno.rename(tmp, path);
    await syncFolder(dirname(path));
  } catch (e) {
    try {
      file.close();
    } catch { /* already closed */ }
    await Deno.remove(tmp).catch(() => {});
    if (stage === "write" && typeof content === "function") throw e;
    throw new Error(`cannot write ${path}: ${(e as Error).message}`, { cause: e });
  }
}

/**
 * Flushes a folder's entries (a rename into it) to disk, so that the new name survives a power loss as the
 * data does. Best effort: where a folder cannot be opened for this (Windows), the rename is durable when the
 * system flushes it.
 */
export async function syncFolder(dir: string): Promise<void> {
  let f: Deno.FsFile;
  try {
    f = await Deno.open(dir, { read: true });
  } catch {
    return;
  }
  try {
    await f.sync();
  } catch {
    /* not supported for folders here */
  } finally {
    f.close();
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
