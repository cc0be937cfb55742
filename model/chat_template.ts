/**
 * Rendering Hugging Face chat templates with `@huggingface/jinja`, with the
 * semantics of transformers' `apply_chat_template(tokenize=False)`: messages
 * with None-valued keys dropped, reasoning fields aliased (v5), `tools` and
 * `documents` passed as None when absent, the named special tokens as
 * variables (`bos_token`, `eos_token`, ...), extra kwargs on top (e.g.
 * `enable_thinking`), `raise_exception`, and `continue_final_message`.
 * @module
 */
import { Template } from "@huggingface/jinja";
import { isJsonObject } from "./json.ts";

/** One chat message: role and content plus whatever else a template reads (tool_calls, reasoning_content…). */
export interface ChatMessage {
  /** "system", "user", "assistant", "tool", … */
  role: string;
  /** The text (some templates also accept content blocks). */
  content?: unknown;
  /** Other fields a template may read. */
  [key: string]: unknown;
}

/** Options of {@link ChatTemplate.render}, as transformers' apply_chat_template names them. */
export interface ChatTemplateOptions {
  /** Append the header that starts the assistant's turn (default false). */
  addGenerationPrompt?: boolean;
  /** Leave the last message open so generation continues it (default false); a string names the field. */
  continueFinalMessage?: boolean | string;
  /** Tool schemas (JSON), or none. */
  tools?: unknown[];
  /** Documents for RAG templates, or none. */
  documents?: Record<string, unknown>[];
  /** Extra template variables (e.g. `{ enable_thinking: false }`); they override special tokens. */
  kwargs?: Record<string, unknown>;
}

const REASONING_FIELDS = ["reasoning_content", "thinking", "reasoning"] as const;
const TAG = "CONTINUE_FINAL_MESSAGE_TAG ";

/** A template compiled once, rendered many times. */
export class ChatTemplate {
  /** The template source. */
  readonly source: string;
  #template: Template;

  /**
   * Parses a template.
   * @param source Jinja source
   * @param origin where it came from, for messages
   * @throws {Error} naming origin when the template does not parse
   */
  constructor(source: string, origin = "chat template") {
    this.source = source;
    try {
      this.#template = new Template(source);
    } catch (e) {
      throw new Error(`${origin}: cannot parse the chat template: ${(e as Error).message}`, { cause: e });
    }
  }

  /**
   * Renders messages to the prompt string.
   * @param specialTokens the named special tokens (bos_token, eos_token, …) as template variables
   * @throws {Error} for a malformed message, incompatible options, or the template's raise_exception
   */
  render(
    messages: readonly ChatMessage[],
    opts: ChatTemplateOptions = {},
    specialTokens: Record<string, string> = {},
  ): string {
    const chat = messages.map((m, i) => normalize(m, i));
    const cont = opts.continueFinalMessage ?? false;
    if (cont && opts.addGenerationPrompt) {
      throw new Error("continueFinalMessage and addGenerationPrompt cannot both be set (as in transformers)");
    }
    let finalText = "";
    if (cont) {
      const field = typeof cont === "string" ? cont : "content";
      const last = chat.at(-1);
      if (!last) throw new Error("continueFinalMessage is set but there are no messages");
      const value = last[field];
      if (typeof value !== "string") {
        throw new Error(`continueFinalMessage: the last message has no string "${field}" to continue`);
      }
      finalText = value;
      const fields = (REASONING_FIELDS as readonly string[]).includes(field)
        ? REASONING_FIELDS.filter((f) => last[f] === value)
        : [field];
      for (const f of fields) last[f] = value + TAG;
    }
    let out: string;
    try {
      out = this.#template.render({
        ...specialTokens,
        ...(opts.kwargs ?? {}),
        messages: chat,
        tools: opts.tools ?? null,
        documents: opts.documents ?? null,
        add_generation_prompt: opts.addGenerationPrompt ?? false,
      });
    } catch (e) {
      throw new Error(`chat template failed: ${(e as Error).message}`, { cause: e });
    }
    if (!cont) return out;
    if (!out.includes(finalText.trim()) || !out.includes(TAG.trim())) {
      throw new Error(
        "continueFinalMessage: the template dropped part of the final message, so it cannot be continued",
      );
    }
    const at = out.lastIndexOf(TAG.trim());
    // If the template kept the tag's trailing space, cut exactly; else it trimmed spacing, so trim too.
    return out.slice(at, at + TAG.length) === TAG ? out.slice(0, at) : out.slice(0, at).trimEnd();
  }
}

/** A message copy without None-valued keys, with reasoning aliased, as transformers v5 prepares it. */
function normalize(m: ChatMessage, i: number): Record<string, unknown> {
  if (!isJsonObject(m)) {
    throw new Error(`message ${i} must be an object with a "role", got ${JSON.stringify(m)}`);
  }
  if (typeof m.role !== "string") throw new Error(`message ${i} has no string "role"`);
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(m)) if (v !== null && v !== undefined) out[k] = structuredClone(v);
  const reasoning = REASONING_FIELDS.map((f) => out[f]).find((v) => v !== undefined);
  if (reasoning !== undefined) return { thinking: reasoning, ...out, reasoning_content: reasoning };
  return out;
}

/**
 * Picks the template to use from tokenizer_config's `chat_template` (a
 * string, or a list of `{name, template}`) or a separate chat_template.jinja
 * (transformers v5 saves it there; it takes priority).
 * @param name a named template; default "tool_use" when tools are given and it exists, else "default"
 * @throws {Error} naming the source when the entry is malformed or the named template is absent
 */
export function selectChatTemplate(
  fromConfig: unknown,
  jinjaFile: string | null,
  source: string,
  name?: string,
  hasTools = false,
): string | null {
  if (jinjaFile !== null && name === undefined) return jinjaFile;
  if (fromConfig === undefined || fromConfig === null) return jinjaFile;
  if (typeof fromConfig === "string") {
    if (name !== undefined && name !== "default") {
      throw new Error(`${source}: has one chat template, not one named "${name}"`);
    }
    return fromConfig;
  }
  if (!Array.isArray(fromConfig)) {
    throw new Error(`${source}: "chat_template" must be a string or a list of {name, template}`);
  }
  const named = new Map<string, string>();
  for (const e of fromConfig) {
    if (!isJsonObject(e) || typeof e.name !== "string" || typeof e.template !== "string") {
      throw new Error(`${source}: every "chat_template" entry must be {name, template} strings`);
    }
    named.set(e.name, e.template);
  }
  const pick = name ?? (hasTools && named.has("tool_use") ? "tool_use" : "default");
  const t = named.get(pick);
  if (t === undefined) {
    throw new Error(`${source}: no chat template named "${pick}" (have: ${[...named.keys()].join(", ")})`);
  }
  return t;
}
