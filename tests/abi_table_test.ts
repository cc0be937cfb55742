/**
 * The Deno.dlopen table (ffi/symbols.ts) against the C header it transcribes
 * (ffi/shim/moerl.h): the same functions, and for each the same number of
 * parameters and matching types. A mismatch (an int64_t declared "i32", a
 * parameter left out) is not caught by the compiler or by dlopen: the call
 * reads the wrong registers and corrupts memory silently. Reads both files as
 * text; needs no built shim.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { symbols } from "../ffi/symbols.ts";

const HEADER = join(import.meta.dirname!, "..", "ffi", "shim", "moerl.h");

/** Opaque handle types: pointers to the FFI. */
const HANDLES = new Set(["mt_tensor", "mt_generator", "mt_group", "mt_graph"]);
const SCALARS: Record<string, string> = {
  int32_t: "i32",
  int64_t: "i64",
  uint64_t: "u64",
  double: "f64",
  void: "void",
};

/** The FFI types that may stand for C type c: a caller's array ("buffer") or an opaque address ("pointer"). */
function accepted(c: string, result: boolean): string[] {
  const t = c.replace(/\bconst\b/g, "").replace(/\s+/g, " ").trim();
  if (t.endsWith("*")) {
    // A context and every pointer result are opaque addresses; other pointer arguments are the caller's memory.
    return result || t.slice(0, -1).trim() === "mt_ctx" ? ["pointer"] : ["buffer", "pointer"];
  }
  if (HANDLES.has(t)) return ["pointer"];
  return SCALARS[t] ? [SCALARS[t]] : [`(no FFI type for "${t}")`];
}

interface Decl {
  result: string;
  params: string[];
}

/** The header's function declarations: name → C result and parameter types (names dropped). */
function declarations(header: string): Map<string, Decl> {
  const code = header.replace(/\/\*[\s\S]*?\*\//g, " ").replace(/\/\/.*$/gm, " ");
  const out = new Map<string, Decl>();
  for (const [, result, name, list] of code.matchAll(/([A-Za-z_][\w\s*]*?)\b(mt_\w+)\s*\(([^)]*)\)\s*;/g)) {
    const params = list!.trim() === "void" || list!.trim() === ""
      ? []
      : list!.split(",").map((p) => p.trim().replace(/([*\s])\w+$/, "$1").trim());
    out.set(name!, { result: result!.trim(), params });
  }
  return out;
}

/** Every disagreement between the header's declarations and a symbol table, one line each. */
function mismatches(
  header: string,
  table: Record<string, { parameters: readonly string[]; result: string }>,
): string[] {
  const decls = declarations(header);
  const out: string[] = [];
  for (const [name, d] of decls) {
    const sym = table[name];
    if (!sym) {
      out.push(`${name}: declared in moerl.h, missing from symbols.ts`);
      continue;
    }
    if (d.params.length !== sym.parameters.length) {
      out.push(`${name}: ${d.params.length} parameters in moerl.h, ${sym.parameters.length} in symbols.ts`);
      continue;
    }
    d.params.forEach((c, i) => {
      const ok = accepted(c, false);
      if (!ok.includes(sym.parameters[i]!)) {
        out.push(`${name}: parameter ${i} is ${c}, symbols.ts says ${sym.parameters[i]}`);
      }
    });
    if (!accepted(d.result, true).includes(sym.result)) {
      out.push(`${name}: returns ${d.result}, symbols.ts says ${sym.result}`);
    }
  }
  for (const name of Object.keys(table)) {
    if (!decls.has(name)) out.push(`${name}: in symbols.ts, not declared in moerl.h`);
  }
  return out;
}

Deno.test("abi table: symbols.ts matches every declaration of moerl.h", () => {
  const header = Deno.readTextFileSync(HEADER);
  assert.equal(declarations(header).size, Object.keys(symbols).length, "functions declared vs. in the table");
  assert.deepEqual(mismatches(header, symbols), []);
});

Deno.test("abi table: the comparison sees a changed parameter or result type, a dropped parameter and a missing function", () => {
  const header = Deno.readTextFileSync(HEADER);
  const changed = header
    .replace(
      "mt_transpose(mt_ctx* ctx, mt_tensor t, int64_t d0, int64_t d1)",
      "mt_transpose(mt_ctx* ctx, mt_tensor t, int32_t d0, int64_t d1)",
    )
    .replace(
      "int32_t mt_item(mt_ctx* ctx, mt_tensor t, double* out)",
      "int32_t mt_item(mt_ctx* ctx, mt_tensor t)",
    )
    .replace("int64_t mt_live_count(void);", "int32_t mt_live_count(void);")
    .replace(
      "int32_t mt_abi_version(void);",
      "int32_t mt_abi_version(void);\nint64_t mt_new_thing(mt_ctx* ctx);",
    );
  assert.notEqual(changed, header);
  assert.deepEqual(mismatches(changed, symbols).sort(), [
    "mt_item: 2 parameters in moerl.h, 3 in symbols.ts",
    "mt_live_count: returns int32_t, symbols.ts says i64",
    "mt_new_thing: declared in moerl.h, missing from symbols.ts",
    "mt_transpose: parameter 2 is int32_t, symbols.ts says i64",
  ]);
});
