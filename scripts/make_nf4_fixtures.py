#!/usr/bin/env python3
"""Record bitsandbytes' NF4 quantisation of fixed inputs (tests/fixtures/nf4/bnb.safetensors).

For every input tensor NAME the output file holds, from
`bitsandbytes.functional.quantize_4bit(x, quant_type="nf4", blocksize=64,
compress_statistics=...)` on the CPU:

  NAME                 the input (float32, bfloat16 or float16)
  NAME.packed          uint8 [ceil(n/2)]: packed codes (identical with and without double quantisation)
  NAME.absmax          float32 [ceil(n/64)]
  NAME.deq             dequantize_4bit output, input dtype (small inputs only; see quantise())
  NAME.dq.codes        uint8 [ceil(n/64)]: 8-bit codes of absmax - offset (bnb's CPU kernel)
  NAME.dq.nearest      uint8: the same rounded to the nearest dynamic-map entry (torch.bucketize on
                       the midpoints, what bnb's CUDA kernel does; bnb 0.50's CPU kernel uses a
                       65536-bin lookup table that can land one entry off)
  NAME.dq.absmax       float32 [ceil(n/64/256)]
  NAME.dq.offset       float32 [1]
  NAME.dq.deq          dequantize_4bit output with double quantisation (small inputs only)

plus `nf4_code` (16) and `dynamic_map` (256). Metadata: library versions.

Usage (CPU only; environment as scripts/requirements-fixtures.txt plus bitsandbytes):
  /work/venv-fx/bin/pip install bitsandbytes==0.50.2
  /work/venv-fx/bin/python scripts/make_nf4_fixtures.py            # writes the fixture
  /work/venv-fx/bin/python scripts/make_nf4_fixtures.py --inputs IN.safetensors --out OUT.safetensors
                                                                    # quantises IN's tensors (tests)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as bnbf
import torch
from safetensors.torch import load_file, save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nf4" / "bnb.safetensors"
DEQ_MAX = 8192  # store dequantised outputs only for inputs this small (fixture size)


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    code = bnbf.get_4bit_type("nf4", device="cpu")
    mids = (code[:-1] + code[1:]) / 2
    # One block of exact ties: absmax 1, then every midpoint and code value, each sign.
    ties = torch.cat([torch.tensor([1.0]), mids, -mids, code, torch.zeros(64 - 1 - 15 - 15 - 16)])
    d = torch.randn(75, 256, generator=g) * 0.05
    d[3, 7] = 1.5  # an outlier: one block with a large absmax
    return {
        "f32_48x64": torch.randn(48, 64, generator=g),
        "f32_7x45": torch.randn(7, 45, generator=g) * 3,  # 315 values: partial last block, odd count
        "bf16_64x96": (torch.randn(64, 96, generator=g) * 0.02).bfloat16(),
        "bf16_75x256": d.bfloat16(),  # 300 blocks: one full 256-block of absmax and a partial one
        "f16_3x37": torch.randn(3, 37, generator=g).half(),
        "f32_zero_block": torch.cat([torch.zeros(64), torch.full((64,), 0.5)]).reshape(2, 64),
        "f32_zeros": torch.zeros(128),  # all-zero absmax: its 256-block absmax is 0 too
        "f32_ties": ties,
    }


def quantise(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dyn = bnbf.create_dynamic_map(signed=True)
    dyn_mids = (dyn[:-1] + dyn[1:]) / 2
    out: dict[str, torch.Tensor] = {}
    for name, x in tensors.items():
        out[name] = x
        q, st = bnbf.quantize_4bit(x, quant_type="nf4", blocksize=64, compress_statistics=False)
        qd, sd = bnbf.quantize_4bit(x, quant_type="nf4", blocksize=64, compress_statistics=True)
        assert torch.equal(q, qd), f"{name}: packed codes depend on double quantisation"
        out[f"{name}.packed"] = q.reshape(-1)
        out[f"{name}.absmax"] = st.absmax
        # The nearest-entry rounding of (absmax - offset), from bnb's own offset and 256-block absmax.
        dev = st.absmax - sd.offset
        n = dev.numel()
        pad = torch.cat([dev, torch.zeros((-n) % 256)]).reshape(-1, 256)
        scaled = (pad * (1.0 / sd.state2.absmax).unsqueeze(1)).reshape(-1)[:n]
        nearest = torch.bucketize(scaled, dyn_mids).to(torch.uint8)
        zero = (sd.state2.absmax == 0).repeat_interleave(256)[:n]
        nearest[zero] = 0  # bnb: an all-zero block gets code 0
        out[f"{name}.dq.codes"] = sd.absmax
        out[f"{name}.dq.nearest"] = nearest
        out[f"{name}.dq.absmax"] = sd.state2.absmax
        out[f"{name}.dq.offset"] = sd.offset.reshape(1)
        if x.numel() <= DEQ_MAX:
            # Dequantised through the flattened tensor: bnb 0.50's AVX-512 CPU kernel indexes absmax
            # per row (absmax[row * (cols // 64) + col // 64]), wrong when cols is not a multiple of
            # 64 (e.g. [64, 96]); for one row it is right. The packed codes are the same either way.
            flat = x.reshape(-1)
            qf, sf = bnbf.quantize_4bit(flat, quant_type="nf4", blocksize=64, compress_statistics=False)
            qfd, sfd = bnbf.quantize_4bit(flat, quant_type="nf4", blocksize=64, compress_statistics=True)
            assert torch.equal(qf, q) and torch.equal(qfd, q) and torch.equal(sfd.absmax, sd.absmax)
            out[f"{name}.deq"] = bnbf.dequantize_4bit(qf, sf).reshape(x.shape)
            out[f"{name}.dq.deq"] = bnbf.dequantize_4bit(qfd, sfd).reshape(x.shape)
    return {k: v.detach().contiguous() for k, v in out.items()}


def metadata() -> dict[str, str]:
    return {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", help="quantise this file's tensors instead of the fixed inputs")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tensors = load_file(args.inputs) if args.inputs else inputs()
    out = quantise(tensors)
    if not args.inputs:
        out["nf4_code"] = bnbf.get_4bit_type("nf4", device="cpu")
        out["dynamic_map"] = bnbf.create_dynamic_map(signed=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, args.out, metadata=metadata())
    print(f"wrote {args.out}: {Path(args.out).stat().st_size} bytes, bitsandbytes {bitsandbytes.__version__}")


if __name__ == "__main__":
    main()
