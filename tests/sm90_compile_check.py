"""Compile the Gluon attention kernel for sm_90 on any machine (no GPU) and print its resources as JSON.

    python tests/sm90_compile_check.py      # one line per variant: {"variant", "D", "regs", "spill", "shared"}

A stub driver reports an sm_90 target; each launch becomes ``kernel.warmup`` (compile only) on CPU tensors
of the kernel's real shapes and strides. Run in a subprocess by ``test_attention_sm90.py`` because it
replaces triton's active driver for the whole process.
"""

import itertools
import json
import re
import subprocess
import sys
import tempfile

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from flashomni_compile.kernels import attention_sm90 as G


class _Sm90:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def usage(kernel) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return int(regs), int(stack)


# variant -> (partial last kv-block, lists, cached q-blocks with 2 Taylor terms, key padding mask)
VARIANTS = {"dense": (False, False, False, False), "lists": (True, True, False, False),
            "cache": (True, False, True, False), "kpm": (False, False, False, True),
            "lists_cache_kpm": (True, True, True, True)}


def main() -> None:
    driver.set_active(_Sm90())
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
        G.sparse_attention_sm90(q, k, v, q_keep, cnt, idx, full, cache, cache, None, 2 if cached else 0,
                                mask, 0.1, 0.5, out, lse,
                                lambda kern, grid, *a, **kw: built.append(kern.warmup(*a, grid=grid, **kw)),
                                k_stages=stages)
        regs, spill = usage(built[-1])
        print(json.dumps(dict(variant=f"{name}_k{stages}", D=D, regs=regs, spill=spill,
                              shared=built[-1].metadata.shared)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
