/**
 * Evaluation: `deno task evaluate` (greedy GSM8K accuracy of a configured
 * model with or without an adapter, written as predictions and a summary)
 * and `deno task score` (scoring completions made elsewhere). The loop itself
 * is rl/evaluate.ts's `evaluateExamples`.
 * @module
 */
export { type EvalSummary, runEvaluation, type RunEvaluationOptions } from "./evaluate.ts";
export { loadAdapterOnRanks, resolveAdapter } from "./adapter.ts";
export {
  type MalformedLine,
  type RowVerdict,
  scoreFile,
  type ScoreFileOptions,
  type ScoreResult,
  scoreRow,
  type ScoreSummary,
  scoreText,
} from "./score.ts";
