/**
 * GSM8K prompts: the question and an instruction that asks for a final-answer
 * line, as one user turn rendered with the model's own chat template (the
 * format the model was tuned on) and tokenized the way transformers does it.
 * @module
 */
import type { ChatMessage } from "../model/chat_template.ts";

export type { ChatMessage } from "../model/chat_template.ts";

/**
 * The default instruction, appended to the question: reason step by step, then
 * give the answer on its own last line as `#### <number>`, the GSM8K
 * solutions' own format, which strict scoring (data/answer.ts) reads and the
 * reward's marker bonus pays for. (verl's prompt asks for the same marker.)
 */
export const DEFAULT_INSTRUCTION =
  'Solve the problem step by step. Then give the final answer as a number on its own last line, in the form "#### <number>".';

/** Options for {@link buildPrompt}. */
export interface PromptOptions {
  /** Appended to the question after a blank line (default {@link DEFAULT_INSTRUCTION}; "" for none). */
  instruction?: string;
  /** A system message, if any (default none: the template's own default applies). */
  system?: string;
  /**
   * Extra chat-template variables, over the default `{ enable_thinking: false }` (Qwen3 templates then
   * open the assistant turn with an empty think block; templates that do not read it ignore it).
   */
  templateKwargs?: Record<string, unknown>;
}

/** A rendered prompt. */
export interface Prompt {
  /** The prompt as the chat template renders it, ending with the assistant turn's header. */
  text: string;
  /** Its token ids (encoded without adding special tokens: the template wrote them). */
  ids: number[];
}

/** What prompt building needs of a tokenizer: model/tokenizer.ts's `Tokenizer` has it. */
export interface PromptTokenizer {
  /** Renders messages with the chat template. */
  applyChatTemplate(
    messages: readonly ChatMessage[],
    opts: { addGenerationPrompt?: boolean; kwargs?: Record<string, unknown> },
  ): string;
  /** Token ids of a text. */
  encode(text: string, opts: { addSpecialTokens?: boolean }): Promise<number[]>;
  /** Token ids of many texts. */
  encodeBatch(texts: readonly string[], opts: { addSpecialTokens?: boolean }): Promise<number[][]>;
}

/** The chat messages of one question (exported for callers that render themselves). */
export function promptMessages(question: string, opts: PromptOptions = {}): ChatMessage[] {
  if (typeof question !== "string" || question.trim() === "") {
    throw new Error(`buildPrompt: the question must be a non-empty string, got ${JSON.stringify(question)}`);
  }
  const instruction = opts.instruction ?? DEFAULT_INSTRUCTION;
  const user = instruction === "" ? question : `${question}\n\n${instruction}`;
  return [...(opts.system !== undefined ? [{ role: "system", content: opts.system }] : []), {
    role: "user",
    content: user,
  }];
}

function render(tokenizer: PromptTokenizer, question: string, opts: PromptOptions): string {
  return tokenizer.applyChatTemplate(promptMessages(question, opts), {
    addGenerationPrompt: true,
    kwargs: { enable_thinking: false, ...opts.templateKwargs },
  });
}

/**
 * The prompt of one question: rendered with the chat template (generation
 * prompt added) and tokenized.
 * @throws {Error} for an empty question, or when the tokenizer has no chat template
 * @example
 * ```ts ignore
 * const { ids, text } = await buildPrompt(tok, "What is 12 * 7?");
 * ```
 */
export async function buildPrompt(
  tokenizer: PromptTokenizer,
  question: string,
  opts: PromptOptions = {},
): Promise<Prompt> {
  const text = render(tokenizer, question, opts);
  return { text, ids: await tokenizer.encode(text, { addSpecialTokens: false }) };
}

/** {@link buildPrompt} for many questions, tokenized in one batch. */
export async function buildPrompts(
  tokenizer: PromptTokenizer,
  questions: readonly string[],
  opts: PromptOptions = {},
): Promise<Prompt[]> {
  const texts = questions.map((q) => render(tokenizer, q, opts));
  const ids = await tokenizer.encodeBatch(texts, { addSpecialTokens: false });
  return texts.map((text, i) => ({ text, ids: ids[i]! }));
}
