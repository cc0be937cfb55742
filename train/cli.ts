/**
 * The argument parsing every moerl command shares: node's `parseArgs`,
 * strict, with `-h/--help`, and the same exit statuses (0 after the usage
 * for --help, 2 after a bad argument and the usage).
 * @module
 */
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";

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
 * `positionals` says the command takes them.
 */
export function parseCommandLine<T extends ParseArgsOptionsConfig>(
  command: string,
  usage: string,
  args: string[],
  options: T,
  positionals = false,
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
    console.error(`${command}: ${(e as Error).message}\n${usage}`);
    return 2;
  }
  if ((parsed.values as { help?: boolean }).help) {
    console.log(usage);
    return 0;
  }
  return parsed;
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
