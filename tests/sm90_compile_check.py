"""Compile the Gluon kernels for sm_90 on any machine (no GPU) and print their resources as JSON.

    python tests/sm90_compile_check.py          # attention: one line per variant {"variant", "D", "regs", "spill", "shared"}
    python tests/sm90_compile_check.py gemm_o   # GEMM-O (gemm_o_sm90.py), the same fields and "loop_local"
    python tests/sm90_compile_check.py gemm_q   # GEMM-Q (gemm_q_sm90.py), the same fields as gemm_o
    python tests/sm90_compile_check.py refresh  # the refresh pass (refresh.py, a Triton kernel), the same fields
    python tests/sm90_compile_check.py plan     # the update step's planning kernels (plan.py), the same fields
    python tests/sm90_compile_check.py probe    # the in-loop spill check on a kernel that spills and one that does not

Under ``sm90_target`` (a stub driver reporting sm_90) each launch becomes ``kernel.warmup`` (compile only)
on CPU tensors of the kernel's real shapes and strides. ``test_attention_sm90.py`` runs it in a subprocess,
away from the test process's triton state.
"""

import itertools
import json
import sys

import torch

from flashomni_compile.kernels import attention_sm90 as G
from flashomni_compile.kernels import gemm_o_sm90, gemm_q_sm90
from flashomni_compile.kernels.sm90_compile import local_accesses_in_loops, resource_usage, sm90_target


# variant -> (partial last kv-block, lists, cached q-blocks with 2 Taylor terms, key padding mask)
VARIANTS = {"dense": (False, False, False, False), "lists": (True, True, False, False),
            "cache": (True, False, True, False), "kpm": (False, False, False, True),
            "lists_cache_kpm": (True, True, True, True)}


def main() -> None:
    H = 2
    # (K ring depth, consumer warpgroups): the table's 2 consumers at 2 and 3 stages, the experimental
    # one-consumer CTA (two CTAs an SM) with one K buffer
    cases = itertools.product(G._HEAD_DIMS, ((2, 2), (3, 2), (1, 1)), VARIANTS.items())
    for D, (stages, consumers), (name, (partial, lists, cached, kpm)) in cases:
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
        flags = torch.empty(1, nb, dtype=torch.uint8) if kpm else None     # attention.masked_kv_blocks
        built = []
        with sm90_target():
            operands = tuple(t if t is not None else q for t in (cache, cache, None, q_keep, cnt, idx, flags, mask))
            strides = (*operands[0].stride(), *(q_keep.stride() if cached else (0, 0, 0)),
                       *(cnt.stride() if lists else (0, 0, 0)), *(idx.stride() if lists else (0, 0, 0, 0)),
                       *(mask.stride() if kpm else (0, 0)))
            G.sparse_attention_sm90(q, k, v, operands, strides, cached, lists, kpm, 2 if cached else 0, 0.1, 0.5,
                                    out, lse,
                                    lambda kern, grid, *a, **kw: built.append(kern.warmup(*a, grid=grid, **kw)),
                                    k_stages=stages, consumers=consumers)
        regs, spill = resource_usage(built[-1])
        print(json.dumps(dict(variant=f"{name}_k{stages}" + ("_c1" if consumers == 1 else ""), D=D, regs=regs, spill=spill,
                              loop_local=local_accesses_in_loops(built[-1]), shared=built[-1].metadata.shared)))
    sys.stdout.flush()


def gemm_o_main() -> None:
    """Variants: "o" sparse_linear_o, "o+e" with an extra range, "c" out_proj_cache; D 64/128, fp16/bf16.
    Partial row and column tiles and B = 2 (the shapes do not change the code, only the specialisation)."""
    B, M, H, N = 2, 1000, 4, 384
    tiles = ((128, 128, 4), (64, 256, 4), (128, 256, 3))     # gemm_o_sm90.TILES, each at its ring depth
    for (kind, extra), D, dt, (bm, bn, stages) in itertools.product(
            (("o", False), ("o", True), ("c", False)), (64, 128), (torch.bfloat16, torch.float16), tiles):
        a, w = torch.empty(B, M, H * D, dtype=dt), torch.empty(N, H * D, dtype=dt)
        y = torch.empty(B, M, N, dtype=dt)
        keep = torch.empty(B, H, 9, dtype=torch.bool).view(torch.uint8)
        c = torch.empty_like(y) if kind == "o" else None
        bias = torch.empty(N, dtype=dt) if kind == "c" else None
        e, ew = (torch.empty(B, M, 128, dtype=dt), torch.empty(N, 128, dtype=dt)) if extra else (None, None)
        built = []
        with sm90_target():
            gemm_o_sm90.gemm_o_sm90(a, w, c, bias, keep, e, ew, y, D, 0, 128, kind == "o",
                                    lambda kern, grid, *args, **kw: built.append(kern.warmup(*args, grid=grid, **kw)),
                                    programs=4, stages=stages, block_m=bm, block_n=bn)
        regs, spill = resource_usage(built[-1])
        print(json.dumps(dict(variant=kind + ("+e" if extra else "") + f"_{bm}x{bn}", D=D,
                              dtype=str(dt).split(".")[-1], regs=regs, loop_local=local_accesses_in_loops(built[-1]),
                              spill=spill, shared=built[-1].metadata.shared)))
    sys.stdout.flush()


def gemm_q_main() -> None:
    """Variants: with and without bias, D 64/128, fp16/bf16, a fused QKV weight (dense columns past
    ``sparse_cols``); partial row and column units and B = 2 (specialisation only)."""
    B, M, H = 2, 1000, 3
    for bias_on, fused, D, dt in itertools.product((True, False), (False, True), (64, 128),
                                                   (torch.bfloat16, torch.float16)):
        K = 320
        N = H * D * (3 if fused else 1)
        x, w, y = torch.empty(B, M, K, dtype=dt), torch.empty(N, K, dtype=dt), torch.empty(B, M, N, dtype=dt)
        keep = torch.empty(B, H, 9, dtype=torch.bool)
        bias = torch.empty(N, dtype=dt) if bias_on else None
        built = []
        with sm90_target():     # two launches: the plan (Triton) and the GEMM (Gluon)
            gemm_q_sm90.gemm_q_sm90(x, w, bias, keep, y, D, 0, 128, H * D,
                                    lambda kern, grid, *args, **kw: built.append(kern.warmup(*args, grid=grid, **kw)),
                                    programs=4)
        for name, k in zip(("plan", ("bias" if bias_on else "nobias") + ("_qkv" if fused else "")), built):
            regs, spill = resource_usage(k)
            print(json.dumps(dict(variant=name, D=D, dtype=str(dt).split(".")[-1], regs=regs,
                                  loop_local=local_accesses_in_loops(k), spill=spill, shared=k.metadata.shared)))
    sys.stdout.flush()


def refresh_main() -> None:
    """Variants: Taylor terms written 0 / 1 / 2, D 64 / 128 (and 40: padded to 64), bf16, a partial block."""
    from flashomni_compile.kernels import refresh

    for terms, D in itertools.product((0, 1, 2), (40, 64, 128)):
        x = torch.empty(1, 300, 4, D, dtype=torch.bfloat16).transpose(1, 2)
        d1 = torch.empty_like(x) if terms else None
        d2 = torch.empty_like(x) if terms > 1 else None
        built = []
        real = refresh.launch
        refresh.launch = lambda kern, grid, *a, **kw: built.append(kern.warmup(*a, grid=grid, **kw))
        try:
            with sm90_target():
                refresh.refresh_terms_triton(x, torch.empty_like(x), d1, d2, 2.0, 128)
        finally:
            refresh.launch = real
        regs, spill = resource_usage(built[-1])
        print(json.dumps(dict(variant=f"terms{terms}", D=D, regs=regs, spill=spill,
                              shared=built[-1].metadata.shared)))
    sys.stdout.flush()


def plan_main() -> None:
    """The planning kernels (plan.py, Triton) at the runtime's shapes: kv_select, q_select (with and
    without text guidance) and store_plan, for a short (Flux 4608 / 128) and a long (33792 / 128) site."""
    from flashomni_compile.kernels import plan

    for nqb in (36, 264):
        B, H = 2, 24
        scores = torch.empty(B, H, nqb, nqb)
        change = torch.empty(B, H, nqb)
        q_keep, kv_keep = torch.empty(B, H, nqb, dtype=torch.bool), torch.empty(B, H, nqb, nqb, dtype=torch.bool)
        bufs = (torch.empty_like(q_keep), torch.empty_like(kv_keep), torch.empty(B, H, nqb, dtype=torch.int32),
                torch.empty(B, H, nqb, nqb, dtype=torch.int32), torch.empty(B, H, nqb, dtype=torch.bool))
        calls = {"kv_select": lambda: plan.kv_select_triton(scores, 0.1, (0, 1), (0, 1), True, 128, 128),
                 "q_select": lambda: plan.q_select_triton(change, None, 10, None, 0.0, (0, 1), (0, 1), False, 0.2),
                 "q_select_tg": lambda: plan.q_select_triton(change, scores, 10, 0.5, 1.0, (0, 1), (0, 1), True),
                 "store_plan": lambda: plan.store_plan_triton(q_keep, kv_keep, *bufs, nqb * 128, nqb * 128, 128,
                                                              128, True)}
        for name, call in calls.items():
            built = []
            real = plan.launch
            plan.launch = lambda kern, grid, *a, **kw: built.append((kern.fn.__name__, kern.warmup(*a, grid=grid, **kw)))
            try:
                with sm90_target():
                    call()
            finally:
                plan.launch = real
            for kname, kern in built:
                regs, spill = resource_usage(kern)
                print(json.dumps(dict(variant=name, kernel=kname, NB=nqb, regs=regs, spill=spill,
                                      shared=kern.metadata.shared)))
    sys.stdout.flush()


def probe_main() -> None:
    """The spill check's own check: a loop whose accumulator cannot fit in registers (``[128, 64]`` fp32
    on one warp: 256 values a thread) against the same loop on a ``[16, 64]`` one."""
    import triton
    import triton.language as tl

    @triton.jit
    def _acc_loop(X, Y, n, ROWS: tl.constexpr):
        offs = tl.arange(0, ROWS)[:, None] * 64 + tl.arange(0, 64)[None, :]
        acc = tl.zeros([ROWS, 64], tl.float32)
        for i in range(n):
            acc = acc * 0.5 + tl.load(X + i * ROWS * 64 + offs)
        tl.store(Y + offs, acc)

    for rows in (16, 128):
        x, y = torch.empty(rows * 64 * 4), torch.empty(rows * 64)
        with sm90_target():
            k = _acc_loop.warmup(x, y, 4, ROWS=rows, grid=(1,), num_warps=1)
        regs, spill = resource_usage(k)
        print(json.dumps(dict(variant=f"probe_{rows}", regs=regs, spill=spill, loop_local=local_accesses_in_loops(k))))
    sys.stdout.flush()


if __name__ == "__main__":
    mode = sys.argv[1:]
    {"gemm_o": gemm_o_main, "gemm_q": gemm_q_main, "refresh": refresh_main, "plan": plan_main,
     "probe": probe_main}.get(mode[0] if mode else "", main)()
