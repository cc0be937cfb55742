/**
 * Turning a model name into a local folder: a folder on disk as-is, or a
 * Hugging Face Hub repo id ("org/name", optionally "@revision") resolved
 * through the standard HF cache (`models--org--name/{refs,snapshots,blobs}`)
 * that Python's huggingface_hub shares. A complete cached snapshot is used
 * without touching the network; otherwise the files a model needs are
 * downloaded with `@huggingface/hub`, which writes the same cache layout.
 * @module
 */
import { dirname, join, resolve } from "node:path";
import { homedir } from "node:os";
import { envVar } from "../ffi/env.ts";
import { INDEX_FILE, readIndex, SINGLE_FILE } from "./checkpoint.ts";
import { isDirectory, isFile } from "./json.ts";

/** Options for {@link resolveModel}. */
export interface ResolveOptions {
  /** Branch, tag or 40-hex commit (default "main", or the id's "@revision"). */
  revision?: string;
  /** Cache folder (default: {@link hubCacheDir}). */
  cacheDir?: string;
  /** Access token (default: $HF_TOKEN). */
  token?: string;
  /** Use only the cache (default: $HF_HUB_OFFLINE is "1"/"true"/"yes"/"on"). */
  offline?: boolean;
  /** Hub endpoint (default: $HF_ENDPOINT, else huggingface.co). */
  hubUrl?: string;
}

/** Files besides the weights that a model folder should carry. */
export const MODEL_FILES: readonly string[] = [
  "config.json",
  "generation_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "chat_template.jinja",
];

/** Files without which a cached snapshot is not usable (plus complete weights). */
export const REQUIRED_FILES: readonly string[] = ["config.json", "tokenizer.json", "tokenizer_config.json"];

/**
 * The HF hub cache folder, as huggingface_hub picks it: $HF_HUB_CACHE, else
 * $HUGGINGFACE_HUB_CACHE (legacy), else $HF_HOME/hub, else
 * $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.
 */
export function hubCacheDir(getEnv: (name: string) => string | undefined = envVar): string {
  const direct = getEnv("HF_HUB_CACHE") ?? getEnv("HUGGINGFACE_HUB_CACHE");
  if (direct) return direct;
  const home = getEnv("HF_HOME") ??
    join(getEnv("XDG_CACHE_HOME") ?? join(homedir(), ".cache"), "huggingface");
  return join(home, "hub");
}

/** A parsed repo id. */
export interface RepoRef {
  /** "org/name". */
  repo: string;
  /** Revision from "@rev", if given. */
  revision?: string;
}

// The Hub's rules: letters, digits, "-", "_", "."; no leading/trailing "-" or "."; no "--" or "..".
const PART = /^(?![-.])(?!.*(--|\.\.))[A-Za-z0-9._-]{1,96}(?<![-.])$/;

/**
 * Parses "org/name" or "org/name@revision".
 * @throws {Error} explaining the expected form when id is not a valid repo id
 */
export function parseRepoId(id: string): RepoRef {
  const at = id.indexOf("@");
  const repo = at < 0 ? id : id.slice(0, at);
  const revision = at < 0 ? undefined : id.slice(at + 1);
  const parts = repo.split("/");
  if (parts.length !== 2 || !parts.every((p) => PART.test(p)) || revision === "") {
    throw new Error(
      `"${id}" is neither an existing local folder nor a Hub repo id: expected "org/name" or "org/name@revision" ` +
        `(letters, digits, "-", "_", "."; no "--" or "..")`,
    );
  }
  return revision === undefined ? { repo } : { repo, revision };
}

/** The cache folder of one model repo: `models--org--name`. */
export function repoCacheDir(cacheDir: string, repo: string): string {
  return join(cacheDir, `models--${repo.split("/").join("--")}`);
}

const COMMIT = /^[0-9a-f]{40}$/;

/**
 * The commit a revision names in a repo's cache folder (itself when it is a commit), or null when the cache
 * has no ref for it. Shared by models and datasets (data/hub.ts).
 * @throws {Error} naming the ref file when it holds no commit hash
 */
export async function cachedCommit(repoDir: string, revision: string): Promise<string | null> {
  if (COMMIT.test(revision)) return revision;
  const ref = join(repoDir, "refs", revision);
  if (!(await isFile(ref))) return null;
  const commit = (await Deno.readTextFile(ref)).trim();
  if (!COMMIT.test(commit)) throw new Error(`${ref}: expected a 40-hex commit hash, found "${commit}"`);
  return commit;
}

/** The cached snapshot folder for a revision, or null when the cache does not know it. */
async function cachedSnapshot(repoDir: string, revision: string): Promise<string | null> {
  const commit = await cachedCommit(repoDir, revision);
  const snap = commit ? join(repoDir, "snapshots", commit) : null;
  return snap && (await isDirectory(snap)) ? snap : null;
}

/**
 * The revision a request asks for: the id's `@revision` or opts.revision (which must agree), else "main".
 * @throws {Error} when both are given and differ
 */
export function requestedRevision(id: string, idRevision: string | undefined, opts: ResolveOptions): string {
  if (idRevision && opts.revision && idRevision !== opts.revision) {
    throw new Error(`"${id}" names revision ${idRevision} but opts.revision is ${opts.revision}`);
  }
  return opts.revision ?? idRevision ?? "main";
}

/** Whether to use the cache only: opts.offline, else $HF_HUB_OFFLINE as huggingface_hub reads it. */
export function hubOffline(opts: ResolveOptions): boolean {
  return opts.offline ?? ["1", "true", "yes", "on"].includes((envVar("HF_HUB_OFFLINE") ?? "").toLowerCase());
}

/**
 * Checks the commit the Hub resolved a revision to and records it as the revision's ref in the cache (as
 * huggingface_hub does), so that the download and later offline runs read that one snapshot.
 * @throws {Error} naming what was asked for when the Hub returned no commit hash
 */
export async function pinRevision(
  what: string,
  repoDir: string,
  revision: string,
  commit: unknown,
): Promise<string> {
  if (typeof commit !== "string" || !COMMIT.test(commit)) {
    throw new Error(`${what}: the Hub returned no commit hash`);
  }
  if (commit !== revision) {
    const refPath = join(repoDir, "refs", revision);
    await Deno.mkdir(dirname(refPath), { recursive: true });
    await Deno.writeTextFile(refPath, commit);
  }
  return commit;
}

/** Files a snapshot folder still lacks to be a complete model ([] when complete). */
export async function missingFiles(dir: string): Promise<string[]> {
  const missing: string[] = [];
  for (const f of REQUIRED_FILES) if (!(await isFile(join(dir, f)))) missing.push(f);
  if (await isFile(join(dir, SINGLE_FILE))) return missing;
  if (!(await isFile(join(dir, INDEX_FILE)))) return [...missing, `${SINGLE_FILE} (or ${INDEX_FILE})`];
  const shards = new Set((await readIndex(join(dir, INDEX_FILE))).values());
  for (const s of [...shards].sort()) if (!(await isFile(join(dir, s)))) missing.push(s);
  return missing;
}

/**
 * A local folder holding the model: idOrPath itself if it is a folder, else
 * the cached (or freshly downloaded) snapshot of the Hub repo it names.
 * @throws {Error} for a path that is not a folder and not a repo id; offline with no complete snapshot
 *   (naming the repo, revision and cache folder, and the missing files); or a failed download
 * @example
 * ```ts ignore
 * const dir = await resolveModel("huihui-ai/Huihui-MoE-1B-A0.6B-SFT"); // HF_HUB_OFFLINE=1: cache only
 * ```
 */
export async function resolveModel(idOrPath: string, opts: ResolveOptions = {}): Promise<string> {
  if (await isDirectory(idOrPath)) return resolve(idOrPath);
  if (await isFile(idOrPath)) {
    throw new Error(`${idOrPath} is a file; expected a model folder or a Hub repo id`);
  }
  if (/^(\.{1,2}|~)?[\\/]/.test(idOrPath) || idOrPath.startsWith(".")) {
    throw new Error(`model folder ${idOrPath} does not exist`);
  }
  const ref = parseRepoId(idOrPath);
  const revision = requestedRevision(idOrPath, ref.revision, opts);
  const cacheDir = opts.cacheDir ?? hubCacheDir();
  const repoDir = repoCacheDir(cacheDir, ref.repo);
  const offline = hubOffline(opts);

  const snap = await cachedSnapshot(repoDir, revision);
  const missing = snap ? await missingFiles(snap) : null;
  if (snap && missing!.length === 0) return snap;
  if (offline) {
    const why = snap
      ? `the cached snapshot ${snap} lacks ${missing!.join(", ")}`
      : `it is not in the cache (looked for ${
        join(repoDir, COMMIT.test(revision) ? `snapshots/${revision}` : `refs/${revision}`)
      })`;
    throw new Error(
      `${ref.repo}@${revision}: offline (HF_HUB_OFFLINE) and ${why}; cache folder ${cacheDir} ` +
        `(set HF_HUB_CACHE or HF_HOME to use another, or unset HF_HUB_OFFLINE to download)${
          notLocal(idOrPath)
        }`,
    );
  }
  try {
    return await download(ref.repo, revision, cacheDir, repoDir, opts);
  } catch (e) {
    throw new Error(`${(e as Error).message}${notLocal(idOrPath)}`, { cause: e });
  }
}

/** For an id that could also be a mistyped relative path ("models/tiny" run from another folder). */
function notLocal(idOrPath: string): string {
  return `. Nor is there a local folder ${resolve(idOrPath)}`;
}

/** What the Hub client needs for authenticated requests. */
export interface HubAuth {
  /** Access token, when one is given or in $HF_TOKEN. */
  accessToken?: string;
  /** Hub endpoint, when one is given or in $HF_ENDPOINT. */
  hubUrl?: string;
}

/**
 * The Hub client's common options (token, endpoint) and a wrapper that turns
 * a failed request into an error naming what (e.g. `org/name@main`), the
 * step, and the ways out (HF_TOKEN, HF_HUB_OFFLINE with the cache folder).
 */
export function hubRequests(
  what: string,
  cacheDir: string,
  opts: { token?: string; hubUrl?: string },
): { common: HubAuth; step: <T>(action: string, fn: () => Promise<T>) => Promise<T> } {
  const accessToken = opts.token ?? envVar("HF_TOKEN");
  const hubUrl = opts.hubUrl ?? envVar("HF_ENDPOINT");
  const common = { ...(accessToken ? { accessToken } : {}), ...(hubUrl ? { hubUrl } : {}) };
  const step = async <T>(action: string, fn: () => Promise<T>): Promise<T> => {
    try {
      return await fn();
    } catch (e) {
      throw new Error(
        `${what}: ${action} failed: ${(e as Error).message} ` +
          `(private or gated repo? set HF_TOKEN; no network? set HF_HUB_OFFLINE=1 to use the cache at ${cacheDir})`,
        { cause: e },
      );
    }
  };
  return { common, step };
}

/** Downloads the model files of one revision into the cache; returns the snapshot folder. */
async function download(
  repo: string,
  revision: string,
  cacheDir: string,
  repoDir: string,
  opts: ResolveOptions,
): Promise<string> {
  const { common, step } = hubRequests(`${repo}@${revision}`, cacheDir, opts);
  // Loaded only when downloading: importing moerl must not pull in the Hub client.
  const { downloadFileToCacheDir, listFiles, modelInfo } = await import("@huggingface/hub");
  // Pin the revision to a commit first, so every file comes from the same snapshot.
  const info = await step(
    "resolving the revision",
    () => modelInfo({ name: repo, revision, additionalFields: ["sha"], ...common }),
  );
  const commit = await pinRevision(`${repo}@${revision}`, repoDir, revision, info.sha);
  const wanted: string[] = [];
  await step("listing files", async () => {
    for await (const f of listFiles({ repo, revision: commit, ...common })) {
      if (
        f.type === "file" &&
        (MODEL_FILES.includes(f.path) || f.path.endsWith(".safetensors") || f.path === INDEX_FILE)
      ) {
        wanted.push(f.path);
      }
    }
  });
  for (const path of wanted) {
    await step(
      `downloading ${path}`,
      () => downloadFileToCacheDir({ repo, path, revision: commit, cacheDir, ...common }),
    );
  }
  const snap = join(repoDir, "snapshots", commit);
  const missing = await missingFiles(snap);
  if (missing.length > 0) {
    throw new Error(`${repo}@${revision} (${commit}): the repo has no ${missing.join(", ")}`);
  }
  return snap;
}
