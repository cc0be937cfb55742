/**
 * Run logs and their views: the append-only metrics log (resume truncation,
 * half-written lines, NaN), the progress line (terminal and plain), and the
 * HTML report (one SVG chart per metric with every point, self-contained,
 * escaped, written atomically).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { JsonlLog, METRICS_FILE, readRecords, SAMPLES_FILE } from "../train/metrics.ts";
import { formatDuration, ProgressBar, type ProgressOutput } from "../train/progress.ts";
import { REPORT_CHARTS, writeReport } from "../train/report.ts";

Deno.test("metrics: append, refuse to reuse a log, truncate on resume", async () => {
  const dir = await Deno.makeTempDir({ prefix: "moerl-metrics-" });
  const path = join(dir, METRICS_FILE);
  {
    const { log } = await JsonlLog.open(path);
    using _ = log;
    for (let step = 1; step <= 5; step++) await log.append({ step, reward_mean: step / 10, kl: NaN });
  }
  const { records } = await readRecords(path);
  assert.deepEqual(records.map((r) => r.step), [1, 2, 3, 4, 5]);
  assert.equal(records[0]!.kl, null, "NaN is written as null");
  await assert.rejects(() => JsonlLog.open(path), /already has 5 lines: resume the run/);

  // A crash mid-line leaves a partial last line; resuming from step 3 drops it and steps 4-5.
  await Deno.writeTextFile(path, '{"step": 6, "rew', { append: true });
  const { log, dropped } = await JsonlLog.open(path, { keepUpTo: 3 });
  assert.equal(dropped, 3);
  await log.append({ step: 4, reward_mean: 0.9 });
  log.close();
  const text = await Deno.readTextFile(path);
  assert.deepEqual(text.trim().split("\n").map((l) => JSON.parse(l).step), [1, 2, 3, 4]);
  assert.ok(text.endsWith("\n"));
  // Nothing to drop: the file is left as it is.
  const again = await JsonlLog.open(path, { keepUpTo: 10 });
  again.log.close();
  assert.equal(again.dropped, 0);
  assert.equal(await Deno.readTextFile(path), text);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("metrics: a failed append names the file; the lines before it are intact and a resume drops the rest", async () => {
  const dir = await Deno.makeTempDir({ prefix: "moerl-metrics-" });
  const path = join(dir, METRICS_FILE);
  // A file-size limit (ulimit -f, in KiB; SIGXFSZ ignored so that write fails with EFBIG) stands in for a full disk.
  const script = `
    import { JsonlLog } from ${JSON.stringify(new URL("../train/metrics.ts", import.meta.url).href)};
    const { log } = await JsonlLog.open(${JSON.stringify(path)});
    await log.append({ step: 1, loss: 0.5 });
    await log.append({ step: 2, text: "x".repeat(200000) }).catch((e) => console.log(e.message));
    log.close();`;
  const out = await new Deno.Command("bash", {
    args: ["-c", `trap '' XFSZ; ulimit -f 64; exec "$0" eval "$1"`, Deno.execPath(), script],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const said = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  assert.match(said, new RegExp(`^cannot append to ${path}: .*\\(earlier lines are intact; --resume drops`));
  assert.equal((await Deno.stat(path)).size, 64 * 1024, "the second line was cut at the limit");
  const { log, dropped } = await JsonlLog.open(path, { keepUpTo: 1 });
  log.close();
  assert.equal(dropped, 1);
  assert.equal(await Deno.readTextFile(path), '{"step":1,"loss":0.5}\n');
  await Deno.remove(dir, { recursive: true });
});

function fakeOut(isTTY: boolean): ProgressOutput & { text: string } {
  const o = { isTTY, columns: 60, text: "", write: (t: string) => void (o.text += t) };
  return o;
}

Deno.test("progress: one line with bar, ETA and metrics; redrawn on a terminal, printed otherwise", () => {
  let now = 0;
  const plain = fakeOut(false);
  const bar = new ProgressBar(10, { out: plain, now: () => now, width: 10 });
  now = 30_000;
  bar.update(3, { reward: 0.41234, kl: 0.00051, acc: 0.5 });
  assert.equal(
    plain.text,
    "███░░░░░░░ 3/10  30.0% | 30s < 1m10s | reward 0.412  kl 5.10e-4  acc 0.5\n",
  );
  const tty = fakeOut(true);
  const resumed = new ProgressBar(10, { out: tty, now: () => now, start: 5 });
  now += 20_000;
  resumed.update(7, { reward: 1 });
  assert.ok(tty.text.startsWith("\r") && tty.text.endsWith("\x1b[K"), JSON.stringify(tty.text));
  assert.match(tty.text, /7\/10 +70\.0% \| 20s < 30s/, "ETA from the steps done since the start");
  assert.ok([...tty.text].length <= 60 + 4, "cut to the terminal width");
  resumed.log("eval: 12.5%");
  assert.ok(tty.text.endsWith("\r\x1b[Keval: 12.5%\n"));
  resumed.done();
  assert.equal(formatDuration(3725), "1h02m");
});

Deno.test("report: one SVG per metric with every point, the config and the latest samples", async () => {
  const dir = await Deno.makeTempDir({ prefix: "moerl-report-" });
  const n = 30;
  const lines = Array.from({ length: n }, (_, i) => {
    const step = i + 1;
    const r: Record<string, unknown> = {
      step,
      time: step * 10,
      reward_mean: Math.sin(step / 5),
      accuracy: step / n,
      kl: step === 1 ? null : 0.001 * step,
      entropy: 1 - step / 100,
      value_loss: 1 / step,
      tokens_per_second: 1000 + step,
      lr: 1e-5,
    };
    if (step % 10 === 0) {
      Object.assign(r, { eval_accuracy_strict: step / 100, eval_accuracy_flexible: step / 90 });
    }
    return JSON.stringify(r);
  });
  await Deno.writeTextFile(join(dir, METRICS_FILE), lines.join("\n") + "\n");
  const samples = [
    { step: 20, prompt: "old", completion: "old completion", reward: 0, correct: false },
    { step: 30, prompt: "What is 2+2?", completion: "<b>4</b>\n#### 4", reward: 1.05, correct: true },
    { step: 30, prompt: "What is 3+3?", completion: "five", reward: 0, correct: false },
    { step: 30, prompt: "Rate this", completion: "judged by a reward model", reward: 0.25, correct: null },
  ];
  await Deno.writeTextFile(join(dir, SAMPLES_FILE), samples.map((s) => JSON.stringify(s)).join("\n") + "\n");
  await Deno.writeTextFile(join(dir, "config.yaml"), "name: test-run\ntrain:\n  learningRate: 1e-5\n");

  const path = await writeReport(dir);
  assert.equal(path, join(dir, "report.html"));
  const html = await Deno.readTextFile(path);
  assert.ok(html.startsWith("<!DOCTYPE html>"));
  assert.ok(html.trimEnd().endsWith("</html>"));
  const svgs = [...html.matchAll(/<svg [^>]*data-metric="([^"]+)"[\s\S]*?<\/svg>/g)];
  const byId = new Map(svgs.map((m) => [m[1]!, m[0]]));
  const pointsOf = (id: string, series: string): number => {
    const m = new RegExp(`data-series="${series}" data-points="(\\d+)" points="([^"]*)"`).exec(byId.get(id)!);
    assert.ok(m, `${id}: series ${series}`);
    assert.equal(m[2]!.trim().split(" ").length, Number(m[1]), "data-points counts the coordinates");
    return Number(m[1]);
  };
  for (const c of REPORT_CHARTS) assert.ok(byId.has(c.id), `a chart for ${c.id}`);
  assert.equal(svgs.filter((m) => REPORT_CHARTS.some((c) => c.id === m[1])).length, REPORT_CHARTS.length);
  assert.equal(pointsOf("reward", "reward"), n);
  assert.equal(pointsOf("accuracy", "sampled completions"), n);
  assert.equal(pointsOf("accuracy", "eval strict"), 3);
  assert.equal(pointsOf("accuracy", "eval flexible"), 3);
  // Fractions on a fixed axis from 0 to 1, whatever the points (all zero on a random model).
  const ticks = (id: string): string[] =>
    [...byId.get(id)!.matchAll(/class="ytick">([^<]*)</g)].map((m) => m[1]!);
  assert.deepEqual(ticks("accuracy"), ["0", "0.25", "0.5", "0.75", "1"]);
  assert.equal(pointsOf("kl", "kl"), n - 1, "null values are skipped");
  assert.equal(pointsOf("entropy", "entropy"), n);
  assert.equal(pointsOf("value_loss", "value loss"), n);
  assert.equal(pointsOf("tokens_per_second", "tokens/s"), n);
  assert.equal(pointsOf("lr", "lr"), n, "other numeric metrics get their own chart");
  assert.equal((html.match(/<svg /g) ?? []).length, (html.match(/<\/svg>/g) ?? []).length);

  // Self-contained: no scripts, no external resources.
  assert.ok(!/<script|<link|\bsrc=|\bhref=|@import|url\(/i.test(html));
  // The config, and only the latest step's samples, escaped.
  assert.match(html, /learningRate: 1e-5/);
  assert.match(html, /&lt;b&gt;4&lt;\/b&gt;/);
  assert.ok(!html.includes("<b>4</b>"));
  assert.match(html, /Samples \(step 30\)/);
  assert.ok(!html.includes("old completion"));
  // One verdict each for the two judged samples; none for the one whose score did not judge its answer.
  assert.equal((html.match(/class="ok">correct</g) ?? []).length, 1);
  assert.equal((html.match(/class="bad">wrong</g) ?? []).length, 1);
  assert.match(html, /<div class="sample">reward 0\.25/);

  // Atomic: no temporary file left; an empty run still gets a page.
  const names = [];
  for await (const e of Deno.readDir(dir)) names.push(e.name);
  assert.deepEqual(names.sort(), ["config.yaml", METRICS_FILE, "report.html", SAMPLES_FILE]);
  const empty = await Deno.makeTempDir();
  assert.match(await Deno.readTextFile(await writeReport(empty)), /no data[\s\S]*No samples yet/);
  await Deno.remove(empty, { recursive: true });
  await Deno.remove(dir, { recursive: true });
});
