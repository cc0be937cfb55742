/**
 * A model's tokenizer: tokenizer.json run by the official Hugging Face
 * `tokenizers` library (its Node binding, a native addon: needs
 * `--allow-ffi`), special tokens and the chat template from
 * tokenizer_config.json, and the EOS ids generation stops on (from
 * generation_config.json, else config.json, else the tokenizer's EOS).
 * @module
 */
import { dirname, join } from "node:path";
import type { Tokenizer as HfTokenizer } from "tokenizers";
import {
  type ChatMessage,
  ChatTemplate,
  type ChatTemplateOptions,
  selectChatTemplate,
} from "./chat_template.ts";
import { ConfigReader } from "./config_reader.ts";
import { isFile, isJsonObject, type JsonObject, readOptionalJsonObject } from "./json.ts";
import { applyPipeline, tokenContent, type TokenizerPipeline } from "./tokenizer_pipeline.ts";

export type { TokenizerPipeline } from "./tokenizer_pipeline.ts";

/** An added token from tokenizer.json. */
export interface AddedTokenInfo {
  /** Its id. */
  id: number;
  /** Its text. */
  content: string;
  /** True for special tokens (skipped by decode with skipSpecialTokens). */
  special: boolean;
}

/** Where a tokenizer's files are; only tokenizer.json is required. */
export interface TokenizerFiles {
  /** tokenizer.json. */
  tokenizer: string;
  /** tokenizer_config.json (special tokens, chat template). */
  tokenizerConfig?: string | null;
  /** chat_template.jinja (transformers v5 saves the template there). */
  chatTemplate?: string | null;
  /** generation_config.json (EOS ids for generation). */
  generationConfig?: string | null;
  /** config.json (fallback EOS ids). */
  modelConfig?: string | null;
}

/** Options for loading. */
export interface TokenizerOptions {
  /** "tokenizer.json" (default) or "transformers-v5"; see tokenizer_pipeline.ts. */
  pipeline?: TokenizerPipeline;
  /** A named chat template when tokenizer_config has several. */
  chatTemplateName?: string;
}

/** Options for encoding. */
export interface EncodeOptions {
  /** Run the post-processor (BOS/EOS if the tokenizer adds them; default true, as HF). */
  addSpecialTokens?: boolean;
}

/** Options for decoding. */
export interface DecodeOptions {
  /** Drop special tokens (default false, as HF). */
  skipSpecialTokens?: boolean;
  /**
   * Drop ids at or past the vocabulary's end, as HF's decode does, instead of throwing (default false).
   * For sampled text: a model's embedding matrix is often padded past its tokenizer (Qwen3: 151,936 rows
   * for 151,669 tokens), and a sampler may draw a padding id, whose text is empty.
   */
  skipUnknownIds?: boolean;
}

/** The named special tokens transformers knows (tokenizer_config `<name>_token`). */
export type SpecialTokenName = "bos" | "eos" | "unk" | "sep" | "pad" | "cls" | "mask";
const SPECIAL_NAMES: readonly SpecialTokenName[] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/** A loaded tokenizer. */
export class Tokenizer {
  /** The tokenizer.json path. */
  readonly source: string;
  /** Ids including added tokens (the model's embedding may have more rows). */
  readonly vocabSize: number;
  /** Added tokens, by id. */
  readonly addedTokens: readonly AddedTokenInfo[];
  /** Named special tokens from tokenizer_config (bos, eos, unk, sep, pad, cls, mask) that are set. */
  readonly specialTokens: Readonly<Partial<Record<SpecialTokenName, { token: string; id: number }>>>;
  /** generation_config's eos_token_id, else config.json's, else the EOS token's. */
  readonly eosTokenIds: readonly number[];
  /**
   * The special token the chat template writes after an assistant message (`<|im_end|>`, Phi-3's
   * `<|end|>`), found by rendering a probe conversation; null without a template or when none follows.
   */
  readonly endOfTurnId: number | null;
  /** The chat template, if the tokenizer has one. */
  readonly chatTemplate: ChatTemplate | null;
  /** Whether decode tidies spaces before punctuation (tokenizer_config `clean_up_tokenization_spaces`). */
  readonly cleanUpTokenizationSpaces: boolean;
  #hf: HfTokenizer;
  #special: Set<number>;

  private constructor(init: {
    source: string;
    hf: HfTokenizer;
    addedTokens: AddedTokenInfo[];
    specialTokens: Partial<Record<SpecialTokenName, { token: string; id: number }>>;
    eosTokenIds: number[];
    chatTemplate: ChatTemplate | null;
    cleanUp: boolean;
  }) {
    this.source = init.source;
    this.#hf = init.hf;
    this.vocabSize = init.hf.getVocabSize(true);
    this.addedTokens = init.addedTokens;
    this.specialTokens = init.specialTokens;
    this.eosTokenIds = init.eosTokenIds;
    this.chatTemplate = init.chatTemplate;
    this.cleanUpTokenizationSpaces = init.cleanUp;
    this.#special = new Set(init.addedTokens.filter((t) => t.special).map((t) => t.id));
    this.endOfTurnId = this.#findEndOfTurn();
  }

  /**
   * Ids that end a completion, for every generation moerl runs (rollouts,
   * evaluation, the supervised warm-up's targets): {@link eosTokenIds}, the
   * tokenizer's EOS and the chat template's end-of-turn token. Chat models'
   * generation_config often lists only one of them; a completion that runs
   * past the end of its turn is scored on text glued from two turns.
   */
  get stopTokenIds(): readonly number[] {
    const extra = [this.eosTokenId, this.endOfTurnId].filter((id): id is number => id !== null);
    return [...new Set([...this.eosTokenIds, ...extra])];
  }

  /** The special token right after an assistant message in the rendered template (see endOfTurnId). */
  #findEndOfTurn(): number | null {
    if (!this.chatTemplate) return null;
    const probe = "moerl end-of-turn probe";
    let text: string;
    try {
      text = this.applyChatTemplate([{ role: "user", content: "?" }, { role: "assistant", content: probe }]);
    } catch {
      return null; // a template that rejects this conversation: no end-of-turn known
    }
    const at = text.lastIndexOf(probe);
    if (at < 0) return null;
    const rest = text.slice(at + probe.length).trimStart();
    const hits = this.addedTokens.filter((t) => t.special && t.content !== "" && rest.startsWith(t.content));
    hits.sort((a, b) => b.content.length - a.content.length);
    return hits[0]?.id ?? null;
  }

  /**
   * Loads the tokenizer files of a model folder (tokenizer.json required;
   * tokenizer_config.json, chat_template.jinja, generation_config.json and
   * config.json used when present).
   * @throws {Error} naming the file when one is missing, malformed, or names a token not in the vocabulary
   */
  static async load(dir: string, opts: TokenizerOptions = {}): Promise<Tokenizer> {
    const maybe = async (
      name: string,
    ): Promise<string | null> => ((await isFile(join(dir, name))) ? join(dir, name) : null);
    return await Tokenizer.fromFiles({
      tokenizer: join(dir, "tokenizer.json"),
      tokenizerConfig: await maybe("tokenizer_config.json"),
      chatTemplate: await maybe("chat_template.jinja"),
      generationConfig: await maybe("generation_config.json"),
      modelConfig: await maybe("config.json"),
    }, opts);
  }

  /**
   * Loads from explicit file paths (see {@link TokenizerFiles}).
   * @throws {Error} naming the file when one is missing, malformed, or names a token not in the vocabulary
   */
  static async fromFiles(files: TokenizerFiles, opts: TokenizerOptions = {}): Promise<Tokenizer> {
    let text: string;
    try {
      text = await Deno.readTextFile(files.tokenizer);
    } catch (e) {
      throw new Error(`tokenizer: cannot read ${files.tokenizer}: ${(e as Error).message}`, { cause: e });
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (e) {
      throw new Error(`tokenizer: ${files.tokenizer} is not valid JSON: ${(e as Error).message}`, {
        cause: e,
      });
    }
    if (!isJsonObject(json)) throw new Error(`tokenizer: ${files.tokenizer} must hold a JSON object`);
    const cfgPath = files.tokenizerConfig ?? null;
    const cfg = cfgPath
      ? (await readOptionalJsonObject(cfgPath, "tokenizer config")) ?? missing(cfgPath)
      : {};
    const addedTokens = readAddedTokens(json, files.tokenizer);
    const vocab = isJsonObject((json.model as JsonObject | undefined)?.vocab)
      ? (json.model as JsonObject).vocab as JsonObject
      : {};
    const byContent = new Map(addedTokens.map((t) => [t.content, t.id]));
    applyPipeline(
      json,
      cfg,
      opts.pipeline ?? "tokenizer.json",
      (tok) => byContent.get(tok) ?? (typeof vocab[tok] === "number" ? vocab[tok] as number : null),
      cfgPath ?? files.tokenizer,
    );
    // HF ignores tokenizer.json's truncation/padding unless asked (some published files carry a stray max_length).
    json.truncation = null;
    json.padding = null;
    // The native library loads on first use, not when moerl is imported.
    const { Tokenizer: Native } = await import("tokenizers");
    let hf: HfTokenizer;
    try {
      hf = Native.fromString(JSON.stringify(json));
    } catch (e) {
      throw new Error(
        `tokenizer: the tokenizers library rejected ${files.tokenizer}: ${(e as Error).message}`,
        { cause: e },
      );
    }
    const specialTokens: Partial<Record<SpecialTokenName, { token: string; id: number }>> = {};
    for (const name of SPECIAL_NAMES) {
      const raw = cfg[`${name}_token`];
      if (raw === undefined || raw === null) continue;
      const token = tokenContent(raw);
      if (token === null) {
        throw new Error(
          `${cfgPath}: "${name}_token" must be a string or {content}, got ${JSON.stringify(raw)}`,
        );
      }
      const id = hf.tokenToId(token);
      if (id === null || id === undefined) {
        throw new Error(`${cfgPath}: "${name}_token" "${token}" is not in ${files.tokenizer}`);
      }
      specialTokens[name] = { token, id };
    }
    const jinja = files.chatTemplate ? await Deno.readTextFile(files.chatTemplate) : null;
    const templateSource = selectChatTemplate(
      cfg.chat_template,
      jinja,
      cfgPath ?? files.tokenizer,
      opts.chatTemplateName,
    );
    const chatTemplate = templateSource === null
      ? null
      : new ChatTemplate(templateSource, files.chatTemplate ?? cfgPath ?? "chat template");
    const cleanUp = cfg.clean_up_tokenization_spaces ?? false;
    if (typeof cleanUp !== "boolean") {
      throw new Error(`${cfgPath}: "clean_up_tokenization_spaces" must be true or false`);
    }
    return new Tokenizer({
      source: files.tokenizer,
      hf,
      addedTokens,
      specialTokens,
      eosTokenIds: await eosIds(files, specialTokens.eos?.id ?? null),
      chatTemplate,
      cleanUp,
    });
  }

  /** The BOS token, or null. */
  get bosToken(): string | null {
    return this.specialTokens.bos?.token ?? null;
  }
  /** The BOS id, or null. */
  get bosTokenId(): number | null {
    return this.specialTokens.bos?.id ?? null;
  }
  /** The tokenizer's EOS token (tokenizer_config `eos_token`), or null. */
  get eosToken(): string | null {
    return this.specialTokens.eos?.token ?? null;
  }
  /** The tokenizer's EOS id, or null (generation stops on {@link Tokenizer.eosTokenIds}). */
  get eosTokenId(): number | null {
    return this.specialTokens.eos?.id ?? null;
  }
  /** The pad token, or null. */
  get padToken(): string | null {
    return this.specialTokens.pad?.token ?? null;
  }
  /** The pad id, or null. */
  get padTokenId(): number | null {
    return this.specialTokens.pad?.id ?? null;
  }
  /** The unknown token, or null. */
  get unkToken(): string | null {
    return this.specialTokens.unk?.token ?? null;
  }

  /** The id of a token string (vocabulary or added), or null. */
  tokenToId(token: string): number | null {
    return this.#hf.tokenToId(token) ?? null;
  }

  /** The token string of an id, or null. */
  idToToken(id: number): string | null {
    return this.#hf.idToToken(id) ?? null;
  }

  /** True if id is an added token marked special. */
  isSpecial(id: number): boolean {
    return this.#special.has(id);
  }

  /**
   * Token ids of text.
   * @throws {TypeError} if text is not a string
   */
  async encode(text: string, opts: EncodeOptions = {}): Promise<number[]> {
    if (typeof text !== "string") throw new TypeError(`encode: expected a string, got ${typeof text}`);
    const e = await this.#hf.encode(text, null, { addSpecialTokens: opts.addSpecialTokens ?? true });
    return e.getIds();
  }

  /** Token ids of each text (run in parallel by the native library). */
  async encodeBatch(texts: readonly string[], opts: EncodeOptions = {}): Promise<number[][]> {
    texts.forEach((t, i) => {
      if (typeof t !== "string") throw new TypeError(`encodeBatch: item ${i} is ${typeof t}, not a string`);
    });
    const es = await this.#hf.encodeBatch([...texts], { addSpecialTokens: opts.addSpecialTokens ?? true });
    return es.map((e) => e.getIds());
  }

  /**
   * Text of token ids.
   * @throws {RangeError} for an id outside the tokenizer's vocabulary (the native library would drop it
   *   silently), unless skipUnknownIds lets those past its end go
   */
  async decode(ids: readonly number[], opts: DecodeOptions = {}): Promise<string> {
    const known = this.#checkIds(ids, "decode", opts.skipUnknownIds ?? false);
    const s = await this.#hf.decode(known, opts.skipSpecialTokens ?? false);
    return this.cleanUpTokenizationSpaces ? cleanUp(s) : s;
  }

  /** Text of each id list. */
  async decodeBatch(batch: readonly (readonly number[])[], opts: DecodeOptions = {}): Promise<string[]> {
    const known = batch.map((ids, i) =>
      this.#checkIds(ids, `decodeBatch item ${i}`, opts.skipUnknownIds ?? false)
    );
    const out = await this.#hf.decodeBatch(known, opts.skipSpecialTokens ?? false);
    return this.cleanUpTokenizationSpaces ? out.map(cleanUp) : out;
  }

  /** The ids, checked; with skipUnknown, those past the vocabulary left out. */
  #checkIds(ids: readonly number[], what: string, skipUnknown: boolean): number[] {
    if (!Array.isArray(ids)) throw new TypeError(`${what}: expected an array of token ids`);
    ids.forEach((id, i) => {
      if (!Number.isSafeInteger(id) || id < 0 || (id >= this.vocabSize && !skipUnknown)) {
        throw new RangeError(
          `${what}: id ${id} at index ${i} is not a token of ${this.source} (0..${this.vocabSize - 1})`,
        );
      }
    });
    return skipUnknown ? ids.filter((id) => id < this.vocabSize) : [...ids];
  }

  /** The template variables transformers passes: the named special tokens as strings. */
  get templateSpecialTokens(): Record<string, string> {
    const out: Record<string, string> = {};
    for (const [name, v] of Object.entries(this.specialTokens)) out[`${name}_token`] = v.token;
    return out;
  }

  /**
   * Renders messages with the chat template (transformers `apply_chat_template(..., tokenize=False)`).
   * @throws {Error} if the tokenizer has no chat template, or as {@link ChatTemplate.render}
   * @example
   * ```ts ignore
   * tok.applyChatTemplate([{ role: "user", content: "2+2?" }], {
   *   addGenerationPrompt: true,
   *   kwargs: { enable_thinking: false },
   * });
   * ```
   */
  applyChatTemplate(messages: readonly ChatMessage[], opts: ChatTemplateOptions = {}): string {
    if (!this.chatTemplate) {
      throw new Error(
        `${
          dirname(this.source)
        }: no chat template (neither a tokenizer_config.json with "chat_template" nor a ` +
          "chat_template.jinja beside tokenizer.json)",
      );
    }
    return this.chatTemplate.render(messages, opts, this.templateSpecialTokens);
  }

  /** Token ids of the rendered chat, encoded without adding special tokens (as transformers does). */
  async encodeChat(messages: readonly ChatMessage[], opts: ChatTemplateOptions = {}): Promise<number[]> {
    return await this.encode(this.applyChatTemplate(messages, opts), { addSpecialTokens: false });
  }
}

function missing(path: string): never {
  throw new Error(`tokenizer config ${path} does not exist`);
}

function readAddedTokens(json: JsonObject, source: string): AddedTokenInfo[] {
  const raw = json.added_tokens ?? [];
  if (!Array.isArray(raw)) throw new Error(`${source}: "added_tokens" must be a list`);
  return raw.map((t, i) => {
    if (!isJsonObject(t) || !Number.isSafeInteger(t.id) || typeof t.content !== "string") {
      throw new Error(`${source}: added_tokens[${i}] must have an integer "id" and a string "content"`);
    }
    return { id: t.id as number, content: t.content, special: t.special === true };
  }).sort((a, b) => a.id - b.id);
}

/** EOS ids for generation: generation_config.json, else config.json, else the tokenizer's EOS. */
async function eosIds(files: TokenizerFiles, tokenizerEos: number | null): Promise<number[]> {
  for (const path of [files.generationConfig, files.modelConfig]) {
    if (!path) continue;
    const raw = await readOptionalJsonObject(path, "config");
    if (!raw) continue;
    const v = new ConfigReader(raw, path).ids("eos_token_id", null);
    if (v !== null) return Array.isArray(v) ? v : [v];
  }
  return tokenizerEos === null ? [] : [tokenizerEos];
}

/** transformers' `clean_up_tokenization`: drops the space before punctuation and English contractions. */
function cleanUp(s: string): string {
  return s.replaceAll(" .", ".").replaceAll(" ?", "?").replaceAll(" !", "!").replaceAll(" ,", ",")
    .replaceAll(" ' ", "'").replaceAll(" n't", "n't").replaceAll(" 'm", "'m").replaceAll(" 's", "'s")
    .replaceAll(" 've", "'ve").replaceAll(" 're", "'re");
}
