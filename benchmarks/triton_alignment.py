"""Which compiled Triton configs get misaligned rows wrong (CUDA only; run without TRITON_INTERPRET).

The first H200 run gave wrong float16/bfloat16 outputs for values behind a strided view with 29-element
rows. ``attnctrl.kernels._triton.aligned_rows`` now copies such inputs; this script bypasses that copy
and runs every candidate config of the failing shape on the strided inputs and on aligned copies,
printing the max error against a float64 reference, so the cause (a config, alignment, or both) is on record.

Usage: ``python benchmarks/triton_alignment.py [--out FILE.md]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from attnctrl.kernels import attention_with_probs
from attnctrl.kernels import _triton


def _strided(t: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``t (B, H, N, D)`` as a view into a larger NaN-filled buffer (rows of D + 5 elements)."""
    b, h, n, d = t.shape
    if transpose:
        buf = torch.full((b, n + 3, h + 1, d + 5), float("nan"), dtype=t.dtype, device=t.device)
        view = buf[:, :n, :h, :d].transpose(1, 2)
    else:
        buf = torch.full((b + 1, h + 1, n + 3, d + 5), float("nan"), dtype=t.dtype, device=t.device)
        view = buf[:b, :h, :n, :d]
    view.copy_(t)
    return view


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 0
    lines = ["| dtype | config (BMxBN/warps/stages) | err strided | err aligned |", "|---|---|---|---|"]
    real_aligned = _triton.aligned_rows
    real_candidates = _triton.cuda_candidates
    for dtype in (torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        q, k = (torch.randn(2, 2, n, 40, generator=g) for n in (77, 130))
        v = torch.randn(2, 2, 130, 24, generator=g)
        ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 40**0.5, -1) @ v.double()
        qc, kc, vc = (t.to(dtype).cuda() for t in (q, k, v))
        strided = (_strided(qc, True), _strided(kc, True), _strided(vc, False))
        for cfg in real_candidates(dtype, 40, 24):
            errs = []
            for inputs in (strided, (qc, kc, vc)):
                _triton.cuda_candidates = lambda *a, cfg=cfg, **k: [cfg]
                _triton.aligned_rows = lambda t: t
                try:
                    out, _ = attention_with_probs(*inputs, columns=[0, 64, 129], backend="triton")
                    errs.append(f"{(out.double().cpu() - ref).abs().max().item():.3g}")
                except Exception as err:  # noqa: BLE001
                    errs.append(f"{type(err).__name__}: {str(err)[:80]}")
                finally:
                    _triton.cuda_candidates, _triton.aligned_rows = real_candidates, real_aligned
            label = f"{cfg.block_m}x{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}"
            lines.append(f"| {str(dtype).removeprefix('torch.')} | {label} | {errs[0]} | {errs[1]} |")
        # with the alignment copy in place (what users run)
        out, _ = attention_with_probs(*strided, columns=[0, 64, 129], backend="triton")
        lines.append(f"| {str(dtype).removeprefix('torch.')} | automatic, with aligned_rows | "
                     f"{(out.double().cpu() - ref).abs().max().item():.3g} | — |")
    text = "## Triton: strided 29-element value rows vs aligned copies (shape 2x2, Nq 77, Nk 130, D 40, Dv 24)\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
