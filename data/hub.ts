/**
 * Resolving one file of a Hugging Face Hub dataset repo (e.g. openai/gsm8k's
 * `main/train-00000-of-00001.parquet`) to a local path through the standard
 * HF cache that Python's huggingface_hub shares
 * (`datasets--org--name/{refs,snapshots,blobs}`), as model/hub.ts does for
 * models: a cached file is used without touching the network; otherwise it is
 * downloaded with `@huggingface/hub`, which writes the same layout.
 * @module
 */
import { join } from "node:path";
import {
  cachedCommit,
  hubCacheDir,
  hubOffline,
  hubRequests,
  parseRepoId,
  pinRevision,
  requestedRevision,
  type ResolveOptions,
} from "../model/hub.ts";
import { isFile } from "../model/json.ts";

/** Options for {@link resolveDatasetFile}: those of model/hub.ts's resolveModel. */
export type DatasetFileOptions = ResolveOptions;

/** The cache folder of one dataset repo: `datasets--org--name` (huggingface_hub's naming). */
export function datasetCacheDir(cacheDir: string, repo: string): string {
  return join(cacheDir, `datasets--${repo.split("/").join("--")}`);
}

/**
 * A local path holding one file of a Hub dataset repo: the cached copy of the
 * revision's snapshot, else a fresh download into the cache.
 * @param id "org/name" or "org/name@revision"
 * @param path the file inside the repo, e.g. "main/train-00000-of-00001.parquet"
 * @throws {Error} for a malformed id; offline with the file not cached (naming the repo, revision, file and
 *   cache folder); or a failed download (naming the step and suggesting HF_TOKEN / HF_HUB_OFFLINE)
 */
export async function resolveDatasetFile(
  id: string,
  path: string,
  opts: DatasetFileOptions = {},
): Promise<string> {
  let ref;
  try {
    ref = parseRepoId(id);
  } catch {
    throw new Error(`"${id}" is not a Hub dataset id: expected "org/name" or "org/name@revision"`);
  }
  const revision = requestedRevision(id, ref.revision, opts);
  const cacheDir = opts.cacheDir ?? hubCacheDir();
  const repoDir = datasetCacheDir(cacheDir, ref.repo);
  const offline = hubOffline(opts);

  const commit = await cachedCommit(repoDir, revision);
  const cached = commit ? join(repoDir, "snapshots", commit, path) : null;
  if (cached && (await isFile(cached))) return cached;
  if (offline) {
    const looked = cached ?? join(repoDir, "refs", revision);
    throw new Error(
      `dataset ${ref.repo}@${revision}: offline (HF_HUB_OFFLINE) and ${path} is not in the cache ` +
        `(looked for ${looked}); cache folder ${cacheDir} (set HF_HUB_CACHE or HF_HOME to use another, ` +
        `or unset HF_HUB_OFFLINE to download)`,
    );
  }
  return await download(ref.repo, revision, path, cacheDir, repoDir, opts);
}

/** Pins the revision to a commit, records the ref, and downloads the file into the cache. */
async function download(
  repo: string,
  revision: string,
  path: string,
  cacheDir: string,
  repoDir: string,
  opts: DatasetFileOptions,
): Promise<string> {
  const { common, step } = hubRequests(`dataset ${repo}@${revision}`, cacheDir, opts);
  // Loaded only when downloading (see model/hub.ts).
  const { datasetInfo, downloadFileToCacheDir } = await import("@huggingface/hub");
  // Pin the revision first, so a later "main" that moves does not mix files of two commits.
  const info = await step(
    "resolving the revision",
    () => datasetInfo({ name: repo, revision, additionalFields: ["sha"], ...common }),
  );
  const commit = await pinRevision(
    `dataset ${repo}@${revision}`,
    repoDir,
    revision,
    (info as { sha?: unknown }).sha,
  );
  return await step(
    `downloading ${path}`,
    () =>
      downloadFileToCacheDir({
        repo: { type: "dataset", name: repo },
        path,
        revision: commit,
        cacheDir,
        ...common,
      }),
  );
}
