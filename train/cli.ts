/**
 * The argument parsing every moerl command shares: node's `parseArgs`,
 * strict, with `-h/--help`, and the same exit statuses (0 after the usage
 * for --help, 2 after a bad argument and the usage).
 * @module
 */
import { resolve } from "node:path";
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import { envVar } from "../ffi/env.ts";
import { editDistance, foldKey } from "../model/settings.ts";

/** What {@link parseCommandLine} parsed: parseArgs' result with `help` among the options. */
export type ParsedCommandLine<T extends ParseArgsOptionsConfig> = ReturnType<
  typeof parseArgs<
    { options: T & { help: { type: "boolean"; short: "h" } }; allowPositionals: true; strict: true }
  >
>;

/**
 * Parses args for `command` (its name in messages). Returns the parsed
 * values, or the exit status when the command has nothing more to do: 0
 * once the usage is printed for --help, 2 once a bad argument is reported
 * (with the usage) on stderr. Positional arguments are an error unless
 * `positionals` says the command takes them. An unknown option is named with
 * the nearest known one, else with what `hint` says of its name (a command
 * with --set: the setting of that name).
 */
export function parseCommandLine<T extends ParseArgsOptionsConfig>(
  command: string,
  usage: string,
  args: string[],
  options: T,
  positionals = false,
  hint?: (name: string) => string | null,
): ParsedCommandLine<T> | number {
  let parsed: ParsedCommandLine<T>;
  try {
    parsed = parseArgs({
      args,
      options: { ...options, help: { type: "boolean", short: "h" } },
      allowPositionals: true,
      strict: true,
    }) as ParsedCommandLine<T>;
    if (!positionals && parsed.positionals.length) {
      throw new TypeError(`unexpected argument '${parsed.positionals[0]}'`);
    }
  } catch (e) {
    const message = unknownOption(e, Object.keys(options), positionals, hint) ?? (e as Error).message;
    console.error(`${command}: ${message}\n${usage}`);
    return 2;
  }
  if ((parsed.values as { help?: boolean }).help) {
    console.log(usage);
    return 0;
  }
  return parsed;
}

/**
 * parseArgs' unknown-option error said plainly: its advice on positionals that start with "-" (with an
 * unbalanced quote) only where the command takes positionals, and a suggestion. Null for other errors.
 */
function unknownOption(
  e: unknown,
  known: readonly string[],
  positionals: boolean,
  hint?: (name: string) => string | null,
): string | null {
  if ((e as { code?: unknown }).code !== "ERR_PARSE_ARGS_UNKNOWN_OPTION") return null;
  const option = /^Unknown option '([^']+)'/.exec((e as Error).message)?.[1];
  if (option === undefined) return null;
  const name = option.replace(/^-+/, ""), folded = foldKey(name);
  const near = [...known, "help"].filter((k) =>
    editDistance(folded, foldKey(k)) <= Math.max(1, Math.floor(folded.length / 4))
  );
  const more = near.length === 1 ? `did you mean --${near[0]}?` : hint?.(name) ?? null;
  const dash = positionals ? `; to pass ${option} as an argument, put it after "--"` : "";
  return `unknown option ${option}${more ? ` (${more})` : ""}${dash}`;
}

/** What {@link numberOption} accepts: an integer or any finite number, with a lower bound. */
export interface NumberRule {
  /** Only safe integers. */
  integer?: boolean;
  /** The smallest value allowed (inclusive). */
  min?: number;
  /** Values must be greater than this. */
  above?: number;
}

/**
 * The number an option's text holds.
 * @throws {TypeError} naming the option, the rule and the text, when it holds no such number
 */
export function numberOption(name: string, text: string, rule: NumberRule = {}): number {
  const n = text.trim() === "" ? NaN : Number(text);
  const ok = (rule.integer ? Number.isSafeInteger(n) : Number.isFinite(n)) &&
    (rule.min === undefined || n >= rule.min) && (rule.above === undefined || n > rule.above);
  if (ok) return n;
  const bound = rule.min !== undefined
    ? ` >= ${rule.min}`
    : rule.above !== undefined
    ? ` > ${rule.above}`
    : "";
  throw new TypeError(
    `--${name}: expected ${rule.integer ? "an integer" : "a number"}${bound}, got "${text}"`,
  );
}

/**
 * The folder a command's relative paths mean: where the user started it. `deno task` runs in the project
 * folder and says where it was started in INIT_CWD.
 */
export function startDir(): string {
  return envVar("INIT_CWD") ?? Deno.cwd();
}

/** path resolved against {@link startDir}; undefined stays undefined. */
export function fromStartDir<P extends string | undefined>(path: P): P {
  return (path === undefined ? undefined : resolve(startDir(), path)) as P;
}

/** How a command reports a failure: the message, or the whole stack when MOERL_DEBUG=1. */
export function failureText(e: unknown): string {
  const error = e instanceof Error ? e : new Error(String(e));
  return envVar("MOERL_DEBUG") === "1" ? error.stack ?? error.message : error.message;
}

/**
 * The process count `--nproc` asks for.
 * @param launched whether a launcher started this process (WORLD_SIZE set): --nproc then has no place
 * @throws {TypeError} for a count that is not an integer ≥ 1, or under a launcher
 */
export function nprocOption(text: string, launched: boolean): number {
  if (launched) {
    throw new TypeError("--nproc starts the ranks itself; under a launcher (WORLD_SIZE is set) leave it out");
  }
  return numberOption("nproc", text, { integer: true, min: 1 });
}
