/** The decode step's bandwidth bound (bench/bandwidth.ts), against Huihui-MoE's shapes worked out by hand. */
import assert from "node:assert/strict";
import { boundTokensPerSecond, decodeStepBytes } from "../bench/bandwidth.ts";
import { parseConfig } from "../model/config.ts";

const HUIHUI = parseConfig(
  JSON.parse(Deno.readTextFileSync(new URL("../bench/shapes/huihui-moe-1b-a0.6b.json", import.meta.url))),
  "huihui",
);

Deno.test("bandwidth: bytes per decode step and the bound, by hand for Huihui-MoE in bf16", () => {
  // Per layer: q and o 2·1024·16·128, k and v 2·1024·8·128, two norms, a router 1024·3; an expert 3·1024·3072.
  const perLayer = 4_194_304 + 2_097_152 + 2 * 1024 + 1024 * 3;
  const shared = 151_936 * 1024 + 28 * perLayer, expert = 3 * 1024 * 3072;
  const one = decodeStepBytes(HUIHUI, 1, 100, 2);
  assert.equal(one.shared, 2 * shared);
  assert.ok(Math.abs(one.experts - 2 * 28 * 1 * expert) < 1e-3, "one token reaches one expert (top-1)");
  assert.equal(one.kv, 2 * 28 * 2 * 8 * 128 * 100);
  // 256 rows reach all 3 experts (up to (2/3)^256) and read 256 KV caches.
  const many = decodeStepBytes(HUIHUI, 256, 192, 2);
  assert.ok(Math.abs(many.experts - 2 * 28 * 3 * expert) < 1);
  assert.equal(many.kv, 256 * 28 * 2 * 8 * 128 * 192 * 2);
  assert.equal(many.total, many.shared + many.experts + many.kv);
  const bound = boundTokensPerSecond(many, 256, 4800);
  assert.ok(Math.abs(bound - (256 * 4.8e12) / many.total) < 1e-6);
});
