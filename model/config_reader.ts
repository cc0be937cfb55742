/**
 * Typed, checked reads of keys from a parsed config.json: each getter either
 * returns a value of the right type, applies the given default when the key is
 * absent, or throws an error naming the key and the file.
 * @module
 */
import { isJsonObject, type JsonObject } from "./json.ts";

/** A bad or missing config key; the message names the key and the file. */
export class ModelConfigError extends Error {
  /** Makes a ModelConfigError (name "ModelConfigError"). */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ModelConfigError";
  }
}

/** Reads keys of one JSON object, naming `source` in every error. */
export class ConfigReader {
  /** The parsed JSON object. */
  readonly raw: JsonObject;
  /** The file it came from, for messages. */
  readonly source: string;

  /** Wraps a parsed object; throws if it is not an object. */
  constructor(raw: unknown, source: string) {
    if (!isJsonObject(raw)) throw new ModelConfigError(`${source}: must be a JSON object`);
    this.raw = raw;
    this.source = source;
  }

  /** True when the key is present (even if null; an undefined value, possible only from JS callers, is absent). */
  has(key: string): boolean {
    return Object.hasOwn(this.raw, key) && this.raw[key] !== undefined;
  }

  /** An error naming the key and the file. */
  error(key: string, problem: string): ModelConfigError {
    return new ModelConfigError(`${this.source}: "${key}" ${problem}`);
  }

  #get(key: string, fallback: unknown): unknown {
    if (this.has(key)) return this.raw[key];
    if (fallback === undefined) {
      throw new ModelConfigError(`${this.source}: required key "${key}" is missing`);
    }
    return fallback;
  }

  #bad(key: string, want: string, got: unknown): never {
    throw this.error(key, `must be ${want}, got ${JSON.stringify(got)}`);
  }

  /** An integer ≥ min (required when fallback is undefined). */
  int(key: string, fallback?: number, min = 1): number {
    const v = this.#get(key, fallback);
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
      this.#bad(key, `an integer ≥ ${min}`, v);
    }
    return v as number;
  }

  /** An integer ≥ min, or null. */
  intOrNull(key: string, fallback: number | null, min = 0): number | null {
    const v = this.#get(key, fallback);
    if (v === null) return null;
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
      this.#bad(key, `an integer ≥ ${min} or null`, v);
    }
    return v as number;
  }

  /** A finite number ≥ min. */
  num(key: string, fallback?: number, min = 0): number {
    const v = this.#get(key, fallback);
    if (typeof v !== "number" || !Number.isFinite(v) || v < min) this.#bad(key, `a number ≥ ${min}`, v);
    return v as number;
  }

  /** A boolean. */
  bool(key: string, fallback?: boolean): boolean {
    const v = this.#get(key, fallback);
    if (typeof v !== "boolean") this.#bad(key, "true or false", v);
    return v as boolean;
  }

  /** A string. */
  str(key: string, fallback?: string): string {
    const v = this.#get(key, fallback);
    if (typeof v !== "string") this.#bad(key, "a string", v);
    return v as string;
  }

  /** A token id, a list of token ids, or null. */
  ids(key: string, fallback: number | number[] | null): number | number[] | null {
    const v = this.#get(key, fallback);
    const isId = (x: unknown): x is number => typeof x === "number" && Number.isSafeInteger(x) && x >= 0;
    if (v === null || isId(v)) return v;
    if (Array.isArray(v) && v.every(isId)) return [...v];
    return this.#bad(key, "a token id, a list of token ids, or null", v);
  }

  /** A list of integers ≥ 0 (null reads as the fallback, as HF does for mlp_only_layers). */
  intList(key: string, fallback: number[]): number[] {
    const v = this.#get(key, fallback);
    if (v === null) return [...fallback];
    if (!Array.isArray(v) || !v.every((x) => typeof x === "number" && Number.isSafeInteger(x) && x >= 0)) {
      this.#bad(key, "a list of non-negative integers", v);
    }
    return [...(v as number[])];
  }

  /** A JSON object or null. */
  objOrNull(key: string): JsonObject | null {
    const v = this.#get(key, null);
    if (v !== null && !isJsonObject(v)) this.#bad(key, "an object or null", v);
    return v as JsonObject | null;
  }
}
