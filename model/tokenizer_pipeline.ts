/**
 * Which tokenization pipeline to run a tokenizer.json with.
 *
 * "tokenizer.json" runs the file as written, as transformers 4.x fast
 * tokenizers, llama.cpp's test vectors, vLLM and transformers.js do.
 *
 * "transformers-v5" rebuilds the pipeline from tokenizer_config.json as
 * transformers v5's tokenizer classes do. For `LlamaTokenizer` (Phi-3) that
 * changes ids: no Prepend normalizer, and a Metaspace pre-tokenizer that adds
 * "▁" only at the start of the text (`legacy: false`), so text after a special
 * token gets no "▁" (e.g. "<|user|>\nWhat" → "What", not "▁What"). For
 * `Qwen2Tokenizer` v5's rebuild gives the same ids as the file.
 * @module
 */
import type { JsonObject } from "./json.ts";

/** A tokenization pipeline (see the module doc). */
export type TokenizerPipeline = "tokenizer.json" | "transformers-v5";

/** tokenizer_class values whose v5 rebuild changes nothing we can observe in ids or decodes. */
const V5_UNCHANGED = new Set(["Qwen2Tokenizer", "Qwen2TokenizerFast"]);
const V5_LLAMA = new Set(["LlamaTokenizer", "LlamaTokenizerFast"]);

/** The `content` of a special-token entry written as a string or as an AddedToken object. */
export function tokenContent(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (typeof v === "object" && v !== null && typeof (v as JsonObject).content === "string") {
    return (v as JsonObject).content as string;
  }
  return null;
}

/**
 * Applies a pipeline to parsed tokenizer.json (in place), given tokenizer_config.
 * @param vocabId looks up a token's id, for the post-processor's BOS/EOS
 * @throws {Error} for "transformers-v5" with a tokenizer_class we do not know how v5 rebuilds
 */
export function applyPipeline(
  json: JsonObject,
  config: JsonObject,
  pipeline: TokenizerPipeline,
  vocabId: (token: string) => number | null,
  source: string,
): void {
  if (pipeline === "tokenizer.json") return;
  const cls = typeof config.tokenizer_class === "string" ? config.tokenizer_class : "(none)";
  if (V5_UNCHANGED.has(cls)) return;
  if (!V5_LLAMA.has(cls)) {
    throw new Error(
      `${source}: pipeline "transformers-v5" is implemented for ${
        [...V5_LLAMA, ...V5_UNCHANGED].join(", ")
      }, ` +
        `not tokenizer_class ${cls}; use pipeline "tokenizer.json"`,
    );
  }
  // transformers v5 models/llama/tokenization_llama.py LlamaTokenizer.__init__ and update_post_processor.
  const addPrefixSpace = config.add_prefix_space ?? true;
  const legacy = config.legacy ?? false;
  json.normalizer = null;
  json.pre_tokenizer = {
    type: "Metaspace",
    replacement: "▁",
    prepend_scheme: addPrefixSpace ? (legacy ? "always" : "first") : "never",
    split: false,
  };
  json.decoder = {
    type: "Sequence",
    decoders: [
      { type: "Replace", pattern: { String: "▁" }, content: " " },
      { type: "ByteFallback" },
      { type: "Fuse" },
      ...(addPrefixSpace ? [{ type: "Strip", content: " ", start: 1, stop: 0 }] : []),
    ],
  };
  const special = (key: "bos" | "eos", add: boolean): [string, number] | null => {
    const tok = tokenContent(config[`${key}_token`]);
    if (!add || tok === null) return null;
    const id = vocabId(tok);
    if (id === null) throw new Error(`${source}: ${key}_token "${tok}" is not in the vocabulary`);
    return [tok, id];
  };
  const bos = special("bos", config.add_bos_token !== false);
  const eos = special("eos", config.add_eos_token === true);
  const piece = (tok: [string, number] | null, typeId: number): JsonObject[] =>
    tok ? [{ SpecialToken: { id: tok[0], type_id: typeId } }] : [];
  const seq = (id: string, typeId: number): JsonObject => ({ Sequence: { id, type_id: typeId } });
  const specials: JsonObject = {};
  for (const t of [bos, eos]) if (t) specials[t[0]] = { id: t[0], ids: [t[1]], tokens: [t[0]] };
  json.post_processor = {
    type: "TemplateProcessing",
    single: [...piece(bos, 0), seq("A", 0), ...piece(eos, 0)],
    pair: [...piece(bos, 0), seq("A", 0), ...piece(eos, 0), ...piece(bos, 1), seq("B", 1), ...piece(eos, 1)],
    special_tokens: specials,
  };
}
