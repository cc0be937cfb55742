/**
 * Append-only JSONL logs of a run: `metrics.jsonl` (one line per update) and
 * `samples.jsonl` (one line per logged completion: `prompt`, `completion`,
 * `reward`, `correct`). Each record carries `step`, the
 * number of updates completed (1 for the first update; checkpoint-<step>
 * holds the weights after it). A line is written with one call and flushed
 * to disk before {@link JsonlLog.append} returns, and the file is opened in
 * append mode, so a run resumed from checkpoint-N continues it after its
 * lines with step > N (and any half-written last line) are dropped.
 *
 * Metric names are snake_case, as rl/ppo.ts's PpoMetrics (`reward_mean`,
 * `accuracy`, `kl`, `entropy`, `value_loss`, `tokens_per_second`, …); the
 * trainer adds `lr`, `update_seconds` (the update's wall time)
 * and, after an evaluation, `eval_accuracy_strict` / `eval_accuracy_flexible` (with `eval.samples` > 1
 * also `eval_pass_at_k_*` and `eval_maj_at_k_*`).
 * Non-finite numbers are written as null (JSON has no NaN).
 * @module
 */
import { writeAll, writeAtomic } from "../model/atomic_write.ts";

/** One record: its step and anything JSON can hold. */
export interface StepRecord {
  /** Updates completed. */
  step: number;
  /** Metrics, texts, anything JSON can hold. */
  [key: string]: unknown;
}

/** The file name of the metrics log in a run folder. */
export const METRICS_FILE = "metrics.jsonl";
/** The file name of the samples log in a run folder. */
export const SAMPLES_FILE = "samples.jsonl";

const isRecord = (v: unknown): v is StepRecord =>
  typeof v === "object" && v !== null && !Array.isArray(v) && Number.isFinite((v as StepRecord).step);

/**
 * Reads a JSONL log, skipping blank and malformed lines (a half-written last
 * line after a crash) and lines without a numeric step. A missing file reads
 * as empty.
 */
export async function readRecords(path: string): Promise<{ records: StepRecord[]; malformed: number }> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return { records: [], malformed: 0 };
    throw new Error(`cannot read ${path}: ${(e as Error).message}`, { cause: e });
  }
  const records: StepRecord[] = [];
  let malformed = 0;
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    try {
      const v = JSON.parse(line);
      if (isRecord(v)) records.push(v);
      else malformed++;
    } catch {
      malformed++;
    }
  }
  return { records, malformed };
}

/** Options of {@link JsonlLog.open}. */
export interface OpenLogOptions {
  /**
   * Resuming after this step: lines with a larger step (and malformed lines)
   * are removed first. Without it the file must be absent or empty, so a new
   * run never appends to an old run's log.
   */
  keepUpTo?: number;
  /** fsync each line (default true). */
  sync?: boolean;
}

/** An append-only JSONL log. */
export class JsonlLog {
  /** The file. */
  readonly path: string;
  #file: Deno.FsFile | null;
  readonly #sync: boolean;

  private constructor(path: string, file: Deno.FsFile, sync: boolean) {
    this.path = path;
    this.#file = file;
    this.#sync = sync;
  }

  /**
   * Opens path for appending (see {@link OpenLogOptions}).
   * @returns the log, and how many lines a resume dropped
   * @throws {Error} naming the file when it has lines and keepUpTo is not given, or cannot be opened
   */
  static async open(path: string, opts: OpenLogOptions = {}): Promise<{ log: JsonlLog; dropped: number }> {
    const { records, malformed } = await readRecords(path);
    let dropped = 0;
    if (opts.keepUpTo === undefined) {
      if (records.length + malformed > 0) {
        throw new Error(
          `${path} already has ${
            records.length + malformed
          } lines: resume the run (keepUpTo) or use another run folder`,
        );
      }
    } else {
      const kept = records.filter((r) => r.step <= opts.keepUpTo!);
      dropped = records.length - kept.length + malformed;
      if (dropped > 0) await writeAtomic(path, kept.map((r) => JSON.stringify(r) + "\n").join(""));
    }
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { append: true, create: true });
    } catch (e) {
      throw new Error(`cannot open ${path}: ${(e as Error).message}`, { cause: e });
    }
    return { log: new JsonlLog(path, file, opts.sync ?? true), dropped };
  }

  /** Appends one record as a line; non-finite numbers become null. */
  async append(record: StepRecord): Promise<void> {
    if (!this.#file) throw new Error(`${this.path}: log is closed`);
    if (!Number.isFinite(record.step)) throw new Error(`${this.path}: record without a numeric step`);
    const bytes = new TextEncoder().encode(JSON.stringify(record) + "\n");
    try {
      await writeAll(this.#file, bytes);
      if (this.#sync) await this.#file.syncData();
    } catch (e) {
      throw new Error(
        `cannot append to ${this.path}: ${
          (e as Error).message
        } (earlier lines are intact; --resume drops a partial line)`,
        { cause: e },
      );
    }
  }

  /** Closes the file. Idempotent. */
  close(): void {
    this.#file?.close();
    this.#file = null;
  }

  /** Closes the file at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.close();
  }
}
