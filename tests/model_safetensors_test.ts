/**
 * safetensors reading, validation, writing and sharded checkpoints. The
 * fixture checkpoints under tests/fixtures/models were written by Python
 * (transformers save_pretrained), so reading them is the compatibility test
 * for our reader; the writer is checked byte for byte against the reference
 * implementation's own test vectors, and against Python's safetensors when
 * $MOERL_TEST_PYTHON (default python3) has it.
 */
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { join } from "node:path";
import { fromTypedArray, liveTensors, type Tensor, tensor } from "../ffi/mod.ts";
import {
  Checkpoint,
  headerBytes,
  INDEX_FILE,
  SafetensorsError,
  SafetensorsFile,
  writeSafetensors,
} from "../model/mod.ts";
import { DEVICE, PYTHON, pythonHas } from "./util.ts";
import { loadModel } from "../model/model.ts";

const MODELS = fileURLToPath(new URL("./fixtures/models/", import.meta.url));
const DEVICE_NAME = DEVICE === "cuda" ? "cuda:0" : DEVICE;

/** A safetensors file from a header (object or raw JSON text) and data bytes, with an optional bogus length. */
async function rawFile(
  dir: string,
  name: string,
  header: unknown,
  data: Uint8Array,
  length?: bigint,
): Promise<string> {
  const json = new TextEncoder().encode(typeof header === "string" ? header : JSON.stringify(header));
  const buf = new Uint8Array(8 + json.length + data.length);
  new DataView(buf.buffer).setBigUint64(0, length ?? BigInt(json.length), true);
  buf.set(json, 8);
  buf.set(data, 8 + json.length);
  const path = join(dir, name);
  await Deno.writeFile(path, buf);
  return path;
}

async function openError(path: string): Promise<string> {
  const e = await SafetensorsFile.open(path).then((f) => (f.close(), null), (err) => err);
  assert.ok(e instanceof SafetensorsError, `expected a SafetensorsError for ${path}, got ${e}`);
  assert.ok(e.message.includes(path), `message should name the file: ${e.message}`);
  return e.message;
}

async function withTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "moerl_st_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("safetensors: reads Python-written checkpoints", async (t) => {
  const live = liveTensors();
  await t.step("single file: names, dtypes, shapes, metadata without reading data", async () => {
    using f = await SafetensorsFile.open(join(MODELS, "qwen3-moe-tiny/model.safetensors"));
    assert.equal(f.metadata.format, "pt");
    const embed = f.info("model.embed_tokens.weight");
    assert.deepEqual([embed.dtype, embed.torchDtype, embed.shape], ["F32", "float32", [256, 64]]);
    assert.ok(f.names().includes("model.layers.0.mlp.experts.3.down_proj.weight"));
    assert.deepEqual(f.info("model.layers.0.mlp.experts.3.down_proj.weight").shape, [64, 32]);
    assert.equal(f.has("nope"), false);
  });
  await t.step("load every tensor, values finite, shapes as declared", async () => {
    using f = await SafetensorsFile.open(join(MODELS, "phimoe-tiny/model.safetensors"));
    for (const name of f.names()) {
      using x = await f.load(name);
      assert.deepEqual(x.shape, f.info(name).shape, name);
      assert.equal(x.dtype, "float32");
      using finite = x.isfinite();
      using fin = finite.all();
      assert.equal(fin.item(), 1, `${name} has non-finite values`);
    }
  });
  await t.step("sharded checkpoint through the index", async () => {
    using ck = await Checkpoint.open(join(MODELS, "qwen3-moe-fused"));
    assert.equal(ck.sharded, true);
    const index = JSON.parse(await Deno.readTextFile(join(MODELS, "qwen3-moe-fused", INDEX_FILE)));
    assert.deepEqual(ck.names(), Object.keys(index.weight_map).sort());
    const info = ck.info("model.layers.0.mlp.experts.gate_up_proj");
    assert.deepEqual(info.shape, [3, 64, 64]); // [E, 2·I_moe, H]
    assert.ok(info.file.endsWith(index.weight_map["model.layers.0.mlp.experts.gate_up_proj"]));
    for (const name of ck.names()) {
      using x = await ck.load(name);
      assert.deepEqual(x.shape, ck.info(name).shape);
    }
  });
  await t.step("single-file checkpoint folder", async () => {
    using ck = await Checkpoint.open(join(MODELS, "phimoe-tiny"));
    assert.equal(ck.sharded, false);
    assert.ok(ck.has("lm_head.bias"));
    assert.deepEqual(ck.info("lm_head.bias").shape, [256]);
  });
  assert.equal(liveTensors(), live, "loading leaked tensors");
});

Deno.test("safetensors: load casts floating tensors and moves them", async () => {
  await withTmp(async (dir) => {
    const path = join(dir, "x.safetensors");
    {
      using h = tensor([1.5, -2, 3.25], { dtype: "bfloat16" });
      using i = tensor([[1, 2], [3, 4]], { dtype: "int64" });
      await writeSafetensors(path, { h, i });
    }
    const live = liveTensors();
    using f = await SafetensorsFile.open(path);
    {
      using a = await f.load("h", { dtype: "float32", device: DEVICE });
      assert.deepEqual([a.dtype, a.device], ["float32", DEVICE_NAME]);
      assert.deepEqual(a.toArray(), [1.5, -2, 3.25]);
      using b = await f.load("h");
      assert.equal(b.dtype, "bfloat16");
      using c = await f.load("i", { device: DEVICE });
      assert.deepEqual(c.tolist(), [[1, 2], [3, 4]]);
    }
    await assert.rejects(() => f.load("i", { dtype: "float32" }), /cannot cast I64 to float32/);
    await assert.rejects(() => f.load("h", { dtype: "int8" }), /cannot cast BF16 to int8/);
    await assert.rejects(() => f.load("missing"), /no tensor named "missing"/);
    // concurrent loads on one handle must not interleave their seek+read
    const all = await Promise.all([f.load("h"), f.load("i"), f.load("h"), f.load("i")]);
    assert.deepEqual(all.map((x) => x.toArray()), [[1.5, -2, 3.25], [1, 2, 3, 4], [1.5, -2, 3.25], [
      1,
      2,
      3,
      4,
    ]]);
    all.forEach((x) => x.dispose());
    f.close();
    await assert.rejects(() => f.load("h"), /file is closed/);
    assert.equal(liveTensors(), live);
  });
});

Deno.test("safetensors: writer matches the reference implementation byte for byte", async (t) => {
  // Vectors from huggingface/safetensors safetensors/src/tensor.rs tests.
  await t.step("test_serialization: attn.0 F32 [1,2,3]", async () => {
    await withTmp(async (dir) => {
      using x = fromTypedArray(new Float32Array([0, 1, 2, 3, 4, 5]), [1, 2, 3]);
      await writeSafetensors(join(dir, "a.safetensors"), { "attn.0": x });
      const expected = [
        64,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        123,
        34,
        97,
        116,
        116,
        110,
        46,
        48,
        34,
        58,
        123,
        34,
        100,
        116,
        121,
        112,
        101,
        34,
        58,
        34,
        70,
        51,
        50,
        34,
        44,
        34,
        115,
        104,
        97,
        112,
        101,
        34,
        58,
        91,
        49,
        44,
        50,
        44,
        51,
        93,
        44,
        34,
        100,
        97,
        116,
        97,
        95,
        111,
        102,
        102,
        115,
        101,
        116,
        115,
        34,
        58,
        91,
        48,
        44,
        50,
        52,
        93,
        125,
        125,
        0,
        0,
        0,
        0,
        0,
        0,
        128,
        63,
        0,
        0,
        0,
        64,
        0,
        0,
        64,
        64,
        0,
        0,
        128,
        64,
        0,
        0,
        160,
        64,
      ];
      assert.deepEqual([...(await Deno.readFile(join(dir, "a.safetensors")))], expected);
    });
  });
  await t.step("test_serialization_forced_alignement: header padded with spaces", async () => {
    await withTmp(async (dir) => {
      using x = fromTypedArray(new Float32Array([0, 1, 2, 3, 4, 5]), [1, 1, 2, 3]);
      await writeSafetensors(join(dir, "a.safetensors"), { attn0: x });
      const bytes = await Deno.readFile(join(dir, "a.safetensors"));
      assert.equal(new DataView(bytes.buffer).getBigUint64(0, true), 72n);
      assert.deepEqual([...bytes.subarray(8 + 65, 8 + 72)], [32, 32, 32, 32, 32, 32, 32]);
      assert.equal(bytes.length, 8 + 72 + 24);
    });
  });
  await t.step("test_empty: no tensors, with and without metadata", () => {
    assert.deepEqual([...headerBytes([])], [8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32]);
    assert.deepEqual([...headerBytes([], { framework: "pt" })], [
      40,
      0,
      0,
      0,
      0,
      0,
      0,
      0,
      123,
      34,
      95,
      95,
      109,
      101,
      116,
      97,
      100,
      97,
      116,
      97,
      95,
      95,
      34,
      58,
      123,
      34,
      102,
      114,
      97,
      109,
      101,
      119,
      111,
      114,
      107,
      34,
      58,
      34,
      112,
      116,
      34,
      125,
      125,
      32,
      32,
      32,
      32,
      32,
    ]);
  });
});

Deno.test("safetensors: round trip of every dtype, layout order, edge shapes", async () => {
  await withTmp(async (dir) => {
    const path = join(dir, "all.safetensors");
    using base = tensor([[1, 2, 3], [4, 5, 6]]);
    const src: Record<string, Tensor> = {
      f64: tensor([1.25, -2], { dtype: "float64" }),
      f32: tensor([[1, 2, 3], [4, 5, 6]]),
      bf16: tensor([0.5, -3], { dtype: "bfloat16" }),
      f16: tensor([0.25, 8], { dtype: "float16" }),
      i64: tensor([2 ** 40, -1], { dtype: "int64" }),
      i32: tensor([7, -7], { dtype: "int32" }),
      i16: tensor([300, -300], { dtype: "int16" }),
      i8: tensor([-5, 5], { dtype: "int8" }),
      u8: tensor([0, 255], { dtype: "uint8" }),
      flag: tensor([true, false, true]),
      scalar: tensor(3.5),
      empty: fromTypedArray(new Float32Array(0), [0, 4]),
      "0": tensor([9], { dtype: "int32" }), // an integer-like name must not jump ahead in the header
      transposed: base.transpose(0, 1), // a non-contiguous view
    };
    const live = liveTensors();
    await writeSafetensors(path, src, { format: "pt", note: 'ünïcode "quoted"' });
    assert.deepEqual(
      (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name),
      ["all.safetensors"],
      "temp file left behind",
    );
    using f = await SafetensorsFile.open(path);
    assert.deepEqual(f.metadata, { format: "pt", note: 'ünïcode "quoted"' });
    // descending dtype alignment, then name (as the reference lays data out)
    assert.deepEqual(f.names(), [
      "i64",
      "f64",
      "empty",
      "f32",
      "scalar",
      "transposed",
      "0",
      "i32",
      "bf16",
      "f16",
      "i16",
      "i8",
      "u8",
      "flag",
    ]);
    for (const [name, t] of Object.entries(src)) {
      using back = await f.load(name);
      assert.deepEqual([back.dtype, back.shape], [t.dtype, t.shape], name);
      assert.deepEqual(back.tolist(), t.tolist(), name);
    }
    assert.equal(liveTensors(), live);
    // overwrite in place: the old file is replaced atomically
    await writeSafetensors(path, { only: src.u8! });
    using g = await SafetensorsFile.open(path);
    assert.deepEqual(g.names(), ["only"]);
    Object.values(src).forEach((t) => t.dispose());
  });
});

Deno.test("safetensors: writer rejects bad input", async () => {
  await withTmp(async (dir) => {
    const path = join(dir, "bad.safetensors");
    using x = tensor([1]);
    await assert.rejects(() => writeSafetensors(path, { __metadata__: x }), /"__metadata__" is reserved/);
    await assert.rejects(
      () => writeSafetensors(path, { x }, { n: 1 as unknown as string }),
      /metadata value for "n" must be a string/,
    );
    const gone = tensor([1]);
    gone.dispose();
    await assert.rejects(() => writeSafetensors(path, { gone }), /tensor "gone" is disposed/);
    await assert.rejects(() => writeSafetensors(path, { y: 3 as unknown as Tensor }), /"y" is not a Tensor/);
    await assert.rejects(
      () => writeSafetensors(join(dir, "no/such/dir/x.safetensors"), { x }),
      /cannot create/,
    );
    assert.deepEqual(await Array.fromAsync(Deno.readDir(dir)), [], "a failed write left files behind");
  });
});

Deno.test("safetensors: header validation names the file and tensor", async (t) => {
  await withTmp(async (dir) => {
    const f32 = (b: number, e: number, shape = [2]) => ({ dtype: "F32", shape, data_offsets: [b, e] });
    const data8 = new Uint8Array(8);
    const cases: [string, () => Promise<string>, RegExp][] = [
      ["shorter than 8 bytes", async () => {
        const p = join(dir, "tiny");
        await Deno.writeFile(p, new Uint8Array(5));
        return p;
      }, /too short/],
      [
        "header length past the end",
        () => rawFile(dir, "len", { a: f32(0, 8) }, data8, 1000n),
        /runs past the end/,
      ],
      [
        "header length over 100 MB",
        () => rawFile(dir, "huge", {}, data8, 200_000_000n),
        /exceeds the 100000000-byte limit/,
      ],
      ["not JSON", () => rawFile(dir, "json", "{not json", data8), /not valid JSON/],
      ["not an object", () => rawFile(dir, "arr", "[1,2]", new Uint8Array(0)), /header must start with "\{"/],
      ["leading space", () => rawFile(dir, "sp", " {}", new Uint8Array(0)), /header must start with "\{"/],
      [
        "entry not an object",
        () => rawFile(dir, "entry", '{"a":1}', new Uint8Array(0)),
        /tensor "a": entry must be an object/,
      ],
      [
        "unsupported dtype",
        () => rawFile(dir, "dt", { w: { dtype: "F8_E4M3", shape: [8], data_offsets: [0, 8] } }, data8),
        /tensor "w": unsupported dtype "F8_E4M3"/,
      ],
      [
        "bad shape",
        () => rawFile(dir, "shape", { w: { dtype: "F32", shape: [2.5], data_offsets: [0, 8] } }, data8),
        /tensor "w": shape must be/,
      ],
      [
        "bad offsets",
        () => rawFile(dir, "off", { w: { dtype: "F32", shape: [2], data_offsets: [0] } }, data8),
        /tensor "w": data_offsets must be/,
      ],
      [
        "size mismatch",
        () => rawFile(dir, "size", { w: f32(0, 8, [3]) }, data8),
        /tensor "w": .* hold 8 bytes but shape \[3\] of F32 needs 12/,
      ],
      [
        "overlap",
        () => rawFile(dir, "overlap", { a: f32(0, 8), b: f32(4, 12) }, new Uint8Array(12)),
        /tensor "b" overlaps tensor "a"/,
      ],
      [
        "gap",
        () => rawFile(dir, "gap", { a: f32(0, 8), b: f32(12, 20) }, new Uint8Array(20)),
        /tensor "b" leaves a gap after tensor "a"/,
      ],
      [
        "truncated",
        () => rawFile(dir, "trunc", { a: f32(0, 8), b: f32(8, 16) }, new Uint8Array(12)),
        /truncated: tensor "b" ends at byte/,
      ],
      [
        "trailing bytes",
        () => rawFile(dir, "trail", { a: f32(0, 8) }, new Uint8Array(10)),
        /2 unexpected bytes after the data of tensor "a"/,
      ],
      [
        "metadata not strings",
        () => rawFile(dir, "meta", { __metadata__: { a: 1 } }, new Uint8Array(0)),
        /"__metadata__" value for "a" must be a string/,
      ],
      ["invalid UTF-8", async () => {
        const p = join(dir, "utf8");
        const buf = new Uint8Array(8 + 4);
        new DataView(buf.buffer).setBigUint64(0, 4n, true);
        buf.set([0x7b, 0xff, 0xfe, 0x7d], 8);
        await Deno.writeFile(p, buf);
        return p;
      }, /not valid UTF-8/],
      ["missing file", () => Promise.resolve(join(dir, "absent.safetensors")), /cannot open/],
    ];
    for (const [name, make, re] of cases) {
      await t.step(name, async () => {
        const msg = await openError(await make());
        assert.match(msg, re);
      });
    }
    await t.step("BOOL bytes other than 0/1 are refused at load", async () => {
      const p = await rawFile(
        dir,
        "bool",
        { b: { dtype: "BOOL", shape: [2], data_offsets: [0, 2] } },
        new Uint8Array([1, 7]),
      );
      using f = await SafetensorsFile.open(p);
      await assert.rejects(() => f.load("b"), /tensor "b": BOOL data holds bytes other than 0 and 1/);
    });
    await t.step("a file that shrinks after opening fails the read, naming the tensor", async () => {
      const p = await rawFile(dir, "shrink", { a: f32(0, 8) }, data8);
      using f = await SafetensorsFile.open(p);
      await Deno.truncate(p, 10);
      await assert.rejects(
        () => f.load("a"),
        /file ended at byte \d+ while reading tensor "a" \(truncated or changed since opened\?\)/,
      );
    });
  });
});

Deno.test("checkpoint: sharded folder errors", async (t) => {
  await withTmp(async (dir) => {
    const src = join(MODELS, "qwen3-moe-fused");
    const index = JSON.parse(await Deno.readTextFile(join(src, INDEX_FILE)));
    const shards = [...new Set(Object.values(index.weight_map) as string[])].sort();
    const copy = async (name: string, files: string[], idx: unknown = index): Promise<string> => {
      const d = join(dir, name);
      await Deno.mkdir(d);
      for (const f of files) await Deno.copyFile(join(src, f), join(d, f));
      await Deno.writeTextFile(join(d, INDEX_FILE), JSON.stringify(idx));
      return d;
    };
    await t.step("missing shard file", async () => {
      const d = await copy("missing_shard", [shards[0]!]);
      await assert.rejects(() => Checkpoint.open(d), new RegExp(`shard file ${shards[1]} is missing`));
    });
    await t.step("tensor absent from the map", async () => {
      using ck = await Checkpoint.open(await copy("ok", shards));
      await assert.rejects(
        () => ck.load("model.nope.weight"),
        /tensor "model.nope.weight" is not in the weight_map of/,
      );
      assert.throws(() => ck.info("model.nope.weight"), SafetensorsError);
    });
    await t.step("map names a tensor its shard lacks", async () => {
      const idx = { ...index, weight_map: { ...index.weight_map, "model.ghost": shards[0] } };
      await assert.rejects(
        async () => Checkpoint.open(await copy("ghost", shards, idx)),
        new RegExp(`maps tensor "model.ghost" to ${shards[0]}, which has no such tensor`),
      );
    });
    await t.step("shard path escaping the folder", async () => {
      const idx = { weight_map: { a: "../elsewhere.safetensors" } };
      await assert.rejects(
        async () => Checkpoint.open(await copy("escape", [], idx)),
        /points outside the checkpoint folder/,
      );
    });
    await t.step("malformed index", async () => {
      await assert.rejects(
        async () => Checkpoint.open(await copy("malformed", [], { weight_map: [1] })),
        /"weight_map" must be an object/,
      );
    });
    await t.step("no weights at all / no folder", async () => {
      await Deno.mkdir(join(dir, "empty"));
      await assert.rejects(
        () => Checkpoint.open(join(dir, "empty")),
        /no model.safetensors or model.safetensors.index.json/,
      );
      await assert.rejects(() => Checkpoint.open(join(dir, "absent")), /checkpoint folder does not exist/);
    });
  });
});

const hasPySafetensors = pythonHas("safetensors", "torch");

Deno.test({
  name: "safetensors: Python's safetensors reads our files, and writes the same bytes",
  ignore: !hasPySafetensors,
  fn: async () => {
    await withTmp(async (dir) => {
      const ours = join(dir, "ours.safetensors");
      const theirs = join(dir, "theirs.safetensors");
      const src: Record<string, Tensor> = {
        "model.embed_tokens.weight": tensor([[0.5, -1, 2], [3, 4, -5]], { dtype: "bfloat16" }),
        "lm_head.weight": tensor([[1, 2, 3], [4, 5, 6]]),
        "a.f16": tensor([0.25, -8], { dtype: "float16" }),
        ids: tensor([5, 6, 7], { dtype: "int64" }),
        mask: tensor([true, false]),
        scalar: tensor(2.5, { dtype: "float64" }),
      };
      await writeSafetensors(ours, src, { format: "pt" });
      const expected = Object.fromEntries(Object.entries(src).map(([k, v]) => [k, v.tolist()]));
      Object.values(src).forEach((t) => t.dispose());
      const script = `
import json, sys, torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
with safe_open(sys.argv[1], "pt") as f:
    meta = f.metadata()
save_file(t, sys.argv[2], metadata=meta)
print(json.dumps({"meta": meta, "dtypes": {k: str(v.dtype) for k, v in t.items()},
                  "values": {k: v.float().tolist() if v.dtype != torch.bool else v.tolist() for k, v in t.items()}}))
`;
      const out = await new Deno.Command(PYTHON, { args: ["-c", script, ours, theirs] }).output();
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
      const py = JSON.parse(new TextDecoder().decode(out.stdout));
      assert.deepEqual(py.meta, { format: "pt" });
      assert.deepEqual(py.dtypes, {
        "model.embed_tokens.weight": "torch.bfloat16",
        "lm_head.weight": "torch.float32",
        "a.f16": "torch.float16",
        ids: "torch.int64",
        mask: "torch.bool",
        scalar: "torch.float64",
      });
      assert.deepEqual(py.values, { ...expected, mask: [true, false] });
      assert.deepEqual(
        await Deno.readFile(theirs),
        await Deno.readFile(ours),
        "Python wrote different bytes",
      );
    });
  },
});

Deno.test("loadModel warns about checkpoint tensors its config does not use, as transformers does", async () => {
  const src = join(MODELS, "qwen3-moe-tiny");
  const warnings: string[] = [];
  const warn = console.warn;
  console.warn = (...args: unknown[]): void => void warnings.push(args.join(" "));
  const dir = await Deno.makeTempDir({ prefix: "moerl_unused_" });
  try {
    (await loadModel(src)).dispose();
    assert.deepEqual(warnings, [], "a matching checkpoint loads quietly");
    // One layer fewer in config.json than in the weights: the model loads, with a word about the rest.
    const cfg = JSON.parse(await Deno.readTextFile(join(src, "config.json")));
    await Deno.writeTextFile(
      join(dir, "config.json"),
      JSON.stringify({ ...cfg, num_hidden_layers: cfg.num_hidden_layers - 1 }),
    );
    await Deno.copyFile(join(src, "model.safetensors"), join(dir, "model.safetensors"));
    (await loadModel(dir)).dispose();
    assert.equal(warnings.length, 1);
    assert.match(
      warnings[0]!,
      new RegExp(
        `\\d+ tensors are not used by its config\\.json \\(first: model\\.layers\\.${
          cfg.num_hidden_layers - 1
        }\\..*\\); does the config match the weights \\(num_hidden_layers`,
      ),
    );
  } finally {
    console.warn = warn;
    await Deno.remove(dir, { recursive: true });
  }
});
