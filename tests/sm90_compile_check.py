"""Compile the Gluon attention kernel for sm_90 on any machine (no GPU) and print its resources as JSON.

    python tests/sm90_compile_check.py      # one line per variant: {"variant", "D", "regs", "spill", "shared"}

Under ``sm90_target`` (a stub driver reporting sm_90) each launch becomes ``kernel.warmup`` (compile only)
on CPU tensors of the kernel's real shapes and strides. ``test_attention_sm90.py`` runs it in a subprocess,
away from the test process's triton state.
"""

import itertools
import json
import sys

import torch

from flashomni_compile.kernels import attention_sm90 as G
from flashomni_compile.kernels.sm90_compile import resource_usage, sm90_target


# variant -> (partial last kv-block, lists, cached q-blocks with 2 Taylor terms, key padding mask)
VARIANTS = {"dense": (False, False, False, False), "lists": (True, True, False, False),
            "cache": (True, False, True, False), "kpm": (False, False, False, True),
            "lists_cache_kpm": (True, True, True, True)}


def main() -> None:
    H = 2
    cases = itertools.product(G._HEAD_DIMS, (2, 3), VARIANTS.items())
    for D, stages, (name, (partial, lists, cached, kpm)) in cases:
        N = 512 + (40 if partial else 0)
        q = torch.empty(1, N, H, D, dtype=torch.bfloat16).transpose(1, 2)
        k, v, out = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
        lse = torch.empty(1, H, N)
        nb = (N + 127) // 128
        cnt = torch.empty(1, H, nb, dtype=torch.int32) if lists else None
        idx = torch.empty(1, H, nb, nb, dtype=torch.int32) if lists else None
        q_keep = torch.empty(1, H, nb, dtype=torch.bool) if cached else None
        cache = torch.empty_like(q) if cached else None
        mask = torch.empty(1, N, dtype=torch.bool) if kpm else None
        full = torch.empty(1, H, nb, dtype=torch.int32) if kpm and lists else None
        built = []
        with sm90_target():
            operands = tuple(t if t is not None else q for t in (cache, cache, None, q_keep, cnt, idx, full, mask))
            strides = (*operands[0].stride(), *(q_keep.stride() if cached else (0, 0, 0)),
                       *(cnt.stride() if lists else (0, 0, 0)), *(idx.stride() if lists else (0, 0, 0, 0)),
                       *(mask.stride() if kpm else (0, 0)))
            G.sparse_attention_sm90(q, k, v, operands, strides, cached, lists, kpm, 2 if cached else 0, 0.1, 0.5,
                                    out, lse,
                                    lambda kern, grid, *a, **kw: built.append(kern.warmup(*a, grid=grid, **kw)),
                                    k_stages=stages)
        regs, spill = resource_usage(built[-1])
        print(json.dumps(dict(variant=f"{name}_k{stages}", D=D, regs=regs, spill=spill,
                              shared=built[-1].metadata.shared)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
