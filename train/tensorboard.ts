/**
 * TensorBoard event files, written without TensorFlow: each update's metrics as scalars, so that
 * `tensorboard --logdir runs/` charts every run beside report.html. A file is a sequence of records (length,
 * masked CRC-32C of the length, an `Event` protocol buffer, masked CRC-32C of it); an `Event` holds a wall
 * time, a step and either the file version, a session log or a summary of tagged float values. Only those
 * fields are written, encoded by hand here (tensorboard/compat/proto/event.proto and summary.proto).
 * @module
 */
import { hostname } from "node:os";
import { join } from "node:path";
import { writeAll } from "../model/atomic_write.ts";

/** What one event carries besides its time and step. */
export type EventBody =
  | { fileVersion: string }
  | { sessionStart: true }
  | { scalars: Readonly<Record<string, number>> };

/** One event of an event file. */
export interface TensorBoardEvent {
  /** Seconds since the Unix epoch. */
  wallTime: number;
  /** The step (the update), the x axis of TensorBoard's charts. */
  step: number;
  /** The file version, a session (re)start, or scalars. */
  body: EventBody;
}

/** The version string TensorBoard expects first in a file. */
export const EVENT_FILE_VERSION = "brain.Event:2";

const CRC32C_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1; // Castagnoli, reflected
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32C (Castagnoli) of bytes. */
export function crc32c(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC32C_TABLE[(c ^ b) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** The record format's checksum: the CRC rotated and offset, so that a CRC of CRCs stays informative. */
function maskedCrc(bytes: Uint8Array): number {
  const c = crc32c(bytes);
  return ((((c >>> 15) | (c << 17)) >>> 0) + 0xa282ead8) >>> 0;
}

/** Protocol-buffer bytes of one message, field by field. */
class Proto {
  readonly #parts: number[] = [];

  #varint(v: bigint): void {
    let x = BigInt.asUintN(64, v);
    while (x >= 0x80n) {
      this.#parts.push(Number(x & 0x7fn) | 0x80);
      x >>= 7n;
    }
    this.#parts.push(Number(x));
  }

  #key(field: number, wire: number): void {
    this.#varint(BigInt((field << 3) | wire));
  }

  #raw(bytes: Uint8Array): void {
    for (const b of bytes) this.#parts.push(b);
  }

  int64(field: number, v: number): this {
    this.#key(field, 0);
    this.#varint(BigInt(v));
    return this;
  }

  /** A fixed-width little-endian number: wire type 1 (8 bytes) or 5 (4 bytes). */
  #fixed(field: number, wire: 1 | 5, set: (view: DataView) => void): this {
    const b = new Uint8Array(wire === 1 ? 8 : 4);
    set(new DataView(b.buffer));
    this.#key(field, wire);
    this.#raw(b);
    return this;
  }

  double(field: number, v: number): this {
    return this.#fixed(field, 1, (d) => d.setFloat64(0, v, true));
  }

  float(field: number, v: number): this {
    return this.#fixed(field, 5, (d) => d.setFloat32(0, v, true));
  }

  bytes(field: number, v: Uint8Array): this {
    this.#key(field, 2);
    this.#varint(BigInt(v.length));
    this.#raw(v);
    return this;
  }

  string(field: number, v: string): this {
    return this.bytes(field, new TextEncoder().encode(v));
  }

  done(): Uint8Array {
    return Uint8Array.from(this.#parts);
  }
}

/** An `Event` message's bytes (proto3: a step of 0 is left out, as protobuf's own encoders do). */
export function encodeEvent(e: TensorBoardEvent): Uint8Array {
  const p = new Proto().double(1, e.wallTime);
  if (e.step !== 0) p.int64(2, e.step);
  const body = e.body;
  if ("fileVersion" in body) p.string(3, body.fileVersion);
  else if ("sessionStart" in body) p.bytes(7, new Proto().int64(1, 1).done()); // SessionLog{status: START}
  else {
    const summary = new Proto();
    for (const [tag, value] of Object.entries(body.scalars)) {
      summary.bytes(1, new Proto().string(1, tag).float(2, value).done()); // Summary.Value{tag, simple_value}
    }
    p.bytes(5, summary.done());
  }
  return p.done();
}

/** One record of an event file around data. */
export function frameRecord(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(8 + 4 + data.length + 4);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(data.length), true);
  view.setUint32(8, maskedCrc(out.subarray(0, 8)), true);
  out.set(data, 12);
  view.setUint32(12 + data.length, maskedCrc(data), true);
  return out;
}

/** Options of {@link TensorBoardLog.open}. */
export interface TensorBoardLogOptions {
  /**
   * A resumed run's first step: a session-start event at it tells TensorBoard to drop what earlier files
   * logged from that step on (the updates a crash cut off after the checkpoint), as the metrics log does.
   */
  resumeStep?: number;
  /** The clock, in seconds since the Unix epoch (default the system's). */
  now?: () => number;
}

/** An event file being written: one per training process start, in the run folder. */
export class TensorBoardLog {
  /** The file. */
  readonly path: string;
  #file: Deno.FsFile | null;
  readonly #now: () => number;

  private constructor(path: string, file: Deno.FsFile, now: () => number) {
    this.path = path;
    this.#file = file;
    this.#now = now;
  }

  /**
   * Starts a new event file in dir (`events.out.tfevents.<seconds>.<host>.<pid>`, TensorBoard's naming, with
   * `.1` to `.9` after it when this process started one there in the same second: a later name sorts after,
   * so TensorBoard reads the files in the order they were started).
   * @throws {Error} naming the file when it cannot be created
   */
  static async open(dir: string, opts: TensorBoardLogOptions = {}): Promise<TensorBoardLog> {
    const now = opts.now ?? (() => Date.now() / 1000);
    const start = now();
    const base = join(dir, `events.out.tfevents.${Math.floor(start)}.${hostname()}.${Deno.pid}`);
    let file: Deno.FsFile | null = null, path = base;
    for (let n = 1; file === null; n++) {
      try {
        file = await Deno.open(path, { write: true, createNew: true });
      } catch (e) {
        if (!(e instanceof Deno.errors.AlreadyExists) || n > 9) {
          throw new Error(`cannot create ${path}: ${(e as Error).message}`, { cause: e });
        }
        path = `${base}.${n}`;
      }
    }
    const log = new TensorBoardLog(path, file, now);
    try {
      await log.#write({ wallTime: start, step: 0, body: { fileVersion: EVENT_FILE_VERSION } });
      if (opts.resumeStep !== undefined) {
        await log.#write({ wallTime: now(), step: opts.resumeStep, body: { sessionStart: true } });
      }
    } catch (e) {
      log.close();
      throw e;
    }
    return log;
  }

  /** Logs the finite numbers of values as scalars at step (names as they are; others are left out). */
  async scalars(step: number, values: Readonly<Record<string, unknown>>): Promise<void> {
    const scalars = Object.fromEntries(
      Object.entries(values).filter((kv): kv is [string, number] =>
        typeof kv[1] === "number" && Number.isFinite(kv[1])
      ),
    );
    await this.#write({ wallTime: this.#now(), step, body: { scalars } });
  }

  async #write(e: TensorBoardEvent): Promise<void> {
    if (!this.#file) throw new Error(`${this.path}: event file is closed`);
    const bytes = frameRecord(encodeEvent(e));
    try {
      await writeAll(this.#file, bytes);
    } catch (e) {
      throw new Error(`cannot append to ${this.path}: ${(e as Error).message}`, { cause: e });
    }
  }

  /** Closes the file. Idempotent. */
  close(): void {
    this.#file?.close();
    this.#file = null;
  }
}
