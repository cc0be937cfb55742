"""transformers half of `deno task bench:generate` (bench/generate.ts spawns this).

argv[1] is a JSON config from the TS side: the model sizes (HF config keys),
the seed, the prompts, new tokens, runs and the folder to save into. We build
a random Qwen3MoeForCausalLM, save it there with save_pretrained (the TS side
then loads the very same weights with loadModel), and time greedy
`model.generate` on the left-padded batch: 1 warm-up run, then `runs` timed
runs, median. That is done for transformers' default experts implementation
(grouped_mm on CPU with torch >= 2.9) and for "eager" (the per-expert loop,
like our "loop" dispatch). Prints one JSON object on stdout.
"""
import json
import statistics
import sys
import time

try:
    import torch
    import transformers
    from random_model import random_qwen3_moe
except ImportError as e:  # the TS side turns this into an install hint
    print(json.dumps({"error": f"cannot import torch/transformers: {e}"}))
    sys.exit(2)

cfg = json.loads(sys.argv[1])
PAD = cfg["padTokenId"]

# No EOS anywhere (config and generation config), so every row makes exactly newTokens tokens.
model = random_qwen3_moe(cfg["model"], cfg["seed"], cfg["initStd"], [PAD],
                         pad_token_id=PAD, bos_token_id=None, eos_token_id=None)
with torch.no_grad():
    model.model.embed_tokens.weight[PAD].zero_()  # pad logit exactly 0: greedy never picks it
model.eval()
model.generation_config.eos_token_id = None
model.save_pretrained(cfg["dir"])

# Left-pad by hand, as the TS side does (HF's tokenizer would do the same).
width = max(len(p) for p in cfg["prompts"])
input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in cfg["prompts"]])
attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in cfg["prompts"]])


def generate():
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=cfg["newTokens"],
        min_new_tokens=cfg["newTokens"],
        eos_token_id=None,
        pad_token_id=PAD,
    )


def timed(experts: str | None) -> dict:
    if experts is not None:
        model.set_experts_implementation(experts)
    times, out = [], None
    with torch.inference_mode():
        for i in range(1 + cfg["runs"]):  # the first run is the warm-up
            t0 = time.perf_counter()
            out = generate()
            if i > 0:
                times.append(time.perf_counter() - t0)
    new = out[:, width:]
    seconds = statistics.median(times)
    return {
        "experts": model.config._experts_implementation,
        "seconds": seconds,
        "new_tokens": new.numel(),
        "tokens_per_s": new.numel() / seconds,
        "spread": (max(times) - min(times)) / seconds,
        "ids": new.tolist(),
    }


runs = [timed(None), timed("eager")]  # None: whatever transformers picked by default
print(json.dumps({
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "python": sys.version.split()[0],
    "threads": torch.get_num_threads(),
    "attn": model.config._attn_implementation,
    "runs": runs,
}))
