#!/usr/bin/env python3
"""Generate the PEFT LoRA reference fixtures under tests/fixtures/peft/.

For each tiny checkpoint in tests/fixtures/models/ (made by scripts/make_fixtures.py) this
creates a LoRA adapter with PEFT, overwrites its weights with seeded random values (PEFT's
default lora_B = 0 would make every check vacuous), saves it with PEFT's own save_pretrained,
and records logits on the left-padded parity batch of tests/fixtures/parity/<model>.safetensors.
Everything is local and deterministic (fixed seeds, one CPU thread, PYTHONHASHSEED=0 so the sets
in PEFT's config serialise in a fixed order): running the script twice gives byte-identical files.

Outputs (paths relative to tests/fixtures/peft/):

  <model>/adapter_config.json, adapter_model.safetensors, README.md
                          exactly what PeftModel.save_pretrained writes (README.md is PEFT's
                          model-card stub).
  <model>.safetensors     input_ids, attention_mask, position_ids (the parity batch),
                          logits (adapter active), logits_base (adapter disabled),
                          logits_merged (merge_and_unload on a copy), all float32.
  <model>.json            versions, config, saved keys and shapes, checks, and the expert-LoRA
                          format and math ("expert_lora") a port must reproduce.
  qwen3-moe-fused-v4-per-expert/, .safetensors, .json
                          a transformers-4.x style adapter (per-expert keys
                          mlp.experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight, written by this
                          script as PEFT + transformers 4.x would have saved it) and the logits
                          PEFT gives after converting it to the fused layout on load.

Models: qwen3-moe-tiny (per-expert checkpoint, dense MLP in layer 1), qwen3-moe-fused (fused
checkpoint, tied embeddings), phimoe-tiny (block_sparse_moe.experts.{e}.w1/w2/w3 checkpoint).
transformers 5 loads all three with FUSED experts in memory (mlp.experts.gate_up_proj [E, 2I, H],
mlp.experts.down_proj [E, H, I], nn.Parameters, not nn.Linear), so the experts are adapted through
LoraConfig.target_parameters (PEFT's lora.ParamWrapper).

Usage (see scripts/requirements-fixtures.txt for the pinned environment):
  /work/venv-fx/bin/python scripts/make_peft_fixtures.py
  /work/venv-fx/bin/python scripts/make_peft_fixtures.py --check MODEL_DIR ADAPTER_DIR BATCH OUT

--check loads MODEL_DIR (float32, eager attention/experts, eval), applies ADAPTER_DIR with
PeftModel.from_pretrained, runs input_ids/attention_mask/position_ids from BATCH (a safetensors
file; position_ids default to cumsum(mask)-1 with pads at 1) and writes `logits` (float32) to OUT.
It prints a JSON report to stdout and exits with status 2 if PEFT did not load every tensor of
adapter_model.safetensors unchanged (PEFT silently ignores keys it has no module for).
"""

from __future__ import annotations

import os
import sys

# PEFT writes the set-valued config fields (target_modules, target_parameters) as list(set), whose
# order depends on string hashing: fix the hash seed so adapter_config.json is reproducible.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

import argparse
import copy
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import fmt, max_abs_diff, positions, sha256, versions, write_json, write_safetensors  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "peft"

MODELS = ["qwen3-moe-tiny", "qwen3-moe-fused", "phimoe-tiny"]
SEEDS = {"qwen3-moe-tiny": 3001, "qwen3-moe-fused": 3002, "phimoe-tiny": 3003}
SEED_LEGACY = 3102

R = 4
ALPHA = 8
STD_A = 0.1  # re-initialisation of every lora_A weight: STD_A * N(0, 1)
STD_B = 0.1  # ... and every lora_B weight (PEFT's default is B = 0)

ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# v5 fused expert parameters (the same names for Qwen3-MoE and PhiMoE once loaded).
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# qwen3-moe-tiny's dense MLP (layer 1, Qwen3MoeMLP with nn.Linear gate/up/down_proj). Listing
# gate_proj/up_proj/down_proj in target_modules does NOT work on qwen3_moe under transformers v5: PEFT
# rewrites them to the expert parameters (see probe_natural_configs), so the dense projections are
# reached through target_parameters on their 2-D weights instead; the saved keys and the math are
# exactly those of an nn.Linear LoRA (see checks.dense_param_wrapper_is_linear_lora).
DENSE_TARGETS = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]

PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def rel(path: Path) -> str:
    return str(Path(path).resolve().relative_to(ROOT))


def load_base(model_dir) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    model.eval()
    assert model.config._attn_implementation == "eager"
    return model


def read_batch(path) -> dict[str, torch.Tensor]:
    t = load_file(str(path))
    batch = {"input_ids": t["input_ids"].long(), "attention_mask": t["attention_mask"].long()}
    batch["position_ids"] = t["position_ids"].long() if "position_ids" in t else positions(batch["attention_mask"])
    return batch


def forward(model, batch, **kw):
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
            **kw,
        )


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), "pt") as h:
        return {k: list(h.get_slice(k).get_shape()) for k in sorted(h.keys())}


def is_legacy_per_expert(keys) -> bool:
    return any(re.search(r"\.experts\.\d+\.", k) for k in keys)


def lora_report(pm, adapter_file: Path) -> dict:
    """Did PEFT load every tensor of adapter_file unchanged? (It silently ignores unknown keys.)"""
    on_disk = load_file(str(adapter_file))
    loaded = get_peft_model_state_dict(pm)  # PEFT's serialised names (base_model.model...., no adapter name)
    rep = {"adapter_keys": len(on_disk), "model_lora_keys": len(loaded)}
    if is_legacy_per_expert(on_disk):
        rep["note"] = "legacy per-expert keys: PEFT converts them on load, so keys are not compared one to one"
        rep["ok"] = len(loaded) > 0
        return rep
    not_loaded = sorted(set(on_disk) - set(loaded))
    not_in_file = sorted(set(loaded) - set(on_disk))
    changed = sorted(k for k in set(on_disk) & set(loaded) if not torch.equal(on_disk[k].float(), loaded[k].float()))
    rep.update({"keys_not_loaded": not_loaded, "model_keys_not_in_file": not_in_file, "tensors_changed": changed})
    rep["ok"] = not not_loaded and not not_in_file and not changed
    return rep


# --------------------------------------------------------------------------------------
# --check: load someone else's adapter with PEFT
# --------------------------------------------------------------------------------------


def check_adapter(model_dir, adapter_dir, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Logits of MODEL_DIR + ADAPTER_DIR (PeftModel.from_pretrained) on `batch`, plus a load report."""
    base = load_base(model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(adapter_dir))
    pm.eval()
    logits = forward(pm, batch).logits.float()
    report = lora_report(pm, Path(adapter_dir) / "adapter_model.safetensors")
    report["peft_warnings"] = sorted({str(w.message).splitlines()[0][:300] for w in caught if "peft" in str(w.filename)})
    return logits, report


def run_check(model_dir: str, adapter_dir: str, batch_path: str, out_path: str) -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    logits, report = check_adapter(model_dir, adapter_dir, read_batch(batch_path))
    write_safetensors(Path(out_path), {"logits": logits})
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["ok"] else 2


# --------------------------------------------------------------------------------------
# routing robustness (a port's fp32 rounding must not flip an expert choice)
# --------------------------------------------------------------------------------------


def routing_margin(router_logits, mask: torch.Tensor, cfg, kind: str) -> float:
    real = mask.reshape(-1).bool()
    rl = torch.stack(list(router_logits))[:, real].double()  # [L, T, E]
    if kind == "qwen3":
        k = cfg.num_experts_per_tok
        p = torch.softmax(rl, -1).sort(-1, descending=True).values
        return (p[..., k - 1] - p[..., k]).min().item() if k < p.shape[-1] else float("inf")
    # sparsemixer (eval): arg-max gaps and the distance of every relative gap to the 2*eps band
    top3 = rl.topk(3, -1).values
    m1, i1 = rl.max(-1, keepdim=True)
    r1 = (m1 - rl) / rl.abs().clamp(min=m1)
    m2 = rl.scatter(-1, i1, float("-inf")).max(-1, keepdim=True).values
    r2 = (m2 - rl) / rl.abs().clamp(min=m2)
    eps2 = 2 * cfg.router_jitter_noise
    band = min((r1 - eps2).abs().min().item(), (r2 - eps2).abs().min().item())
    return min((top3[..., 0] - top3[..., 1]).min().item(), (top3[..., 1] - top3[..., 2]).min().item(), band)


# --------------------------------------------------------------------------------------
# independent application of a saved adapter (the math a port must reproduce)
# --------------------------------------------------------------------------------------


def expert_param_for_key(module_path: str, targeted_in_order: list[str]) -> tuple[str, str]:
    """`...mlp.experts(.base_layer)*` -> (experts module path, parameter name).

    PEFT wraps one parameter per ParamWrapper and nests them: the targeted parameter registered
    first on the module (gate_up_proj) is wrapped first, i.e. innermost. With n targeted
    parameters, the key with k ".base_layer" suffixes belongs to targeted_in_order[n - 1 - k].
    """
    k = 0
    while module_path.endswith(".base_layer"):
        module_path = module_path[: -len(".base_layer")]
        k += 1
    return module_path, targeted_in_order[len(targeted_in_order) - 1 - k]


def apply_adapter_by_formula(model, adapter_dir: Path) -> dict:
    """Merge adapter_dir into `model` in place WITHOUT PEFT, following the documented formulas."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not cfg["use_rslora"] and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    stats = {"linear": 0, "experts": 0}
    with torch.no_grad():
        for key_a in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
            path = key_a[len(PREFIX) : -len(".lora_A.weight")]
            A = tensors[key_a].double()
            B = tensors[key_a.replace(".lora_A.", ".lora_B.")].double()
            if path.endswith(".experts") or path.endswith(".experts.base_layer"):
                mod_path, pname = expert_param_for_key(
                    path, [p for p in ("gate_up_proj", "down_proj") if f"mlp.experts.{p}" in cfg["target_parameters"]]
                )
                W = getattr(model.get_submodule(mod_path), pname)  # [E, out, in]
                E = W.shape[0]
                r = A.shape[0] // E
                scaling = cfg["lora_alpha"] / r
                assert A.shape == (r * E, W.shape[2]) and B.shape == (W.shape[1], r * E), (key_a, A.shape, B.shape)
                for e in range(E):
                    A_e = A[e * r : (e + 1) * r]  # rows e*r .. e*r+r-1   (expert-major)
                    B_e = B[:, e::E]  # columns e, e+E, ..., e+(r-1)E   (rank-major, expert-minor)
                    W[e] += (scaling * (B_e @ A_e)).to(W.dtype)
                stats["experts"] += 1
            else:
                lin = model.get_submodule(path)
                r = A.shape[0]
                scaling = cfg["lora_alpha"] / r
                lin.weight += (scaling * (B @ A)).to(lin.weight.dtype)
                stats["linear"] += 1
    return stats


def apply_legacy_by_formula(model, tensors: dict[str, torch.Tensor], alpha: float) -> None:
    """Per-expert (transformers 4.x) LoRA applied to v5 fused weights: gate -> rows [0, I), up -> [I, 2I)."""
    with torch.no_grad():
        for key_a in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
            m = re.fullmatch(r"base_model\.model\.(.*\.mlp\.experts)\.(\d+)\.(\w+)\.lora_A\.weight", key_a)
            A = tensors[key_a].double()
            B = tensors[key_a.replace(".lora_A.", ".lora_B.")].double()
            delta = (alpha / A.shape[0]) * (B @ A)
            if m is None:
                lin = model.get_submodule(key_a[len(PREFIX) : -len(".lora_A.weight")])
                lin.weight += delta.float()
                continue
            experts, e, proj = model.get_submodule(m.group(1)), int(m.group(2)), m.group(3)
            inter = experts.gate_up_proj.shape[1] // 2
            if proj == "gate_proj":
                experts.gate_up_proj[e, :inter] += delta.float()
            elif proj == "up_proj":
                experts.gate_up_proj[e, inter:] += delta.float()
            else:
                experts.down_proj[e] += delta.float()


# --------------------------------------------------------------------------------------
# fixture generation
# --------------------------------------------------------------------------------------


def lora_config(name: str) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,  # required: ParamWrapper raises ValueError for lora_dropout != 0
        use_rslora=False,
        bias="none",
        target_modules=list(ATTENTION_TARGETS),
        target_parameters=EXPERT_TARGETS + (DENSE_TARGETS if name == "qwen3-moe-tiny" else []),
    )


def reinit_lora_(pm, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if ".lora_A." in pname or ".lora_B." in pname:
                std = STD_A if ".lora_A." in pname else STD_B
                p.copy_(std * torch.randn(p.shape, generator=gen, dtype=torch.float32))
                n += 1
    return n


def verify_fused_in_memory(model, name: str, kind: str) -> str:
    """transformers v5 fuses the experts on load, whatever the checkpoint layout."""
    cfg = model.config
    E = cfg.num_experts if kind == "qwen3" else cfg.num_local_experts
    inter = cfg.moe_intermediate_size if kind == "qwen3" else cfg.intermediate_size
    names = dict(model.named_parameters())
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    for i in moe_layers:
        assert names[f"model.layers.{i}.mlp.experts.gate_up_proj"].shape == (E, 2 * inter, cfg.hidden_size)
        assert names[f"model.layers.{i}.mlp.experts.down_proj"].shape == (E, cfg.hidden_size, inter)
        experts = model.model.layers[i].mlp.experts
        assert not any(isinstance(m, torch.nn.Linear) for m in experts.modules()), f"{name}: per-expert nn.Linear"
        assert experts.is_transposed is False
    assert not any(re.search(r"experts\.\d+\.", n) for n in names), f"{name}: per-expert parameters in memory"
    on_disk = sorted({re.sub(r"\.\d+\.", ".N.", k) for k in safetensors_keys_all(FIXTURES / "models" / name) if ".experts." in k})
    return (
        f"checkpoint expert keys {on_disk} -> in memory {type(experts).__name__} "
        f"gate_up_proj [E={E}, 2I={2 * inter}, H={cfg.hidden_size}], down_proj [E, H, I] (nn.Parameter, "
        f"is_transposed=False), MoE layers {moe_layers}"
    )


def safetensors_keys_all(model_dir: Path) -> list[str]:
    keys = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys += list(h.keys())
    return keys


def make_model_fixture(name: str, probes: dict) -> dict:
    kind = "phimoe" if name.startswith("phimoe") else "qwen3"
    model_dir = FIXTURES / "models" / name
    checks: dict[str, str] = {}
    parity = load_file(str(FIXTURES / "parity" / f"{name}.safetensors"))
    batch = {k: parity[k] for k in ("input_ids", "attention_mask", "position_ids")}
    real = batch["attention_mask"].bool()

    base = load_base(rel(model_dir))  # relative path: it ends up in adapter_config.json
    checks["experts_in_memory"] = verify_fused_in_memory(base, name, kind)
    base_logits = forward(base, batch).logits.float()
    assert torch.equal(base_logits, parity["logits"]), f"{name}: base logits differ from parity fixture"
    checks["base_logits_vs_parity_fixture"] = "bit-identical"

    cfg = lora_config(name)
    pm = get_peft_model(base, cfg)
    pm.eval()
    n_lora = reinit_lora_(pm, SEEDS[name])
    wrappers = {type(m).__name__ for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    checks["lora_layer_types"] = str(sorted(wrappers))
    for mname, m in pm.named_modules():
        if type(m).__name__ == "ParamWrapper" and m.num_experts > 1:
            assert m.scaling["default"] == ALPHA / R and m.r["default"] == R and m._did_swap_in_out_features, mname
    pconf = pm.peft_config["default"]
    assert set(pconf.target_parameters) == set(cfg.target_parameters) and set(pconf.target_modules) == set(ATTENTION_TARGETS), pconf
    assert not pconf.rank_pattern and not pconf.alpha_pattern, "PEFT rewrote the config"

    out = forward(pm, batch, output_router_logits=True)
    logits = out.logits.float()
    margin = routing_margin(out.router_logits, batch["attention_mask"], base.config, kind)
    checks["routing_margin_with_adapter_real_tokens"] = fmt(margin)
    assert margin > 1e-4, f"{name}: routing with the adapter too close to a tie ({margin}); change the seed"
    with pm.disable_adapter():
        logits_base = forward(pm, batch).logits.float()
    assert torch.equal(logits_base, parity["logits"]), f"{name}: disable_adapter() logits != base logits"
    checks["logits_base_vs_parity_logits"] = "bit-identical"
    diff_adapter = max_abs_diff(logits[real], logits_base[real])
    checks["max_abs_logits_minus_logits_base_real_positions"] = fmt(diff_adapter)
    assert diff_adapter > 1.0, f"{name}: the adapter barely changes the logits"

    adir = OUT / name
    shutil.rmtree(adir, ignore_errors=True)
    pm.save_pretrained(str(adir))
    files = sorted(p.name for p in adir.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"], files
    saved = safetensors_shapes(adir / "adapter_model.safetensors")
    assert len(saved) == n_lora

    # merge_and_unload on a copy
    merged = copy.deepcopy(pm).merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    logits_merged = forward(merged, batch).logits.float()
    checks["max_abs_logits_merged_minus_logits_real_positions"] = fmt(max_abs_diff(logits_merged[real], logits[real]))
    assert torch.allclose(logits_merged[real], logits[real], atol=1e-4, rtol=0)
    del merged

    # The documented math, applied to the saved tensors without PEFT.
    ref = load_base(model_dir)
    stats = apply_adapter_by_formula(ref, adir)
    logits_formula = forward(ref, batch).logits.float()
    d = max_abs_diff(logits_formula[real], logits[real])
    checks["independent_formula_merge_vs_peft_logits_real_positions"] = f"{fmt(d)} ({stats['linear']} linear, {stats['experts']} expert-stack LoRAs)"
    assert d < 1e-4, f"{name}: documented formula does not reproduce PEFT ({d})"
    del ref

    # Round trip through PeftModel.from_pretrained (the --check path).
    logits_loaded, report = check_adapter(model_dir, adir, batch)
    assert report["ok"], report
    assert torch.equal(logits_loaded, logits), f"{name}: reloaded adapter gives different logits"
    checks["check_adapter_roundtrip"] = "PeftModel.from_pretrained loads every saved tensor; logits bit-identical"

    if name == "qwen3-moe-tiny":
        checks["dense_param_wrapper_is_linear_lora"] = dense_wrapper_equals_linear(pm, batch)

    tensors = {**batch, "logits": logits, "logits_base": logits_base, "logits_merged": logits_merged}
    for k, v in tensors.items():
        assert not v.is_floating_point() or bool(torch.isfinite(v).all()), k
    write_safetensors(OUT / f"{name}.safetensors", tensors)

    adapter_config = json.loads((adir / "adapter_config.json").read_text())
    meta = {
        "model": name,
        "model_dir": f"models/{name}",
        "adapter_dir": f"peft/{name}",
        "versions": {**versions(), "peft": peft.__version__},
        "dtype": "float32",
        "attn_implementation": "eager",
        "experts_implementation": "eager",
        "mode": "eval",
        "batch": f"input_ids/attention_mask/position_ids copied from parity/{name}.safetensors (left padding, pad id 0, "
        "positions cumsum(mask)-1 with pads at 1)",
        "lora_config_call": {
            "task_type": "CAUSAL_LM",
            "r": R,
            "lora_alpha": ALPHA,
            "lora_dropout": 0.0,
            "use_rslora": False,
            "bias": "none",
            "target_modules": ATTENTION_TARGETS,
            "target_parameters": cfg.target_parameters if isinstance(cfg.target_parameters, list) else sorted(cfg.target_parameters),
        },
        "reinit": f"after get_peft_model, every lora_A / lora_B weight in named_parameters() order <- "
        f"{STD_A} / {STD_B} * randn(shape, generator=manual_seed({SEEDS[name]}))",
        "scaling": f"lora_alpha / r = {ALPHA}/{R} = {ALPHA / R} for every LoRA (use_rslora false, no rank/alpha patterns)",
        "adapter_config_json": adapter_config,
        "saved_keys": saved,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in sorted(tensors.items())},
        "tensor_notes": {
            "logits": "PeftModel forward with the adapter active",
            "logits_base": "the same inside `with model.disable_adapter():` (== parity logits, bit-identical)",
            "logits_merged": "copy.deepcopy(peft_model).merge_and_unload() forward",
            "pad positions": "implementation-defined (fully masked query rows); compare real positions only",
        },
        "checks": checks,
        "expert_lora": EXPERT_LORA_DOC,
        "probe_natural_v4_style_configs": probes,
    }
    write_json(OUT / f"{name}.json", meta)
    return meta


def dense_wrapper_equals_linear(pm, batch) -> str:
    """The dense MLP's 2-D ParamWrapper must equal a plain lora.Linear with the same A/B."""
    mlp = pm.base_model.model.model.layers[1].mlp
    x = torch.randn(5, mlp.gate_proj.base_layer.in_features, generator=torch.Generator().manual_seed(7))
    worst = 0.0
    for proj in ("gate_proj", "up_proj"):
        w = getattr(mlp, proj)
        assert type(w).__name__ == "ParamWrapper" and w.num_experts == 1
        A, B = w.lora_A["default"].weight, w.lora_B["default"].weight
        with torch.no_grad():
            want = x @ w.base_layer.weight.T + w.scaling["default"] * (x @ A.T) @ B.T
            worst = max(worst, max_abs_diff(w(x), want))
    assert worst < 1e-5
    return f"ParamWrapper(num_experts=1) on nn.Linear.weight: y = x W^T + (alpha/r) (x A^T) B^T, maxdiff {fmt(worst)}; keys as lora.Linear"


EXPERT_LORA_DOC = {
    "config": "LoraConfig(target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']) -> one "
    "peft.tuners.lora.layer.ParamWrapper per 3-D nn.Parameter; lora_dropout must be 0 (ValueError otherwise), "
    "fan_in_fan_out/lora_bias/DoRA unsupported",
    "keys": "the two wrappers are nested on the experts module; the parameter registered first (gate_up_proj) is "
    "wrapped first = innermost: base_model.model.model.layers.{l}.mlp.experts.base_layer.lora_{A,B}.weight is "
    "gate_up_proj, base_model.model.model.layers.{l}.mlp.experts.lora_{A,B}.weight is down_proj. With only one "
    "expert parameter targeted its key is ...mlp.experts.lora_{A,B}.weight (no base_layer) whichever it is.",
    "shapes": "W = [E, out, in] (gate_up_proj [E, 2I, H]: out=2I, in=H; down_proj [E, H, I]: out=H, in=I; "
    "is_transposed=False so PEFT swaps its (in, out) reading of dims 1, 2). lora_A.weight [r*E, in], "
    "lora_B.weight [out, r*E]",
    "layout": "A rows are expert-major: A_e = A[e*r:(e+1)*r, :] (A.reshape(E, r, in)[e]). B columns are rank-major, "
    "expert-minor: B_e = B[:, e::E], i.e. columns e, e+E, ..., e+(r-1)E (B.reshape(out, r, E)[:, :, e]). The "
    "two layouts differ: B is NOT B.reshape(out, E, r)",
    "math": "W'[e] = W[e] + (lora_alpha / r) * B_e @ A_e for every expert e (r = rank of that wrapper = A.rows / E; "
    "use_rslora: lora_alpha / sqrt(r)); the expert forward then uses W' unchanged: gate, up = chunk(x @ W'gu[e]^T, 2) "
    "(rows [0, I) gate, [I, 2I) up), h = silu(gate) * up, y = h @ W'down[e]^T. Equivalently per token routed to e: "
    "x @ W[e]^T + s * (x @ A_e^T) @ B_e^T. gate and up share one rank-r A_e/B_e pair (a rank-r update of the "
    "fused [2I, H] matrix), unlike a per-expert LoRA with separate rank-r gate_proj and up_proj LoRAs",
    "peft_source": {
        "update_layer": "self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False); "
        "self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=lora_bias)",
        "get_delta_weight": "weight_A = weight_A.reshape(self.num_experts, -1, weight_A.shape[-1])  # experts x rank x in; "
        "weight_B = weight_B.reshape(weight_B.shape[0], -1, self.num_experts)  # out x rank x experts; "
        "delta_weight = torch.einsum('o r e, e r i -> e o i', weight_B, weight_A) * self.scaling[adapter_name]",
        "forward": "registers a torch parametrization W -> baddbmm(W, B.reshape(out,r,E).permute(2,0,1), "
        "A.reshape(E,r,in), alpha=scaling) (_LoraFactorsProxy) for the duration of the base forward",
    },
    "legacy_per_expert_conversion": "PEFT converts a transformers-4.x per-expert adapter (target_modules gate_proj/"
    "up_proj/down_proj) on load: A_fused rows e*2r+j = [A_gate_e; A_up_e][j], B_fused[:, j*E+e] = "
    "block_diag(B_gate_e, B_up_e)[:, j] with rank 2r and lora_alpha 2*alpha for gate_up_proj (rank_pattern/"
    "alpha_pattern '.*\\\\.gate_up_proj'), i.e. the same alpha/r scaling per branch; down_proj keeps r",
}


# --------------------------------------------------------------------------------------
# probes: what PEFT does with the "natural" v4-style configs on v5 models
# --------------------------------------------------------------------------------------


def probe_natural_configs() -> dict:
    out = {}
    for name, tm in [
        ("qwen3-moe-tiny", ATTENTION_TARGETS + ["gate_proj", "up_proj", "down_proj"]),
        ("phimoe-tiny", ATTENTION_TARGETS + ["w1", "w2", "w3"]),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(load_base(FIXTURES / "models" / name), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=tm))
        c = pm.peft_config["default"]
        keys = sorted({re.sub(r"layers\.\d+\.", "layers.{l}.", k) for k in get_peft_model_state_dict(pm)})
        out[name] = {
            "requested_target_modules": tm,
            "effective_target_modules": sorted(c.target_modules),
            "effective_target_parameters": sorted(c.target_parameters or []),
            "rank_pattern": c.rank_pattern,
            "alpha_pattern": c.alpha_pattern,
            "saved_key_patterns": keys,
        }
    tiny = out["qwen3-moe-tiny"]
    assert tiny["effective_target_parameters"] == ["down_proj", "gate_up_proj"], tiny
    assert not any("layers.{l}.mlp.gate_proj" in k for k in tiny["saved_key_patterns"]), "dense MLP now targeted?"
    tiny["finding"] = (
        "PEFT (convert_peft_config_for_transformers, qwen3_moe -> qwen2_moe conversion) rewrites gate_proj/up_proj/"
        "down_proj into target_parameters gate_up_proj/down_proj with rank_pattern/alpha_pattern 2r/2*alpha for "
        "gate_up_proj, removes them from target_modules, and so leaves the dense MLP (layer 1) WITHOUT LoRA"
    )
    phi = out["phimoe-tiny"]
    assert not any("experts" in k for k in phi["saved_key_patterns"]), phi
    phi["finding"] = "w1/w2/w3 match nothing in the v5 PhiMoE (fused experts); no error because q/k/v/o matched: experts get no LoRA"
    return out


def make_legacy_fixture() -> dict:
    """A transformers-4.x per-expert adapter for qwen3-moe-fused, loaded by PEFT into the v5 fused model."""
    name = "qwen3-moe-fused"
    model_dir = FIXTURES / "models" / name
    base = load_base(rel(model_dir))
    cfg = base.config
    E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gen = torch.Generator().manual_seed(SEED_LEGACY)
    tensors = {}
    # the 4.x module order: attention, then per expert gate/up/down
    for li, layer in enumerate(base.model.layers):
        for proj in ATTENTION_TARGETS:
            lin = getattr(layer.self_attn, proj)
            tensors[f"{PREFIX}model.layers.{li}.self_attn.{proj}.lora_A.weight"] = STD_A * torch.randn(R, lin.in_features, generator=gen)
            tensors[f"{PREFIX}model.layers.{li}.self_attn.{proj}.lora_B.weight"] = STD_B * torch.randn(lin.out_features, R, generator=gen)
        for e in range(E):
            for proj, (o, i) in [("gate_proj", (inter, H)), ("up_proj", (inter, H)), ("down_proj", (H, inter))]:
                tensors[f"{PREFIX}model.layers.{li}.mlp.experts.{e}.{proj}.lora_A.weight"] = STD_A * torch.randn(R, i, generator=gen)
                tensors[f"{PREFIX}model.layers.{li}.mlp.experts.{e}.{proj}.lora_B.weight"] = STD_B * torch.randn(o, R, generator=gen)
    adir = OUT / f"{name}-v4-per-expert"
    shutil.rmtree(adir, ignore_errors=True)
    adir.mkdir(parents=True)
    save_file(dict(sorted(tensors.items())), str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
    # adapter_config.json as PEFT writes it (LoraConfig.save_pretrained), for the 4.x-style targets
    LoraConfig(
        task_type="CAUSAL_LM",
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=ATTENTION_TARGETS + ["gate_proj", "up_proj", "down_proj"],
        base_model_name_or_path=rel(model_dir),
    ).save_pretrained(str(adir))

    parity = load_file(str(FIXTURES / "parity" / f"{name}.safetensors"))
    batch = {k: parity[k] for k in ("input_ids", "attention_mask", "position_ids")}
    real = batch["attention_mask"].bool()
    checks = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(adir))
    pm.eval()
    c = pm.peft_config["default"]
    checks["config_after_load"] = (
        f"target_modules {sorted(c.target_modules)}, target_parameters {sorted(c.target_parameters)}, "
        f"rank_pattern {c.rank_pattern}, alpha_pattern {c.alpha_pattern}"
    )
    checks["peft_warnings_on_load"] = sorted({str(w.message).splitlines()[0][:200] for w in caught if "peft" in str(w.filename)})
    in_memory = get_peft_model_state_dict(pm)
    converted = {k: list(v.shape) for k, v in sorted(in_memory.items()) if "layers.0.mlp" in k}
    # The conversion's layout, stated in EXPERT_LORA_DOC["legacy_per_expert_conversion"], tensor for tensor.
    for li in range(cfg.num_hidden_layers):
        p = f"{PREFIX}model.layers.{li}.mlp.experts"
        t = lambda e, proj, ab: tensors[f"{p}.{e}.{proj}.lora_{ab}.weight"]  # noqa: E731
        want = {
            f"{p}.base_layer.lora_A.weight": torch.cat([torch.cat([t(e, "gate_proj", "A"), t(e, "up_proj", "A")]) for e in range(E)]),
            f"{p}.base_layer.lora_B.weight": torch.stack(
                [torch.block_diag(t(e, "gate_proj", "B"), t(e, "up_proj", "B")) for e in range(E)], -1
            ).flatten(1),  # [2I, 2r, E] -> column j*E + e
            f"{p}.lora_A.weight": torch.cat([t(e, "down_proj", "A") for e in range(E)]),
            f"{p}.lora_B.weight": torch.stack([t(e, "down_proj", "B") for e in range(E)], -1).flatten(1),
        }
        for k, v in want.items():
            assert torch.equal(in_memory[k], v), f"conversion layout differs for {k}"
    checks["converted_tensors_vs_documented_layout"] = "equal (A rows e*r'+j, B columns j*E+e, r' = 2r for gate_up_proj)"
    out = forward(pm, batch, output_router_logits=True)
    logits = out.logits.float()
    margin = routing_margin(out.router_logits, batch["attention_mask"], cfg, "qwen3")
    checks["routing_margin_with_adapter_real_tokens"] = fmt(margin)
    assert margin > 1e-4, margin
    ref = load_base(model_dir)
    apply_legacy_by_formula(ref, tensors, ALPHA)
    d = max_abs_diff(forward(ref, batch).logits.float()[real], logits[real])
    checks["per_expert_formula_merge_vs_peft_logits_real_positions"] = fmt(d)
    assert d < 1e-4, d
    diff = max_abs_diff(logits[real], parity["logits"][real])
    checks["max_abs_logits_minus_base_real_positions"] = fmt(diff)
    assert diff > 1.0
    logits2, report = check_adapter(model_dir, adir, batch)
    assert torch.equal(logits2, logits) and report["ok"]

    write_safetensors(OUT / f"{name}-v4-per-expert.safetensors", {**batch, "logits": logits})
    meta = {
        "model": name,
        "model_dir": f"models/{name}",
        "adapter_dir": f"peft/{name}-v4-per-expert",
        "versions": {**versions(), "peft": peft.__version__},
        "what": "a transformers-4.x / PEFT adapter with per-expert keys (as trained on Qwen3-MoE before transformers 5), "
        "written by this script (tensors: STD * randn, seed {}) with LoraConfig.save_pretrained for its config; "
        "logits = PeftModel.from_pretrained on the v5 model (PEFT converts it to the fused layout)".format(SEED_LEGACY),
        "formula": "per expert e: gate_up_proj[e, :I] += (alpha/r) B_gate_e @ A_gate_e, gate_up_proj[e, I:] += "
        "(alpha/r) B_up_e @ A_up_e, down_proj[e] += (alpha/r) B_down_e @ A_down_e; attention as lora.Linear",
        "adapter_config_json": json.loads((adir / "adapter_config.json").read_text()),
        "saved_keys": safetensors_shapes(adir / "adapter_model.safetensors"),
        "peft_in_memory_keys_layer0_mlp_after_conversion": converted,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in sorted({**batch, "logits": logits}.items())},
        "checks": checks,
        "notes": [
            "PhiMoE has no such conversion in PEFT 0.21 (phimoe is not in transformers_weight_conversion's model list): "
            "a per-expert adapter targeting w1/w2/w3 fails to load (NoMatchingPeftModuleError); see probe_legacy_phimoe",
            "qwen3_moe with dense (mlp_only_layers) layers: the dense mlp.{gate,up,down}_proj LoRA tensors of a 4.x "
            "adapter are silently dropped on load, because the config conversion removes gate_proj/up_proj/down_proj "
            "from target_modules; see probe_legacy_dense_drop",
        ],
    }
    meta["probe_legacy_phimoe"] = probe_legacy_phimoe()
    meta["probe_legacy_dense_drop"] = probe_legacy_dense_drop()
    write_json(OUT / f"{name}-v4-per-expert.json", meta)
    return meta


def probe_legacy_phimoe() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(FIXTURES / "models" / "phimoe-tiny")
        t = {}
        for e in range(base.config.num_local_experts):
            for w, (o, i) in [("w1", (32, 64)), ("w2", (64, 32)), ("w3", (32, 64))]:
                t[f"{PREFIX}model.layers.0.block_sparse_moe.experts.{e}.{w}.lora_A.weight"] = torch.zeros(R, i)
                t[f"{PREFIX}model.layers.0.block_sparse_moe.experts.{e}.{w}.lora_B.weight"] = torch.zeros(o, R)
        save_file(t, f"{tmp}/adapter_model.safetensors")
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["w1", "w2", "w3"]).save_pretrained(tmp)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                PeftModel.from_pretrained(base, tmp)
        except Exception as ex:  # noqa: BLE001
            return f"{type(ex).__name__}: {str(ex).splitlines()[0][:200]}"
    raise AssertionError("PEFT now loads per-expert PhiMoE adapters: update the fixtures' notes")


def probe_legacy_dense_drop() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(FIXTURES / "models" / "qwen3-moe-tiny")
        gen = torch.Generator().manual_seed(1)
        t = {}
        for proj, (o, i) in [("gate_proj", (96, 64)), ("up_proj", (96, 64)), ("down_proj", (64, 96))]:
            t[f"{PREFIX}model.layers.1.mlp.{proj}.lora_A.weight"] = torch.randn(R, i, generator=gen)
            t[f"{PREFIX}model.layers.1.mlp.{proj}.lora_B.weight"] = torch.randn(o, R, generator=gen)
        for li in (0, 2):
            for e in range(4):
                for proj, (o, i) in [("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))]:
                    t[f"{PREFIX}model.layers.{li}.mlp.experts.{e}.{proj}.lora_A.weight"] = torch.randn(R, i, generator=gen)
                    t[f"{PREFIX}model.layers.{li}.mlp.experts.{e}.{proj}.lora_B.weight"] = torch.randn(o, R, generator=gen)
        save_file(t, f"{tmp}/adapter_model.safetensors")
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["gate_proj", "up_proj", "down_proj"]).save_pretrained(tmp)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = PeftModel.from_pretrained(base, tmp)
        loaded = get_peft_model_state_dict(pm)
        dense = [k for k in loaded if "layers.1." in k]
        assert not dense, "PEFT now keeps the dense MLP LoRA: update the notes"
        msgs = [str(w.message).splitlines()[0][:120] for w in caught if "peft" in str(w.filename)]
        unexpected = [m for m in msgs if "dense" in m or "layers.1" in m or "unexpected" in m.lower()]
        return (
            f"loaded LoRA keys {len(loaded)} (experts of layers 0 and 2 only); dense layer-1 LoRA keys loaded: 0; "
            f"PEFT warnings mentioning them: {len(unexpected)}"
        )


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", nargs=4, metavar=("MODEL_DIR", "ADAPTER_DIR", "BATCH", "OUT"), help="load an adapter with PEFT and write its logits")
    args = ap.parse_args()
    if args.check:
        sys.exit(run_check(*args.check))

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.chdir(ROOT)

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    probes = probe_natural_configs()
    for name in MODELS:
        meta = make_model_fixture(name, probes)
        print(f"{name}: {meta['checks']}")
    legacy = make_legacy_fixture()
    print(f"qwen3-moe-fused-v4-per-expert: {legacy['checks']}")

    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"{p.stat().st_size:>9}  {sha256(p)[:16]}  {p.relative_to(OUT)}")
    print(f"{total:>9}  total")


if __name__ == "__main__":
    main()
