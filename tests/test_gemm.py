"""GEMM-Q and GEMM-O: Triton (interpreted on CPU) against the torch twins on float64, plus the op contract.

Every case draws fresh random inputs (views into NaN-padded buffers, so reads past a row's end show),
poisons the output with NaN before the launch (``out=``) and checks that every element was written. Sizes are tiny; the configs force several row and column tiles, partial
tiles, tiles that straddle heads of 72, and the tensor-descriptor (TMA) path, which the interpreter runs.
"""

import pytest
import torch
from conftest import REL_TOL, rel_err

from flashomni_compile.kernels import gemm_o, gemm_q, ops
from flashomni_compile.kernels import launch as L
from flashomni_compile.kernels.gemm_q import Config

SMALL = Config(32, 32, 32, 2, 4, 1, False)   # pointer loads, 32x32 tiles
TMA = Config(64, 64, 32, 2, 4, 1, True)      # descriptor loads; 64 columns straddle heads of 72
SPLIT = Config(32, 128, 32, 2, 4, 1, True, split_n=True)   # wide tiles run as two halves unless both kept
SPLIT_PTR = SPLIT._replace(tma=False)
H = 2                                        # attention heads
# The GPU when there is one (compiled kernels); else the CPU (interpreter). Inputs are drawn on the CPU so
# both see the same values.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rand(*shape, dtype=torch.float32, seed=0):
    """Random values seen through a view of a NaN buffer 64 columns wider: a kernel that reads past the
    last column (a partial reduction step, a head's tail) gets NaN into its output."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((*shape[:-1], shape[-1] + 64), float("nan"), dtype=dtype)
    buf[..., :shape[-1]] = torch.randn(*shape, generator=g).to(dtype)
    return buf.to(DEV)[..., :shape[-1]]


def _symbols(batch, nqb, density, seed=0):
    """Random ``q_keep [batch, H, nqb]``; for 0 < density < 1 both values are guaranteed to occur."""
    g = torch.Generator().manual_seed(1000 + seed)
    keep = torch.rand(batch, H, nqb, generator=g) < density
    if 0.0 < density < 1.0:
        keep[0, 0, 0], keep[0, 1, 0] = True, False
    return keep.to(DEV)


def _nqb(m, row_offset, block_q, spare=1):
    return (row_offset + m + block_q - 1) // block_q + spare   # spare: later rows of the joint sequence


def _poison(batch, m, n, dtype):
    return torch.full((batch, m, n), float("nan"), dtype=dtype, device=DEV)


def _dense(x, w, b=None):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


# ---------------------------------------------------------------------------------------------------
# The references against the definition, element by element (everything else trusts them)
# ---------------------------------------------------------------------------------------------------
def test_refs_follow_the_definition():
    D, M, K, N, off, bq = 16, 40, 24, 20, 5, 16
    x, w, b = _rand(1, M, K, seed=1).double(), _rand(3 * H * D, K, seed=2).double(), _rand(3 * H * D, seed=3).double()
    keep = _symbols(1, _nqb(M, off, bq), 0.5, seed=4)
    y = gemm_q.sparse_linear_q_ref(x, w, b, keep, D, off, bq, H * D)
    a, wo, bo = _rand(1, M, H * D, seed=5).double(), _rand(N, H * D, seed=6).double(), _rand(N, seed=7).double()
    c = gemm_o.out_proj_cache_ref(a, wo, bo, keep, D, off, bq)
    yo = gemm_o.sparse_linear_o_ref(a, wo, c, keep, None, None, D, off, bq)
    for m in range(M):
        qb = (off + m) // bq
        for h in range(H):
            cols = slice(h * D, (h + 1) * D)
            want = x[0, m] @ w[cols].T + b[cols] if keep[0, h, qb] else torch.zeros(D, dtype=torch.float64, device=x.device)
            torch.testing.assert_close(y[0, m, cols], want)
        torch.testing.assert_close(y[0, m, H * D:], x[0, m] @ w[H * D:].T + b[H * D:])
        cached = sum(a[0, m, h * D:(h + 1) * D] @ wo[:, h * D:(h + 1) * D].T for h in range(H) if not keep[0, h, qb])
        torch.testing.assert_close(c[0, m], bo + cached)
    torch.testing.assert_close(yo, a @ wo.T + bo)


# ---------------------------------------------------------------------------------------------------
# GEMM-Q
# ---------------------------------------------------------------------------------------------------
Q_CASES = [
    # dtype,          D,  M,   K,  off, bq, density, bias,  fused, batch, cfg
    (torch.float32,   64, 96,  64, 0,   64, 0.5,     True,  False, 1,     SMALL),
    (torch.float32,   72, 200, 48, 77,  32, 0.25,    False, True,  1,     SMALL),
    (torch.float16,   64, 200, 64, 64,  64, 0.75,    True,  True,  1,     TMA),
    (torch.bfloat16,  72, 96,  64, 77,  64, 0.5,     True,  False, 1,     TMA),
    (torch.float32,   72, 96,  48, 0,   32, 1.0,     True,  True,  1,     SMALL),   # all dense
    (torch.float32,   64, 200, 64, 13,  32, 0.0,     True,  True,  1,     TMA),     # all cached
    (torch.float32,   64, 96,  64, 40,  32, 0.5,     True,  True,  2,     SMALL),   # batch
    (torch.float16,   64, 200, 64, 77,  32, 0.5,     True,  True,  1,     SPLIT),
    (torch.float32,   72, 96,  48, 13,  32, 0.25,    False, True,  2,     SPLIT_PTR),
]


@pytest.mark.parametrize("dtype, D, M, K, off, bq, density, has_bias, fused, batch, cfg", Q_CASES)
def test_gemm_q_matches_ref(dtype, D, M, K, off, bq, density, has_bias, fused, batch, cfg):
    sparse_cols = H * D
    N = 3 * sparse_cols if fused else sparse_cols
    x, w = _rand(batch, M, K, dtype=dtype, seed=1), _rand(N, K, dtype=dtype, seed=2)
    b = _rand(N, dtype=dtype, seed=3) if has_bias else None
    keep = _symbols(batch, _nqb(M, off, bq), density, seed=4)
    out = _poison(batch, M, N, dtype)
    y = gemm_q.sparse_linear_q_triton(x, w, b, keep, D, off, bq, sparse_cols, config=cfg, out=out)
    ref = gemm_q.sparse_linear_q_ref(x.double(), w.double(), None if b is None else b.double(), keep, D, off, bq,
                                     sparse_cols)
    assert y is out
    assert rel_err(y, ref) < REL_TOL[dtype]
    # Non-computed tiles are exactly zero; computed Q columns and the K/V columns are not.
    computed = gemm_q.row_keep(keep, M, off, bq).repeat_interleave(D, dim=-1)
    q = y[..., :sparse_cols]
    assert (q[~computed] == 0).all()
    assert (q[computed] != 0).float().mean() > 0.99 if computed.any() else True
    if fused:
        assert rel_err(y[..., sparse_cols:], _dense(x, w[sparse_cols:], None if b is None else b[sparse_cols:])) < REL_TOL[dtype]


@pytest.mark.parametrize("cfg", [SMALL, TMA])
def test_gemm_q_strided_inputs(cfg):
    """Column slices (descriptor-ready strides) and a batch-major transpose (no [B*M, K] view)."""
    D, M, K, off, bq = 64, 96, 64, 16, 32
    x = _rand(M, 2, 2 * K, seed=1).transpose(0, 1)[..., :K]           # [2, M, K], strides (2K, 4K, 1)
    w = _rand(3 * H * D, 2 * K, seed=2)[:, K:]                         # [N, K], stride 2K
    keep = _symbols(2, _nqb(M, off, bq), 0.5)
    y = gemm_q.sparse_linear_q_triton(x, w, None, keep, D, off, bq, H * D, config=cfg,
                                      out=_poison(2, M, 3 * H * D, x.dtype))
    ref = gemm_q.sparse_linear_q_ref(x.double(), w.double(), None, keep, D, off, bq, H * D)
    assert rel_err(y, ref) < REL_TOL[torch.float32]


# ---------------------------------------------------------------------------------------------------
# GEMM-O
# ---------------------------------------------------------------------------------------------------
O_CASES = [
    # dtype,          D,  M,   off, bq, density, bias,  extra, batch, cfg
    (torch.float32,   64, 96,  0,   64, 0.5,     True,  None,  1,     SMALL),
    (torch.float32,   72, 200, 77,  32, 0.25,    False, 40,    1,     SMALL),
    (torch.float16,   64, 200, 64,  64, 0.75,    True,  64,    1,     TMA),
    (torch.bfloat16,  72, 96,  77,  64, 0.5,     True,  None,  1,     TMA),
    (torch.float32,   64, 96,  13,  32, 1.0,     True,  48,    1,     TMA),     # all dense
    (torch.float32,   72, 200, 0,   32, 0.0,     True,  None,  1,     SMALL),   # all cached
    (torch.float32,   64, 96,  40,  32, 0.5,     True,  40,    2,     SMALL),   # batch
]


@pytest.mark.parametrize("dtype, D, M, off, bq, density, has_bias, extra, batch, cfg", O_CASES)
def test_gemm_o_matches_ref(dtype, D, M, off, bq, density, has_bias, extra, batch, cfg):
    N = 80   # not a multiple of the column tile
    a, w = _rand(batch, M, H * D, dtype=dtype, seed=1), _rand(N, H * D, dtype=dtype, seed=2)
    b = _rand(N, dtype=dtype, seed=3) if has_bias else None
    e, ew = (_rand(batch, M, extra, dtype=dtype, seed=5), _rand(N, extra, dtype=dtype, seed=6)) if extra else (None, None)
    keep = _symbols(batch, _nqb(M, off, bq), density, seed=4)
    d64 = (lambda t: None if t is None else t.double())

    c = gemm_o.out_proj_cache_triton(a, w, b, keep, D, off, bq, config=cfg, out=_poison(batch, M, N, dtype))
    c_ref = gemm_o.out_proj_cache_ref(a.double(), w.double(), d64(b), keep, D, off, bq)
    if density == 1.0 and b is not None:   # nothing cached: c is the bias
        assert torch.equal(c, b.expand_as(c))
    else:
        assert rel_err(c, c_ref) < REL_TOL[dtype]

    y = gemm_o.sparse_linear_o_triton(a, w, c, keep, e, ew, D, off, bq, config=cfg, out=_poison(batch, M, N, dtype))
    y_ref = gemm_o.sparse_linear_o_ref(a.double(), w.double(), c.double(), keep, d64(e), d64(ew), D, off, bq)
    assert rel_err(y, y_ref) < REL_TOL[dtype]


@pytest.mark.parametrize("select_kept, cfg, dtype", [
    (True, SMALL, torch.float32), (False, TMA, torch.float32), (True, SMALL, torch.float16),
    (False, TMA, torch.float16)])
def test_gemm_o_reads_only_selected_heads(select_kept, cfg, dtype):
    """Heads outside the reduction hold NaN in ``a``: a kernel that read them would return NaN."""
    D, M, off, bq, N = 64, 96, 16, 32, 48
    a, w, c = _rand(1, M, H * D, dtype=dtype, seed=1), _rand(N, H * D, dtype=dtype, seed=2), _rand(1, M, N, dtype=dtype, seed=3)
    keep = _symbols(1, _nqb(M, off, bq), 0.5)
    sel = gemm_q.row_keep(keep, M, off, bq).repeat_interleave(D, dim=-1)
    a = torch.where(sel if select_kept else ~sel, a, float("nan"))
    if select_kept:
        y = gemm_o.sparse_linear_o_triton(a, w, c, keep, None, None, D, off, bq, config=cfg)
        ref = gemm_o.sparse_linear_o_ref(a.double(), w.double(), c.double(), keep, None, None, D, off, bq)
    else:
        y = gemm_o.out_proj_cache_triton(a, w, None, keep, D, off, bq, config=cfg)
        ref = gemm_o.out_proj_cache_ref(a.double(), w.double(), None, keep, D, off, bq)
    assert rel_err(y, ref) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype, D, off, extra", [
    (torch.float32, 64, 0, None), (torch.bfloat16, 72, 77, 40), (torch.float16, 64, 13, None)])
def test_identity_through_the_ops(monkeypatch, dtype, D, off, extra):
    """sparse_linear_o(a, W, out_proj_cache(a, W, b, s), s) == a W^T + b (+ extra) for random symbols."""
    monkeypatch.setenv("FLASHOMNI_FORCE_TRITON", "1")
    M, N, bq = 200, 80, 32
    a, w, b = _rand(1, M, H * D, dtype=dtype, seed=1), _rand(N, H * D, dtype=dtype, seed=2), _rand(N, dtype=dtype, seed=3)
    e, ew = (_rand(1, M, extra, dtype=dtype, seed=5), _rand(N, extra, dtype=dtype, seed=6)) if extra else (None, None)
    for density, seed in ((0.3, 7), (0.7, 8)):
        s = _symbols(1, _nqb(M, off, bq), density, seed=seed)
        c = ops.out_proj_cache(a, w, b, s, head_dim=D, row_offset=off, block_q=bq)
        y = ops.sparse_linear_o(a, w, c, s, head_dim=D, row_offset=off, block_q=bq, extra=e, extra_weight=ew)
        want = _dense(a, w, b) + (0 if e is None else _dense(e, ew))
        assert rel_err(y, want) < REL_TOL[dtype]


def test_gemm_q_op_forced_triton(monkeypatch):
    monkeypatch.setenv("FLASHOMNI_FORCE_TRITON", "1")
    D, M, K, bq = 64, 96, 64, 32
    x, w = _rand(1, M, K, seed=1), _rand(3 * H * D, K, seed=2)
    keep = _symbols(1, _nqb(M, 0, bq), 0.5)
    y = ops.sparse_linear_q(x, w, None, keep, head_dim=D, block_q=bq, sparse_cols=H * D)
    # fp32 inputs: the GPU's tl.dot runs tf32 (REL_TOL's fp32 entry), the interpreter exact fp32
    assert rel_err(y, gemm_q.sparse_linear_q_ref(x.double(), w.double(), None, keep, D, 0, bq, H * D)) \
        < REL_TOL[torch.float32]


def test_head_block_k():
    assert gemm_o.head_block_k(128, 64) == 64 and gemm_o.head_block_k(128, 128) == 128
    assert gemm_o.head_block_k(64, 128) == 64 and gemm_o.head_block_k(72, 64) == 32


# ---------------------------------------------------------------------------------------------------
# Op contract: opcheck (Triton path) and argument validation
# ---------------------------------------------------------------------------------------------------
def test_opcheck(monkeypatch):
    monkeypatch.setenv("FLASHOMNI_FORCE_TRITON", "1")
    D, M, K, N, bq = 64, 40, 32, 48, 32
    x, a = _rand(1, M, K, seed=1), _rand(1, M, H * D, seed=2)
    wq, wo, b = _rand(3 * H * D, K, seed=3), _rand(N, H * D, seed=4), _rand(N, seed=5)
    c, e, ew = _rand(1, M, N, seed=6), _rand(1, M, 16, seed=7), _rand(N, 16, seed=8)
    keep = _symbols(1, _nqb(M, 8, bq), 0.5)
    torch.library.opcheck(ops.sparse_linear_q_op, (x, wq, None, keep, D, 8, bq, H * D))
    torch.library.opcheck(ops.out_proj_cache_op, (a, wo, b, keep, D, 8, bq))
    torch.library.opcheck(ops.sparse_linear_o_op, (a, wo, c, keep, e, ew, D, 8, bq))


def _q_args(**kw):
    D, M, K = 64, 96, 32
    args = dict(x=_rand(1, M, K), weight=_rand(3 * H * D, K), bias=_rand(3 * H * D),
                q_keep=torch.ones(1, H, 3, dtype=torch.bool, device=DEV), head_dim=D, row_offset=0, block_q=32, sparse_cols=H * D)
    args.update(kw)
    return args


@pytest.mark.parametrize("bad, match", [
    (dict(x=_rand(96, 32)), r"x must be a 3-D tensor, got \(96, 32\)"),
    (dict(x=torch.ones(1, 96, 32, dtype=torch.int32, device=DEV)), "x has dtype torch.int32"),
    (dict(weight=_rand(384, 16)), r"weight has shape \(384, 16\), expected \[N, K\] with K = x.shape\[-1\] = 32"),
    (dict(weight=_rand(384, 32, dtype=torch.float16)), "weight must match the activations' dtype"),
    (dict(bias=_rand(10)), r"bias has shape \(10,\), expected \(384,\)"),
    (dict(head_dim=48), "head_dim=48 does not divide sparse_cols=128"),
    (dict(head_dim=0), "head_dim must be a positive int"),
    (dict(sparse_cols=400), r"sparse_cols must be an int in \(0, N=384\]"),
    (dict(sparse_cols=100), "head_dim=64 does not divide sparse_cols=100"),
    (dict(q_keep=torch.ones(1, 3, 3, dtype=torch.bool, device=DEV)), r"q_keep has shape \(1, 3, 3\), expected \(1, 2, NQB >= 3\)"),
    (dict(row_offset=40), r"expected \(1, 2, NQB >= 5\)"),
    (dict(q_keep=torch.ones(1, H, 3, device=DEV)), "q_keep must be a bool tensor"),
    (dict(block_q=48), "block_q must be a power of two"),
    (dict(row_offset=-1), "row_offset must be an int >= 0"),
])
def test_gemm_q_validation(bad, match):
    args = _q_args(**bad)
    with pytest.raises(ValueError, match=match):
        ops.sparse_linear_q(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("q_keep"), **args)


def _o_args(**kw):
    D, M, N = 64, 96, 48
    args = dict(a=_rand(1, M, H * D), weight=_rand(N, H * D), c=_rand(1, M, N),
                q_keep=torch.ones(1, H, 3, dtype=torch.bool, device=DEV), head_dim=D, row_offset=0, block_q=32)
    args.update(kw)
    return args


@pytest.mark.parametrize("bad, match", [
    (dict(a=_rand(1, 96, 100)), r"weight has shape \(48, 128\), expected \[N, K\] with K = a.shape\[-1\] = 100"),
    (dict(c=_rand(1, 96, 40)), r"c has shape \(1, 96, 40\), expected \(1, 96, 48\)"),
    (dict(c=_rand(1, 96, 48, dtype=torch.bfloat16)), "c must match the activations' dtype"),
    (dict(extra=_rand(1, 96, 16)), "extra and extra_weight go together"),
    (dict(extra=_rand(1, 90, 16), extra_weight=_rand(48, 16)), r"extra has shape \(1, 90, 16\)"),
    (dict(extra=_rand(1, 96, 16), extra_weight=_rand(48, 8)), r"extra_weight has shape \(48, 8\), expected \(48, 16\)"),
    (dict(head_dim=48), r"head_dim=48 does not divide a.shape\[-1\]=128"),
    (dict(q_keep=torch.ones(2, H, 3, dtype=torch.bool, device=DEV)), r"q_keep has shape \(2, 2, 3\), expected \(1, 2, NQB >= 3\)"),
])
def test_gemm_o_validation(bad, match):
    args = _o_args(**bad)
    with pytest.raises(ValueError, match=match):
        ops.sparse_linear_o(args.pop("a"), args.pop("weight"), args.pop("c"), args.pop("q_keep"), **args)


def test_out_proj_cache_validation():
    args = _o_args()
    with pytest.raises(ValueError, match=r"bias has shape \(7,\), expected \(48,\)"):
        ops.out_proj_cache(args["a"], args["weight"], _rand(7), args["q_keep"], head_dim=64)
    with pytest.raises(ValueError, match="q_keep is on meta"):
        ops.out_proj_cache(args["a"], args["weight"], None, args["q_keep"].to("meta"), head_dim=64)
