/**
 * Running a bench's Python counterpart: `python script <json arg>`, which
 * prints one JSON object (or {"error": ...}) on stdout.
 * @module
 */
import { fileURLToPath } from "node:url";

/** Runs python on the script next to this file with one JSON argument; returns its JSON, or why it failed. */
export async function runPythonJson<T>(python: string, script: string, arg: unknown): Promise<T | string> {
  const path = fileURLToPath(new URL(`./${script}`, import.meta.url));
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command(python, {
      args: [path, JSON.stringify(arg)],
      stdout: "piped",
      stderr: "piped",
    })
      .output();
  } catch (e) {
    return `cannot run ${python}: ${(e as Error).message}`;
  }
  const text = new TextDecoder().decode(out.stdout).trim();
  try {
    const r = JSON.parse(text) as T | { error: string };
    if (typeof r === "object" && r !== null && "error" in r) {
      return `${python}: ${(r as { error: string }).error}`;
    }
    if (out.success) return r as T;
  } catch { /* fall through: report the exit status and stderr */ }
  const err = new TextDecoder().decode(out.stderr).trim().split("\n").slice(-5).join("\n  ");
  return `${python} exited with ${out.code}:\n  ${err || text}`;
}
