/**
 * The data side: GSM8K from a jsonl or parquet file or the Hub, its answer
 * format (extracting and comparing final answers), chat-template prompts,
 * seeded micro-batches, and a small arithmetic task in GSM8K's format.
 * @module
 */
export {
  BAD_RECORD_POLICIES,
  GSM8K_HUB_ID,
  GSM8K_SPLITS,
  type Gsm8kData,
  type Gsm8kExample,
  type Gsm8kSplit,
  loadGsm8k,
  type LoadGsm8kOptions,
  parseGsm8kRecord,
  sameProblems,
  type SkippedRecord,
  splitContradiction,
} from "./gsm8k.ts";
export {
  type AnswerVerdict,
  EXTRACT_METHODS,
  EXTRACT_MODES,
  extractAnswer,
  type Extraction,
  type ExtractMethod,
  type ExtractMode,
  type ExtractOptions,
  judgeAnswer,
  MARKER_METHODS,
} from "./answer.ts";
export { answersMatch, normalizeNumber, parseGold, plainText } from "./numbers.ts";
export { datasetCacheDir, type DatasetFileOptions, resolveDatasetFile } from "./hub.ts";
export { type JsonlLine, parseJsonl, readJsonl } from "./jsonl.ts";
export { readParquetRows } from "./parquet.ts";
export {
  buildPrompt,
  buildPrompts,
  DEFAULT_INSTRUCTION,
  type Prompt,
  promptMessages,
  type PromptOptions,
  type PromptTokenizer,
} from "./prompt.ts";
export {
  type BatchPosition,
  epochOrder,
  epochSeed,
  type MicroBatch,
  MicroBatcher,
  type MicroBatcherOptions,
  mulberry32,
} from "./batches.ts";
export { type ArithmeticOptions, arithmeticProblems, arithmeticSplit } from "./arithmetic.ts";
