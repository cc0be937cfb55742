"""A random Qwen3MoeForCausalLM for the benchmarks (bench/generate.py, bench/rl.py).

HF's init (std 0.02) gives near-flat logits and routing, where argmax ties flip on
rounding; weights ~ N(0, init_std) make both decisive, so that comparisons of tokens
mean something and a row rarely stops by chance. The rows of `zero_logits` (pad,
EOS) get exactly zero LM-head weights: their logit is 0 against large others.
"""
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM


def random_qwen3_moe(model_keys: dict, seed: int, init_std: float, zero_logits: list[int], **config_keys):
    config = Qwen3MoeConfig(**model_keys, **config_keys)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, init_std)
        for token in zero_logits:
            model.lm_head.weight[token].zero_()
    return model
