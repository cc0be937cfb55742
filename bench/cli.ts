/**
 * The command line of a bench: strict flags with `-h/--help` (train/cli.ts's
 * parseCommandLine), and a usage line made from the flags and their defaults.
 * @module
 */
import type { ParseArgsOptionsConfig } from "node:util";
import { parseCommandLine, type ParsedCommandLine } from "../train/cli.ts";

/**
 * The flags of `command` (its name in messages, e.g. "deno task bench:rl"); prints the usage and exits 0 on
 * --help, 2 on a bad flag. `about` follows the usage line: what the bench measures and where it is described.
 */
export function benchArgs<T extends ParseArgsOptionsConfig>(
  command: string,
  about: string,
  options: T,
): ParsedCommandLine<T>["values"] {
  const flags = Object.entries(options).map(([name, o]) =>
    o.type === "boolean" ? `[--${name}]` : `[--${name} ${o.default ?? "…"}]`
  );
  const usage = `usage: ${command} ${flags.join(" ")}\n${about}`;
  const parsed = parseCommandLine(command, usage, Deno.args, options);
  if (typeof parsed === "number") Deno.exit(parsed);
  return parsed.values;
}
