#!/usr/bin/env python3
"""Record TRL's GRPO loss and its gradients on fixed per-token inputs (tests/fixtures/trl/grpo_loss.json).

TRL's own `GRPOTrainer._compute_loss` runs on a stand-in for the trainer: the log-probs and entropies it
would compute from a model are given (seeded random, float32, 4 completions of up to 6 tokens), and so
are the old, reference and sampler log-probs, the advantages and the completion mask. Settings:
loss_type "dapo" (a token sum over the generation batch's token count), epsilon 0.2 / epsilon_high 0.28,
beta 0.04 (k3 in the loss), vLLM's importance-sampling correction "token_truncate" with cap 2 (the
weight min(exp(old - sampling), 2) per token), no delta, no entropy mask.

Cases (each the loss summed over the micro-batches and the gradient of that sum):
  token, one micro-batch, entropy_coef 0.01
  token, micro-batches [0, 1] and [2, 3] accumulated (gradient_accumulation_steps 2)
  token, two ranks holding [0, 1] and [2, 3] (num_processes 2, gradients averaged as DDP does)
  sequence (GSPO), one micro-batch, entropy_coef 0.01, without the sampler correction
  sequence, micro-batches [1] and [0, 2, 3], without the sampler correction
and with loss_type "grpo" (the per-sequence mean) and "dr_grpo" (a divisor of sequences × max_completion_length,
8 here), whose micro-batches and ranks hold as many completions each (TRL then equals the whole batch's mean):
  grpo: token, one micro-batch, entropy_coef 0.01; token, micro-batches [0, 1] and [2, 3]; sequence (GSPO's
    setup), one micro-batch, without the sampler correction
  dr_grpo: token, one micro-batch, entropy_coef 0.01; token, two ranks holding [0, 1] and [2, 3]

TRL averages its entropy bonus per micro-batch, so the accumulated cases leave it out. With
importance_sampling_level "sequence" and a per-token sampler weight TRL spreads each token's weight over
its sequence (the ratio is one [B, 1] value broadcast before the weights), where verl and moerl weight
each token's term: those cases run without the correction.

Usage (CPU, a second or two; environment as scripts/requirements-fixtures.txt):
  /work/venv-fx/bin/python scripts/make_trl_loss_fixture.py
"""

from __future__ import annotations

import json
import types
from collections import defaultdict
from pathlib import Path

import torch
import trl
from trl.trainer.grpo_trainer import GRPOTrainer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "trl" / "grpo_loss.json"
EPS_LOW, EPS_HIGH, BETA, CAP, MAX_COMPLETION = 0.2, 0.28, 0.04, 2.0, 8

# Seed 12 makes every branch count: token ratios beyond both clips, sampler weights above the cap, and
# sequence ratios beyond both clips.
torch.manual_seed(12)
torch.set_num_threads(1)
B, T = 4, 6
MASK = torch.tensor(
    [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float32
)
OLD = -torch.rand(B, T) * 3 - 0.1
LOGP = (OLD + torch.randn(B, T) * 0.3).clamp(max=-0.01)
REF = (LOGP + torch.randn(B, T) * 0.5).clamp(max=-0.01)
SAMPLING = (OLD + torch.randn(B, T) * 0.5).clamp(max=-0.01)
ENTROPY = torch.rand(B, T) * 2
ADV = torch.tensor([1.3, -0.7, 0.4, -1.1])


def trl_loss(rows, level, correction, entropy_coef, accumulation, processes, loss_type):
    """TRL's loss on the completions `rows`, and the gradients of its log-probs and entropies."""
    logp = LOGP[rows].clone().requires_grad_(True)
    entropy = ENTROPY[rows].clone().requires_grad_(True)
    mask = MASK[rows]
    accelerator = types.SimpleNamespace(
        num_processes=processes,
        reduce=lambda t, reduction: t,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        sync_gradients=True,
    )
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, entropy, None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=BETA,
        loss_type=loss_type,
        max_completion_length=MAX_COMPLETION,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        args=types.SimpleNamespace(
            use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation
        ),
        use_vllm=correction,
        vllm_importance_sampling_correction=correction,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation,
        accelerator=accelerator,
        _entropy_bonus_enabled=entropy_coef > 0,
        entropy_coef=entropy_coef,
        use_adaptive_entropy=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    n = len(rows)
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1),
        "completion_ids": torch.zeros(n, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": ADV[rows],
        "old_per_token_logps": OLD[rows],
        "ref_per_token_logps": REF[rows],
        # _generate_and_score_completions' "token_truncate" weight
        "importance_sampling_ratio": torch.clamp(torch.exp((OLD[rows] - SAMPLING[rows]) * mask), max=CAP),
        # the tokens of the whole generation batch (all ranks)
        "num_items_in_batch": MASK.sum(),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    zeros = torch.zeros_like(entropy)
    return loss.item(), logp.grad, entropy.grad if entropy.grad is not None else zeros


def case(level, splits, correction=True, entropy_coef=0.0, ranks=False, loss_type="dapo"):
    """TRL over the splits: accumulated micro-batches, or ranks whose gradients are averaged."""
    loss, grad_logp, grad_entropy = 0.0, torch.zeros(B, T), torch.zeros(B, T)
    for rows in splits:
        acc, procs = (1, len(splits)) if ranks else (len(splits), 1)
        value, g_logp, g_entropy = trl_loss(rows, level, correction, entropy_coef, acc, procs, loss_type)
        scale = 1 / len(splits) if ranks else 1  # DDP averages the ranks' gradients
        loss += value * scale
        grad_logp[rows] += g_logp * scale
        grad_entropy[rows] += g_entropy * scale
    return {
        "lossType": loss_type,
        "level": level,
        "splits": splits,
        "ranks": ranks,
        "correction": correction,
        "entropyCoef": entropy_coef,
        "loss": loss,
        "gradLogprobs": grad_logp.tolist(),
        "gradEntropy": grad_entropy.tolist(),
    }


def main() -> None:
    fixture = {
        "trl": trl.__version__,
        "torch": torch.__version__,
        "clip": EPS_LOW,
        "clipHigh": EPS_HIGH,
        "klCoef": BETA,
        "rolloutCorrection": CAP,
        "maxCompletion": MAX_COMPLETION,
        "mask": MASK.tolist(),
        "logprobs": LOGP.tolist(),
        "old": OLD.tolist(),
        "ref": REF.tolist(),
        "rollout": SAMPLING.tolist(),
        "entropy": ENTROPY.tolist(),
        "advantages": ADV.tolist(),
        "cases": [
            case("token", [[0, 1, 2, 3]], entropy_coef=0.01),
            case("token", [[0, 1], [2, 3]]),
            case("token", [[0, 1], [2, 3]], ranks=True),
            case("sequence", [[0, 1, 2, 3]], correction=False, entropy_coef=0.01),
            case("sequence", [[1], [0, 2, 3]], correction=False),
            case("token", [[0, 1, 2, 3]], entropy_coef=0.01, loss_type="grpo"),
            case("token", [[0, 1], [2, 3]], loss_type="grpo"),
            case("sequence", [[0, 1, 2, 3]], correction=False, loss_type="grpo"),
            case("token", [[0, 1, 2, 3]], entropy_coef=0.01, loss_type="dr_grpo"),
            case("token", [[0, 1], [2, 3]], ranks=True, loss_type="dr_grpo"),
        ],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One line per input and per case: readable diffs without a line per number.
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in fixture.items() if k != "cases"]
    cases = ",\n  ".join(json.dumps(c) for c in fixture["cases"])
    OUT.write_text("{\n " + ",\n ".join(lines) + f',\n "cases": [\n  {cases}\n ]\n}}\n')
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
