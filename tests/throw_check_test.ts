/**
 * The device-crash reproduction (scripts/throw_check.ts) in a child process:
 * with the Hub client and the tokenizers addon loaded before libtorch, and
 * after it, hundreds of libtorch errors each arrive as a TorchError and the
 * process lives to print its report and exit 0. A crash would show as a
 * signal in the child's status, which a test in this process could not
 * report. With MOERL_TEST_DEVICE=cuda the child adds the CUDA cases
 * (cross-device op, out of GPU memory); MOERL_LIB picks the build, as here.
 */
import assert from "node:assert/strict";
import { join } from "node:path";

const SCRIPT = join(import.meta.dirname!, "..", "scripts", "throw_check.ts");

for (const order of ["modules-first", "torch-first"]) {
  Deno.test(`libtorch errors with the Hub client and tokenizers loaded (${order}): all thrown, process alive`, async () => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", SCRIPT, "--order", order, "--rounds", "10"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(out.stdout), stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.signal, null, `the child died of ${out.signal}\n${stderr}`);
    assert.equal(out.code, 0, `the child failed:\n${stderr}`);
    const report = JSON.parse(stdout.trim().split("\n").at(-1)!) as {
      alive: boolean;
      order: string;
      errors: number;
      cases: Record<string, number>;
    };
    assert.equal(report.alive, true);
    assert.equal(report.order, order);
    const cases = Object.values(report.cases);
    assert.ok(cases.length >= 12, `${cases.length} kinds of error`);
    assert.ok(cases.every((n) => n === 10), "every kind thrown in every round");
    assert.equal(report.errors, 10 * cases.length);
  });
}
