/**
 * Resolving models: local folders, repo-id syntax, the HF cache layout found
 * offline, and the offline errors. The Hub cannot be reached here, so the
 * download path is not exercised; every test is offline, and the one that
 * runs "online" with a complete cache points HF_ENDPOINT at a closed local
 * port to prove no request is made.
 */
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { join, resolve } from "node:path";
import { hubCacheDir, missingFiles, parseRepoId, repoCacheDir, resolveModel } from "../model/mod.ts";
import { withEnv } from "./util.ts";

const MODELS = fileURLToPath(new URL("./fixtures/models/", import.meta.url));
const COMMIT = "0123456789abcdef0123456789abcdef01234567";
const NO_HUB = "http://127.0.0.1:9"; // discard port: nothing listens, so any request fails at once

/** A fake HF cache holding org/name at COMMIT (refs/main → COMMIT) built from a fixture folder. */
async function fakeCache(
  model: string,
  opts: { drop?: string[] } = {},
): Promise<{ cache: string; snap: string }> {
  const cache = await Deno.makeTempDir({ prefix: "moerl_hub_" });
  const repoDir = repoCacheDir(cache, "org/name");
  const snap = join(repoDir, "snapshots", COMMIT);
  await Deno.mkdir(join(repoDir, "refs"), { recursive: true });
  await Deno.mkdir(join(repoDir, "blobs"), { recursive: true });
  await Deno.mkdir(snap, { recursive: true });
  await Deno.writeTextFile(join(repoDir, "refs", "main"), COMMIT);
  // as huggingface_hub lays it out: content in blobs/, symlinks from the snapshot
  const files = [
    ...(await Array.fromAsync(Deno.readDir(join(MODELS, model)))).map((e) => e.name),
    "tokenizer.json",
    "tokenizer_config.json",
  ];
  for (const f of files) {
    if (opts.drop?.includes(f)) continue;
    const blob = join(repoDir, "blobs", `blob-${f}`);
    if (f.startsWith("tokenizer")) await Deno.writeTextFile(blob, "{}");
    else await Deno.copyFile(join(MODELS, model, f), blob);
    await Deno.symlink(blob, join(snap, f));
  }
  return { cache, snap };
}

Deno.test("hub: cache folder from the environment, as huggingface_hub picks it", () => {
  const env = (vars: Record<string, string>) => (k: string) => vars[k];
  assert.equal(hubCacheDir(env({ HF_HUB_CACHE: "/a", HF_HOME: "/b" })), "/a");
  assert.equal(hubCacheDir(env({ HUGGINGFACE_HUB_CACHE: "/legacy", HF_HOME: "/b" })), "/legacy");
  assert.equal(hubCacheDir(env({ HF_HOME: "/b", XDG_CACHE_HOME: "/x" })), "/b/hub");
  assert.equal(hubCacheDir(env({ XDG_CACHE_HOME: "/x" })), "/x/huggingface/hub");
  assert.match(hubCacheDir(env({})), /\/\.cache\/huggingface\/hub$/);
  assert.equal(repoCacheDir("/c", "Qwen/Qwen3-30B-A3B"), "/c/models--Qwen--Qwen3-30B-A3B");
});

Deno.test("hub: repo id syntax", () => {
  assert.deepEqual(parseRepoId("microsoft/Phi-tiny-MoE-instruct"), {
    repo: "microsoft/Phi-tiny-MoE-instruct",
  });
  assert.deepEqual(parseRepoId("huihui-ai/Huihui-MoE-1B-A0.6B-SFT@v1.0"), {
    repo: "huihui-ai/Huihui-MoE-1B-A0.6B-SFT",
    revision: "v1.0",
  });
  for (
    const bad of [
      "gpt2",
      "a/b/c",
      "org/",
      "/name",
      "-org/name",
      "org/name-",
      "org/na me",
      "org/a--b",
      "org/a..b",
      "org/name@",
      "o/" + "x".repeat(97),
    ]
  ) {
    assert.throws(
      () => parseRepoId(bad),
      /is neither an existing local folder nor a Hub repo id: expected "org\/name"/,
      bad,
    );
  }
});

Deno.test("hub: local folders are used as they are", async () => {
  const rel = "tests/fixtures/models/phimoe-tiny";
  const cwd = Deno.cwd();
  Deno.chdir(fileURLToPath(new URL("..", import.meta.url)));
  try {
    assert.equal(await resolveModel(rel, { offline: true }), resolve(rel));
  } finally {
    Deno.chdir(cwd);
  }
  assert.equal(await resolveModel(join(MODELS, "qwen3-moe-tiny")), join(MODELS, "qwen3-moe-tiny"));
  await assert.rejects(
    () => resolveModel(join(MODELS, "phimoe-tiny", "config.json")),
    /is a file; expected a model folder/,
  );
  await assert.rejects(
    () => resolveModel("./no/such/folder"),
    /model folder .\/no\/such\/folder does not exist/,
  );
  await assert.rejects(() => resolveModel("/no/such/folder"), /does not exist/);
  await assert.rejects(
    () => resolveModel("not a repo!", { offline: true }),
    /neither an existing local folder nor a Hub repo id/,
  );
});

Deno.test("hub: a cached snapshot is found offline (refs, commit, env)", async () => {
  const { cache, snap } = await fakeCache("qwen3-moe-fused");
  try {
    assert.equal(await resolveModel("org/name", { cacheDir: cache, offline: true }), snap);
    assert.equal(await resolveModel(`org/name@${COMMIT}`, { cacheDir: cache, offline: true }), snap);
    assert.equal(await resolveModel("org/name", { cacheDir: cache, offline: true, revision: "main" }), snap);
    // the environment route: HF_HUB_CACHE and HF_HUB_OFFLINE=1
    assert.equal(
      await withEnv({ HF_HUB_CACHE: cache, HF_HUB_OFFLINE: "1" }, () => resolveModel("org/name")),
      snap,
    );
    // HF_HOME/hub when HF_HUB_CACHE is unset
    const home = await Deno.makeTempDir({ prefix: "moerl_hfhome_" });
    try {
      await Deno.symlink(cache, join(home, "hub"));
      const viaHome = join(home, "hub", "models--org--name", "snapshots", COMMIT);
      const env = {
        HF_HUB_CACHE: undefined,
        HUGGINGFACE_HUB_CACHE: undefined,
        HF_HOME: home,
        HF_HUB_OFFLINE: "true",
      };
      assert.equal(await withEnv(env, () => resolveModel("org/name")), viaHome);
    } finally {
      await Deno.remove(home, { recursive: true });
    }
    // online but complete: no request is made (HF_ENDPOINT points at a closed port)
    assert.equal(await resolveModel("org/name", { cacheDir: cache, offline: false, hubUrl: NO_HUB }), snap);
    assert.deepEqual(await missingFiles(snap), []);
  } finally {
    await Deno.remove(cache, { recursive: true });
  }
});

Deno.test("hub: offline errors name the repo, revision, cache folder and what is missing", async () => {
  const empty = await Deno.makeTempDir({ prefix: "moerl_hub_empty_" });
  try {
    await assert.rejects(
      () => resolveModel("org/absent", { cacheDir: empty, offline: true }),
      (e: Error) => {
        assert.match(e.message, /^org\/absent@main: offline \(HF_HUB_OFFLINE\) and it is not in the cache/);
        assert.ok(e.message.includes(`cache folder ${empty}`), e.message);
        assert.ok(e.message.includes(join(empty, "models--org--absent", "refs", "main")), e.message);
        assert.ok(e.message.endsWith(`. Nor is there a local folder ${resolve("org/absent")}`), e.message);
        return true;
      },
    );
    await assert.rejects(
      () => resolveModel("org/absent@v2", { cacheDir: empty, offline: true }),
      /org\/absent@v2: offline/,
    );
    await assert.rejects(
      () => withEnv({ HF_HUB_CACHE: empty, HF_HUB_OFFLINE: "1" }, () => resolveModel("org/absent")),
      new RegExp(`cache folder ${empty}`),
    );
    await assert.rejects(
      () => resolveModel("org/name@v1", { revision: "v2", cacheDir: empty, offline: true }),
      /names revision v1 but opts.revision is v2/,
    );
  } finally {
    await Deno.remove(empty, { recursive: true });
  }
  const { cache } = await fakeCache("qwen3-moe-fused", {
    drop: ["model-00002-of-00002.safetensors", "tokenizer.json"],
  });
  try {
    await assert.rejects(
      () => resolveModel("org/name", { cacheDir: cache, offline: true }),
      /the cached snapshot .* lacks tokenizer\.json, model-00002-of-00002\.safetensors/,
    );
  } finally {
    await Deno.remove(cache, { recursive: true });
  }
  const broken = await fakeCache("phimoe-tiny");
  try {
    await Deno.writeTextFile(join(repoCacheDir(broken.cache, "org/name"), "refs", "main"), "not-a-commit");
    await assert.rejects(
      () => resolveModel("org/name", { cacheDir: broken.cache, offline: true }),
      /expected a 40-hex commit hash/,
    );
  } finally {
    await Deno.remove(broken.cache, { recursive: true });
  }
});

Deno.test("hub: the download path reports a failed request with the repo and a way out", async () => {
  // Only the first request is exercised: it goes to a closed loopback port, never off this machine.
  const empty = await Deno.makeTempDir({ prefix: "moerl_hub_net_" });
  try {
    await assert.rejects(
      () => resolveModel("org/absent", { cacheDir: empty, offline: false, hubUrl: NO_HUB }),
      (e: Error) => {
        assert.match(e.message, /^org\/absent@main: resolving the revision failed: /);
        assert.match(e.message, /set HF_TOKEN; no network\? set HF_HUB_OFFLINE=1/);
        // "org/absent" may as well be a relative path mistyped, or run from another folder.
        assert.ok(e.message.endsWith(`. Nor is there a local folder ${resolve("org/absent")}`), e.message);
        assert.ok(e.cause, "the underlying error is kept as cause");
        return true;
      },
    );
    assert.deepEqual(await Array.fromAsync(Deno.readDir(empty)), [], "a failed resolve wrote into the cache");
  } finally {
    await Deno.remove(empty, { recursive: true });
  }
});
