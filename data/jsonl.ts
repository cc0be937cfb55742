/**
 * Reading JSON Lines record by record, so that one bad line is reported with
 * its line number instead of failing the whole file.
 * @module
 */

/** One non-blank line of a JSONL file: its parsed value, or why it did not parse. */
export type JsonlLine =
  | { line: number; ok: true; value: unknown }
  | { line: number; ok: false; reason: string };

/**
 * The non-blank lines of JSONL text, parsed one by one (line numbers count
 * from 1 and include blank lines; a trailing "\r" is dropped).
 */
export function parseJsonl(text: string): JsonlLine[] {
  const out: JsonlLine[] = [];
  const lines = (text.startsWith("\uFEFF") ? text.slice(1) : text).split("\n"); // a UTF-8 byte-order mark
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!.endsWith("\r") ? lines[i]!.slice(0, -1) : lines[i]!;
    if (raw.trim() === "") continue;
    try {
      out.push({ line: i + 1, ok: true, value: JSON.parse(raw) });
    } catch (e) {
      out.push({ line: i + 1, ok: false, reason: `invalid JSON: ${(e as Error).message}` });
    }
  }
  return out;
}

/**
 * Reads and parses a JSONL file ({@link parseJsonl}).
 * @throws {Error} naming the file when it cannot be read
 */
export async function readJsonl(path: string): Promise<JsonlLine[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new Error(`cannot read ${path}: ${(e as Error).message}`, { cause: e });
  }
  return parseJsonl(text);
}
