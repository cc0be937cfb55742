/**
 * One console line of progress: a bar, step/total, elapsed and ETA, and a
 * few metrics. On a terminal the line is redrawn in place (`\r`, clear to
 * end of line, cut to the terminal's width); otherwise (a log file, CI)
 * each update prints a plain line.
 * @module
 */

/** Where the bar writes (stdout by default). */
export interface ProgressOutput {
  /** Redraw in place (a terminal) or print lines. */
  isTTY: boolean;
  /** Terminal width in columns (ignored when not a TTY). */
  columns: number;
  /** Writes text as is. */
  write(text: string): void;
}

function stdoutOutput(): ProgressOutput {
  const tty = Deno.stdout.isTerminal();
  let columns = 120;
  try {
    if (tty) columns = Deno.consoleSize().columns;
  } catch { /* not a console */ }
  const enc = new TextEncoder();
  return { isTTY: tty, columns, write: (t) => void Deno.stdout.writeSync(enc.encode(t)) };
}

/** "1h02m", "3m05s", "42s". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h > 0) return `${h}h${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m${String(r).padStart(2, "0")}s`;
  return `${r}s`;
}

/**
 * A metric for the line: 3 significant digits (whole numbers from 100 on), "–" for NaN (not measured this
 * update, e.g. the KL when no group had a reward spread), or the string as is.
 */
export function formatValue(v: number | string): string {
  if (typeof v === "string") return v;
  if (Number.isNaN(v)) return "–";
  if (!Number.isFinite(v)) return String(v);
  if (v !== 0 && (Math.abs(v) >= 1e6 || Math.abs(v) < 1e-3)) return v.toExponential(2);
  if (Math.abs(v) >= 100) return String(Math.round(v));
  return Number.isInteger(v) ? String(v) : v.toPrecision(3).replace(/\.?0+$/, "");
}

/** Options of {@link ProgressBar}. */
export interface ProgressOptions {
  /** The step the run starts (or resumes) from (default 0). */
  start?: number;
  /** Width of the bar in characters (default 24). */
  width?: number;
  /** Output (default stdout). */
  out?: ProgressOutput;
  /** Clock in milliseconds (default performance.now). */
  now?: () => number;
}

/** A progress line for a run of `total` steps. */
export class ProgressBar {
  /** Total steps. */
  readonly total: number;
  readonly #start: number;
  readonly #width: number;
  readonly #out: ProgressOutput;
  readonly #now: () => number;
  readonly #t0: number;
  #drawn = false;

  /** Starts the clock. */
  constructor(total: number, opts: ProgressOptions = {}) {
    this.total = total;
    this.#start = opts.start ?? 0;
    this.#width = opts.width ?? 24;
    this.#out = opts.out ?? stdoutOutput();
    this.#now = opts.now ?? (() => performance.now());
    this.#t0 = this.#now();
  }

  /** The line for step (steps completed) and metrics, without writing it. */
  render(step: number, metrics: Record<string, number | string> = {}): string {
    const frac = this.total > 0 ? Math.min(1, step / this.total) : 1;
    const filled = Math.round(frac * this.#width);
    const bar = "█".repeat(filled) + "░".repeat(this.#width - filled);
    const elapsed = (this.#now() - this.#t0) / 1000;
    const done = step - this.#start;
    const eta = done > 0 ? (elapsed / done) * (this.total - step) : NaN;
    const pct = (100 * frac).toFixed(1).padStart(5);
    const ms = Object.entries(metrics).map(([k, v]) => `${k} ${formatValue(v)}`).join("  ");
    return `${bar} ${step}/${this.total} ${pct}% | ${formatDuration(elapsed)} < ${formatDuration(eta)}` +
      (ms ? ` | ${ms}` : "");
  }

  /** Shows progress after step steps. */
  update(step: number, metrics: Record<string, number | string> = {}): void {
    const line = this.render(step, metrics);
    if (this.#out.isTTY) {
      const cut = [...line].slice(0, Math.max(10, this.#out.columns - 1)).join("");
      this.#out.write(`\r${cut}\x1b[K`);
      this.#drawn = true;
    } else {
      this.#out.write(line + "\n");
    }
  }

  /** Prints a message on its own line (above the bar on a terminal). */
  log(message: string): void {
    if (this.#out.isTTY && this.#drawn) this.#out.write("\r\x1b[K");
    this.#out.write(message + "\n");
    this.#drawn = false;
  }

  /** Ends the bar's line. */
  done(): void {
    if (this.#out.isTTY && this.#drawn) this.#out.write("\n");
    this.#drawn = false;
  }
}
