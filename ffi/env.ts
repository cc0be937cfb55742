/**
 * Reading the environment from library code, which may run without
 * `--allow-env` (a notebook, an embedding program): a denied permission reads
 * as unset, as does an empty value, so that one rule holds for every variable
 * moerl honours.
 * @module
 */

/** The value of an environment variable; undefined when unset, empty, or not permitted. */
export function envVar(name: string): string | undefined {
  try {
    return Deno.env.get(name) || undefined;
  } catch {
    return undefined;
  }
}
