/**
 * Reading the small JSON files that sit beside a checkpoint (config.json,
 * tokenizer_config.json, the shard index), with errors that name the file.
 * @module
 */

/** A parsed JSON object (not an array or a scalar). */
export type JsonObject = Record<string, unknown>;

/** True for a plain JSON object: not null, not an array. */
export function isJsonObject(x: unknown): x is JsonObject {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

/**
 * Reads and parses a JSON file whose top level must be an object.
 * @param path the file to read
 * @param what what the file is, for messages (e.g. "model config")
 * @throws {Error} naming the file when it is missing, unreadable, not JSON, or not an object
 */
export async function readJsonObject(path: string, what: string): Promise<JsonObject> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new Error(`${what}: cannot read ${path}: ${(e as Error).message}`, { cause: e });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new Error(`${what}: ${path} is not valid JSON: ${(e as Error).message}`, { cause: e });
  }
  if (!isJsonObject(value)) throw new Error(`${what}: ${path} must hold a JSON object at the top level`);
  return value;
}

/** Like {@link readJsonObject}, but null when the file does not exist (other errors still throw). */
export async function readOptionalJsonObject(path: string, what: string): Promise<JsonObject | null> {
  if (!(await isFile(path))) return null;
  return await readJsonObject(path, what);
}

/** True if path exists and is a regular file (following symlinks, as HF cache snapshots use them). */
export async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** True if path exists and is a directory. */
export async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}
