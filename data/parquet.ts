/**
 * Reading the rows of a local parquet file as objects with `hyparquet` (pure
 * JavaScript: snappy built in; files compressed with other codecs, e.g. zstd,
 * are refused with hyparquet's message).
 * @module
 */
import { parquetMetadata, parquetReadObjects, parquetSchema } from "hyparquet";

/**
 * The rows of a parquet file as objects keyed by column name, with the
 * columns named (all of them when columns is omitted).
 * @throws {Error} naming the file when it cannot be read, is not parquet, lacks one of the columns, or uses
 *   an unsupported encoding or compression
 */
export async function readParquetRows(
  path: string,
  columns?: readonly string[],
): Promise<Record<string, unknown>[]> {
  let file: ArrayBuffer;
  try {
    const bytes = await Deno.readFile(path);
    file = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer;
  } catch (e) {
    throw new Error(`cannot read ${path}: ${(e as Error).message}`, { cause: e });
  }
  const fail = (what: string, e: unknown): never => {
    throw new Error(`${path}: ${what}: ${(e as Error).message}`, { cause: e });
  };
  let metadata;
  try {
    metadata = parquetMetadata(file);
  } catch (e) {
    fail("not a readable parquet file", e);
  }
  if (columns) {
    const have = parquetSchema(metadata!).children.map((c) => c.element.name);
    const missing = columns.filter((c) => !have.includes(c));
    if (missing.length > 0) {
      throw new Error(
        `${path}: no column ${missing.map((c) => `"${c}"`).join(", ")} (the file has ${
          have.map((c) => `"${c}"`).join(", ")
        })`,
      );
    }
  }
  try {
    return await parquetReadObjects({
      file,
      metadata: metadata!,
      ...(columns ? { columns: [...columns] } : {}),
    });
  } catch (e) {
    return fail("cannot decode the rows", e);
  }
}
