"""TRL half of `deno task bench:rl` (bench/rl.ts spawns this).

argv[1] is a JSON config from the TS side. With "build", we make a random
Qwen3MoeForCausalLM (the config's HF keys, weights ~ N(0, initStd)) and a
word-level tokenizer ("t0" ... "t<V-1>", so that a prompt's text "t5 t17"
is exactly the ids [5, 17]) and save both into cfg["dir"]; the TS side loads
the very same folder. With "run", we time TRL's GRPOTrainer on it: PEFT LoRA
on the configured modules, transformers `generate` (no vLLM), the same
prompts, K, token cap, temperature and KL coefficient, and a reward that
both sides compute alike (the parity of the sum of a completion's token ids).
One warm-up update, then `updates` timed ones; prints one JSON object.
"""
import contextlib
import json
import sys
import tempfile
import time

try:
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeForCausalLM, TrainerCallback
    from random_model import random_qwen3_moe
except ImportError as e:  # the TS side turns this into an install hint
    print(json.dumps({"error": f"cannot import torch/transformers: {e}"}))
    sys.exit(2)

cfg = json.loads(sys.argv[1])
PAD, EOS = cfg["padTokenId"], cfg["eosTokenId"]


def build():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {f"t{i}": i for i in range(cfg["model"]["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=f"t{PAD}", eos_token=f"t{EOS}")
    fast.save_pretrained(cfg["dir"])
    # A row rarely stops: the EOS logit is exactly 0 against large others.
    model = random_qwen3_moe(cfg["model"], cfg["seed"], cfg["initStd"], [EOS],
                             pad_token_id=PAD, bos_token_id=None, eos_token_id=EOS)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.to(getattr(torch, cfg["dtype"])).save_pretrained(cfg["dir"])
    return {"built": cfg["dir"]}


def parity_reward(prompts, completions, completion_ids, **kwargs):
    return [float(sum(ids) % 2) for ids in completion_ids]


class Timer(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], 0.0

    def sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.times.append(time.perf_counter() - self.t0)


def run():
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    on_gpu = cfg["device"].startswith("cuda")
    tok = PreTrainedTokenizerFast.from_pretrained(cfg["dir"])
    model = Qwen3MoeForCausalLM.from_pretrained(cfg["dir"], dtype=getattr(torch, cfg["dtype"]))
    prompts = [" ".join(f"t{i}" for i in p) for p in cfg["prompts"]]
    per_micro = len(prompts) * cfg["k"] // cfg["microBatches"]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="moerl_bench_trl_"),
        per_device_train_batch_size=per_micro,
        gradient_accumulation_steps=cfg["microBatches"],
        num_generations=cfg["k"],
        max_completion_length=cfg["newTokens"],
        max_steps=1 + cfg["updates"],
        learning_rate=cfg["learningRate"],
        beta=cfg["klCoef"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        gradient_checkpointing=False,
        bf16=cfg["dtype"] == "bfloat16",
        use_cpu=not on_gpu,
        shuffle_dataset=False,
        save_strategy="no",
        logging_steps=1_000_000,
        report_to=[],
        seed=cfg["seed"],
        disable_tqdm=True,
    )
    # moerl trains without the router load-balancing loss (ppo.routerAuxCoef 0): so does TRL here.
    model.config.output_router_logits = False
    model.config.router_aux_loss_coef = 0.0
    extra = {"target_parameters": cfg["lora"]["targetParameters"]} if cfg["lora"]["targetParameters"] else {}
    peft = LoraConfig(r=cfg["lora"]["r"], lora_alpha=cfg["lora"]["alpha"], lora_dropout=0.0,
                      target_modules=cfg["lora"]["targetModules"], task_type="CAUSAL_LM", **extra)
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=parity_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          peft_config=peft, callbacks=[timer])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its summary; stdout is for our JSON
        trainer.train()
    timed = timer.times[1:]
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": __import__("trl").__version__,
        "threads": torch.get_num_threads(),
        "experts": getattr(trainer.model.config, "_experts_implementation", None),
        "seconds": timed,
        "peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
    }


try:
    print(json.dumps(build() if cfg["mode"] == "build" else run()))
except Exception as e:  # noqa: BLE001 — reported to the TS side as a message
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(1)
