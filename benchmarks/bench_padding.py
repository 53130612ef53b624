"""Dense attention with a key padding mask: SDPA's backends against our kernel, in one run.

    python benchmarks/bench_padding.py        # -> benchmarks/results/padding_h100.json (use --out on other GPUs)

Why: HunyuanVideo pads its text tokens and hands SDPA a boolean ``[B, 1, 1, N]`` mask. SDPA's flash
backend refuses masks and cuDNN reads the mask as a bias, so the dense steps (warm-up, last steps, and
Inductor's baseline) run far below the unmasked speed. The runtime's dense attention
(``engine._dense_attention``) therefore takes our kernel when a mask is given and the launch table
routes the call to the Gluon kernel; this script is the measurement behind that rule.

Problem: bf16, B=1, H=24, D=128, q/k/v as ``[B, H, N, D]`` views of ``[B, N, H, D]`` memory, the last
``--padded`` keys masked. Impls: ``sdpa_<backend>`` with and without the mask (``default`` = SDPA's own
choice), ``ours`` (no lists: the dense path), ``ours_lists`` (full kv lists), ``engine`` (the runtime's
dense attention). Every case is checked against an fp32 SDPA reference (2e-2 relative error) first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import bench_ms, format_table, header, rel_err, write_results  # noqa: E402

from flashomni_compile.kernels.ops import sparse_attention_op  # noqa: E402
from flashomni_compile.runtime import engine  # noqa: E402
from flashomni_compile.symbols import num_blocks  # noqa: E402

TOL = 2e-2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=str, default="4608,33536", help="comma-separated sequence lengths")
    ap.add_argument("--padded", type=int, default=64, help="masked keys at the end of the sequence")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--out", type=str, default="benchmarks/results/padding_h100.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, D = 1, args.heads, 128
    records = []
    for N in map(int, args.n.split(",")):
        g = torch.Generator("cuda").manual_seed(N)
        q, k, v = (torch.randn(B, N, H, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
                   for _ in range(3))
        kpm = torch.ones(B, N, dtype=torch.bool, device="cuda")
        kpm[:, N - args.padded:] = False
        nb = num_blocks(N, 128)
        cnt = torch.full((B, H, nb), nb, dtype=torch.int32, device="cuda")
        idx = torch.arange(nb, dtype=torch.int32, device="cuda").expand(B, H, nb, nb).contiguous()
        scale = D ** -0.5
        for masked in (False, True):
            m = kpm if masked else None
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 attn_mask=None if m is None else m[:, None, None, :])

            def sdpa(backend, m=m):
                mask = None if m is None else m[:, None, None, :]
                if backend is None:
                    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

                def run():
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                return run

            impls = {"sdpa_default": sdpa(None), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                     "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
                     "ours": lambda m=m: sparse_attention_op(q, k, v, None, None, None, None, m, scale, 128, 128)[0],
                     "ours_lists": lambda m=m: sparse_attention_op(q, k, v, None, cnt, idx, None, m, scale, 128, 128)[0],
                     "engine": lambda m=m: engine._dense_attention(q, k, v, m, scale)}
            for name, fn in impls.items():
                rec = dict(impl=name, N=N, masked=masked, padded=args.padded if masked else 0)
                try:
                    err = rel_err(fn(), ref)
                except RuntimeError as e:   # e.g. the flash backend with a mask: "No available kernel"
                    rec.update(status=f"unsupported: {str(e)[:60]}", ms=None)
                    records.append(rec)
                    continue
                if not err < TOL:
                    rec.update(status="FAIL", rel_err=err, ms=None)
                else:
                    rec.update(status="ok", rel_err=err, ms=bench_ms(fn))
                records.append(rec)
        del q, k, v
    head = header()
    head["problem"] = dict(B=B, H=H, D=D, dtype="bfloat16", padded=args.padded)
    paths = write_results(args.out, head, records)
    print(f"wrote {', '.join(map(str, paths))}")
    print(format_table(records, ["impl", "N", "masked", "ms", "rel_err", "status"]))


if __name__ == "__main__":
    main()
