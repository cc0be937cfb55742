/**
 * The one atomic write every file of moerl goes through: old or new content,
 * never a part, and no temporary file left behind on failure.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { writeAll, writeAtomic } from "../model/atomic_write.ts";

const TMP = Deno.makeTempDirSync({ prefix: "moerl_atomic_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(TMP, { recursive: true }));

Deno.test("writeAtomic: a failed write leaves the old file and no temporary", async () => {
  const dir = await Deno.makeTempDir({ dir: TMP });
  const path = join(dir, "f.json");
  await writeAtomic(path, "one");
  await writeAtomic(path, "two");
  assert.equal(await Deno.readTextFile(path), "two");
  // a folder where the file should go: the rename fails, the temporary is removed
  const blocked = join(dir, "blocked");
  await Deno.mkdir(join(blocked, "inner"), { recursive: true });
  await assert.rejects(writeAtomic(blocked, "x"), /cannot write .*blocked/);
  assert.deepEqual((await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort(), [
    "blocked",
    "f.json",
  ]);
});

Deno.test("writeAtomic: a file written piece by piece; an error while writing passes through, unwrapped", async () => {
  const dir = await Deno.makeTempDir({ dir: TMP });
  const path = join(dir, "parts.bin");
  await writeAtomic(path, async (f) => {
    await writeAll(f, new Uint8Array([1, 2]));
    await writeAll(f, new Uint8Array([3]));
  });
  assert.deepEqual([...await Deno.readFile(path)], [1, 2, 3]);
  class Mine extends Error {}
  await assert.rejects(
    writeAtomic(path, async (f) => {
      await writeAll(f, new Uint8Array([9]));
      throw new Mine("half-way");
    }),
    Mine,
  );
  assert.deepEqual([...await Deno.readFile(path)], [1, 2, 3], "the old content stays");
  assert.deepEqual((await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name), ["parts.bin"]);
  await assert.rejects(writeAtomic(join(dir, "no", "such", "x"), "x"), /cannot write .*x: cannot create/);
});
