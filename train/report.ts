/**
 * `report.html` for a run folder: line charts of the metrics (inline SVG),
 * the resolved config and the latest sample completions, in one
 * self-contained file (no scripts, no external styles or fonts), written
 * atomically. Regenerate by hand with `deno run -A train/report.ts runs/<name>`.
 *
 * Inputs in the run folder: `metrics.jsonl` and `samples.jsonl`
 * (train/metrics.ts) and `config.yaml` (the resolved config); missing ones
 * are left out of the page.
 * @module
 */
import { join } from "node:path";
import { RUN_CONFIG_FILE } from "./config.ts";
import { writeAtomic } from "../model/atomic_write.ts";
import { METRICS_FILE, readRecords, SAMPLES_FILE, type StepRecord } from "./metrics.ts";
import { formatValue } from "./progress.ts";

/** One line on a chart: the first of keys present in the records. */
export interface SeriesSpec {
  /** Legend label. */
  label: string;
  /** Metric names to look for, in order (matched ignoring case and non-alphanumerics). */
  keys: string[];
}

/** One chart. */
export interface ChartSpec {
  /** Identifier (the svg's data-metric). */
  id: string;
  /** Title. */
  title: string;
  /** Its lines. */
  series: SeriesSpec[];
  /** A fixed value axis (fractions: [0, 1]), else fitted to the points. */
  range?: [number, number];
}

/** The main charts, in page order. */
export const REPORT_CHARTS: readonly ChartSpec[] = [
  {
    id: "reward",
    title: "Reward (mean over completions)",
    series: [{ label: "reward", keys: ["reward_mean", "reward"] }],
  },
  {
    id: "accuracy",
    title: "Accuracy",
    range: [0, 1],
    series: [
      { label: "sampled completions", keys: ["accuracy", "train_accuracy"] },
      { label: "eval strict", keys: ["eval_accuracy_strict"] },
      { label: "eval flexible", keys: ["eval_accuracy_flexible", "eval_accuracy"] },
    ],
  },
  { id: "kl", title: "KL to the reference policy", series: [{ label: "kl", keys: ["kl"] }] },
  { id: "entropy", title: "Entropy (per token)", series: [{ label: "entropy", keys: ["entropy"] }] },
  { id: "value_loss", title: "Value loss", series: [{ label: "value loss", keys: ["value_loss"] }] },
  {
    id: "clip_fraction",
    title: "PPO clip fraction",
    range: [0, 1],
    series: [{ label: "clipped tokens", keys: ["clip_fraction"] }],
  },
  {
    id: "mismatch",
    title: "Sampler / trainer mismatch (mean |Δ log p|)",
    series: [{ label: "mean", keys: ["mismatch_mean"] }, { label: "max", keys: ["mismatch_max"] }],
  },
  {
    id: "tokens_per_second",
    title: "Generation speed (tokens/s)",
    series: [{ label: "tokens/s", keys: ["tokens_per_second", "tokens_per_s"] }],
  },
];

const fold = (k: string): string => k.toLowerCase().replace(/[^a-z0-9]/g, "");

/** (step, value) pairs of a metric, finite values only. */
function points(records: readonly StepRecord[], key: string): [number, number][] {
  const out: [number, number][] = [];
  for (const r of records) {
    const v = r[key];
    if (typeof v === "number" && Number.isFinite(v)) out.push([r.step, v]);
  }
  return out;
}

/** The record key a series reads (the first of its keys present), or null. */
function resolveKey(present: readonly string[], spec: SeriesSpec): string | null {
  for (const k of spec.keys) {
    const hit = present.find((p) => fold(p) === fold(k));
    if (hit) return hit;
  }
  return null;
}

/** s with &, <, >, " and ' escaped for HTML text and attributes. */
export const escapeHtml = (s: string): string =>
  s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"];

/** A centred moving average over ±k points (no lag, unlike an EMA), for noisy series. */
function smooth(ps: readonly [number, number][], k: number): [number, number][] {
  return ps.map(([x], i) => {
    const win = ps.slice(Math.max(0, i - k), i + k + 1);
    return [x, win.reduce((sum, p) => sum + p[1], 0) / win.length];
  });
}

/**
 * An SVG line chart. Each series is one `<polyline data-series=… data-points=N>`
 * of its N points; over series of more than 20 points a centred moving
 * average is drawn, over shorter ones a dot per point (with its value as a tooltip).
 */
export function svgChart(
  id: string,
  title: string,
  series: { label: string; points: [number, number][] }[],
  range?: [number, number],
): string {
  const W = 520, H = 220, L = 60, R = 12, T = 26, B = 30;
  const all = series.flatMap((s) => s.points);
  const head = `<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-metric="${escapeHtml(id)}" ` +
    `viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="${escapeHtml(title)}">` +
    `<text x="${L}" y="16" class="title">${escapeHtml(title)}</text>`;
  if (all.length === 0) return `${head}<text x="${W / 2}" y="${H / 2}" class="empty">no data</text></svg>`;
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - (Math.abs(y0) || 1) * 0.1, y1 + (Math.abs(y1) || 1) * 0.1];
  const pad = (y1 - y0) * 0.05;
  [y0, y1] = range ?? [y0 - pad, y1 + pad];
  const sx = (x: number): number => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y: number): number => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const xy = (ps: readonly [number, number][]): string =>
    ps.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
  const parts: string[] = [head];
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4, py = sy(y).toFixed(1);
    parts.push(
      `<line x1="${L}" x2="${W - R}" y1="${py}" y2="${py}" class="grid"/>` +
        `<text x="${L - 6}" y="${(sy(y) + 4).toFixed(1)}" class="ytick">${formatValue(y)}</text>`,
    );
  }
  const whole = Number.isInteger(x0) && Number.isInteger(x1);
  for (const x of [x0, whole ? Math.round((x0 + x1) / 2) : (x0 + x1) / 2, x1]) {
    const label = Number.isInteger(x) ? String(x) : x.toFixed(1);
    parts.push(`<text x="${sx(x).toFixed(1)}" y="${H - 10}" class="xtick">${label}</text>`);
  }
  series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length]!;
    if (s.points.length === 0) return;
    const noisy = s.points.length > 20;
    const style = `fill="none" stroke="${c}" stroke-width="${noisy ? 1 : 1.8}" opacity="${noisy ? 0.35 : 1}"`;
    const label = escapeHtml(s.label);
    parts.push(
      `<polyline data-series="${label}" data-points="${s.points.length}" points="${xy(s.points)}" ${style}/>`,
    );
    if (noisy) {
      const k = Math.max(1, Math.floor(s.points.length / 50));
      const avg = xy(smooth(s.points, k));
      parts.push(`<polyline class="smooth" points="${avg}" fill="none" stroke="${c}" stroke-width="2"/>`);
    } else {
      for (const [x, y] of s.points) {
        parts.push(
          `<circle cx="${sx(x).toFixed(1)}" cy="${sy(y).toFixed(1)}" r="2.5" fill="${c}">` +
            `<title>step ${x}: ${formatValue(y)}</title></circle>`,
        );
      }
    }
  });
  if (series.length > 1) {
    // The legend, right-aligned on the title's line (about 5.5 px a character at 10 px).
    let x = W - R;
    for (let i = series.length - 1; i >= 0; i--) {
      const s = series[i]!;
      x -= s.label.length * 5.5 + 18;
      parts.push(
        `<rect x="${x.toFixed(1)}" y="11" width="10" height="3" fill="${COLORS[i % COLORS.length]}"/>` +
          `<text x="${(x + 13).toFixed(1)}" y="16" class="legend">${escapeHtml(s.label)}</text>`,
      );
    }
  }
  parts.push("</svg>");
  return parts.join("");
}

const STYLE = `
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1120px;color:#111;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.meta{color:#555}.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{border:1px solid #e5e7eb;border-radius:6px;background:#fff}
.chart .title{font-size:13px;font-weight:600;fill:#111}.chart .grid{stroke:#eee}
.chart .ytick{font-size:10px;fill:#666;text-anchor:end}.chart .xtick{font-size:10px;fill:#666;text-anchor:middle}
.chart .legend{font-size:10px;fill:#333}.chart .empty{font-size:12px;fill:#999;text-anchor:middle}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f8f8f8;border:1px solid #eee;border-radius:4px;padding:8px;white-space:pre-wrap;word-break:break-word;margin:4px 0}
.sample{border:1px solid #e5e7eb;border-radius:6px;padding:8px 12px;margin:10px 0}
.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
`;

/** The page for the given records (pure; see {@link writeReport}). */
export function renderReport(input: {
  name: string;
  metrics: readonly StepRecord[];
  samples: readonly StepRecord[];
  config: string | null;
  generatedAt?: Date;
}): string {
  const { metrics, samples } = input;
  const present = [...new Set(metrics.flatMap((r) => Object.keys(r)))];
  const used = new Set<string>(["step", "time"]);
  const charts = REPORT_CHARTS.map((c) =>
    svgChart(
      c.id,
      c.title,
      c.series.flatMap((s) => {
        const key = resolveKey(present, s);
        if (key === null) return [];
        used.add(key);
        return [{ label: s.label, points: points(metrics, key) }];
      }),
      c.range,
    )
  );
  const others = present.filter((k) => !used.has(k) && points(metrics, k).length > 0).sort();
  const last = metrics.at(-1);
  const summary = last
    ? `<table>${
      present.filter((k) => k !== "step" && typeof last[k] === "number").map((k) =>
        `<tr><td>${escapeHtml(k)}</td><td class="num">${formatValue(last[k] as number)}</td></tr>`
      ).join("")
    }</table>`
    : "<p>No metrics yet.</p>";
  const lastStep = samples.length ? Math.max(...samples.map((s) => s.step)) : null;
  const latest = samples.filter((s) => s.step === lastStep);
  const sampleHtml = latest.map((s) => {
    const ok = s.correct === true
      ? `<span class="ok">correct</span>`
      : s.correct === false
      ? `<span class="bad">wrong</span>`
      : ""; // a score that does not judge answers
    const reward = typeof s.reward === "number" ? `${ok ? " · " : ""}reward ${formatValue(s.reward)}` : "";
    const prompt = typeof s.prompt === "string"
      ? `<details><summary>prompt</summary><pre>${escapeHtml(s.prompt)}</pre></details>`
      : "";
    return `<div class="sample">${ok}${reward}${prompt}<pre>${
      escapeHtml(String(s.completion ?? ""))
    }</pre></div>`;
  }).join("");
  const when = (input.generatedAt ?? new Date()).toISOString();
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(input.name)}: training report</title><style>${STYLE}</style></head><body>
<h1>${escapeHtml(input.name)}</h1>
<p class="meta">${
    last ? `step ${last.step}` : "no updates yet"
  } · ${metrics.length} metric records · generated ${when}</p>
<h2>Metrics</h2><div class="charts">${charts.join("\n")}</div>
${
    others.length
      ? `<h2>Other metrics</h2><div class="charts">${
        others.map((k) => svgChart(k, k, [{ label: k, points: points(metrics, k) }])).join("\n")
      }</div>`
      : ""
  }
<h2>Latest values</h2>${summary}
<h2>Samples${lastStep !== null ? ` (step ${lastStep})` : ""}</h2>${sampleHtml || "<p>No samples yet.</p>"}
${input.config !== null ? `<h2>Config</h2><pre>${escapeHtml(input.config)}</pre>` : ""}
</body></html>
`;
}

/**
 * Builds runDir/report.html from the run's metrics, samples and config (atomically).
 * @returns the report's path
 */
export async function writeReport(runDir: string, name?: string): Promise<string> {
  const metrics = (await readRecords(join(runDir, METRICS_FILE))).records;
  const samples = (await readRecords(join(runDir, SAMPLES_FILE))).records;
  let config: string | null = null;
  try {
    config = await Deno.readTextFile(join(runDir, RUN_CONFIG_FILE));
  } catch { /* no config saved */ }
  const html = renderReport({
    name: name ?? (runDir.split(/[\\/]/).filter(Boolean).at(-1) ?? runDir),
    metrics,
    samples,
    config,
  });
  const path = join(runDir, "report.html");
  await writeAtomic(path, html);
  return path;
}

if (import.meta.main) {
  const dir = Deno.args[0];
  if (!dir) {
    console.error("usage: deno run -A train/report.ts runs/<name>");
    Deno.exit(2);
  }
  console.log(await writeReport(dir));
}
