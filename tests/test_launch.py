"""The launch cache (``kernels/launch.py``).

* Keys: every property Triton specializes on separates keys, checked against the installed triton's own
  specializer (``native_specialize_impl``), plus hand-picked cases (int 1 / 16 / 17, a view one element
  off, dtype, constexpr, ``True`` vs ``1``).
* The cached path replays exactly the launcher call ``JITFunction.run`` makes (a real ``JITFunction``
  whose normal launch is replaced by a recorder, so this runs without a GPU), and every case the cache
  cannot serve takes the normal path.
* Under the interpreter every launcher takes the normal path; on a GPU, cached launches give the same
  bits as normal ones, also when calls alternate between specializations.
"""

import itertools
import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import REL_TOL, rel_err
from triton.compiler import CompiledKernel
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from flashomni_compile.kernels import attention, gemm_o, gemm_q
from flashomni_compile.kernels import launch as L
from flashomni_compile.kernels.gemm_q import Config

GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fresh_cache():
    L.clear_launch_cache()
    mode = L.set_launch_cache("on")
    yield
    L.clear_launch_cache()
    L.set_launch_cache(mode)


def _key(*args, **kwargs):
    return L.launch_key(args, kwargs)


# ---------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------
def _samples():
    """Argument values of every kind our launchers pass, chosen to hit each of Triton's rules."""
    buf = torch.zeros(256, dtype=torch.float16)
    b32 = torch.zeros(64, 64, dtype=torch.float32)
    b16 = torch.zeros(64, 64, dtype=torch.bfloat16)
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, 2**31 + 16, -2**31, -2**31 - 16, 2**32,
            2**63 - 1, 2**63]
    tensors = [buf, buf[1:], buf[8:], buf[9:], buf.to(torch.bfloat16), buf.float(), buf.to(torch.uint8),
               buf.bool(), buf.int()]
    descs = [TensorDescriptor.from_tensor(b16, [16, 32]), TensorDescriptor.from_tensor(b16, [32, 32]),
             TensorDescriptor.from_tensor(b32, [16, 32]), TensorDescriptor.from_tensor(b16[:32], [16, 32])]
    from flashomni_compile.kernels.gluon_hopper import AVAILABLE, GluonDescriptor, gl
    if AVAILABLE:   # Gluon descriptors: block shape, dtype and shared layout (swizzle) each specialize
        lay = gl.NVMMASharedLayout.get_default_for([16, 32], gl.bfloat16)
        lay32 = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2)
        descs += [GluonDescriptor.from_tensor(b16, [16, 32], lay), GluonDescriptor.from_tensor(b16[:32], [16, 32], lay),
                  GluonDescriptor.from_tensor(b16, [32, 32], gl.NVMMASharedLayout.get_default_for([32, 32], gl.bfloat16)),
                  GluonDescriptor.from_tensor(b16, [16, 32], lay32),
                  GluonDescriptor.from_tensor(b32, [16, 32], gl.NVMMASharedLayout.get_default_for([16, 32], gl.float32))]
    return ints + tensors + descs + [0.5, 1.0, 1e300, True, False, None]


def test_key_is_at_least_as_fine_as_triton_specialization():
    """Whenever the installed triton specializes two arguments differently, their keys differ."""
    spec_mod = pytest.importorskip("triton._C.libtriton")
    if not hasattr(spec_mod, "native_specialize_impl"):
        pytest.skip("this triton has no native_specialize_impl to compare with")
    from triton.backends.compiler import BaseBackend

    def spec(a):
        return spec_mod.native_specialize_impl(BaseBackend, a, False, True, True)

    values = _samples()
    checked = 0
    for a, b in itertools.combinations(values, 2):
        if spec(a) != spec(b):
            checked += 1
            assert _key(a) != _key(b), f"Triton specializes {spec(a)} vs {spec(b)}, the key does not tell them apart"
    assert checked > 300   # the samples span many specializations (597 pairs on triton 3.6-3.9)


def test_key_int_rules():
    keys = [_key(7, s) for s in (1, 16, 17, 2**31)]
    assert len(set(keys)) == 4
    assert _key(7, 17) == _key(7, int("17"))           # equal values: one entry, whatever the object
    assert _key(7, True) != _key(7, 1)                 # bool is u1, 1 is a constant to Triton
    assert _key(7, 1.0) != _key(7, 1)


def test_key_tensor_rules():
    buf = torch.zeros(64, dtype=torch.float16)
    assert _key(buf) != _key(buf[1:])                  # a view one element (2 bytes) off: not 16-byte aligned
    assert _key(buf) == _key(buf[8:])                  # 16 bytes off: aligned, same specialization
    assert _key(buf[1:]) == _key(buf[3:])
    assert _key(buf) != _key(buf.to(torch.bfloat16))
    assert _key(buf, 0.5) == _key(buf.clone(), 0.25)   # floats and tensor contents never specialize


def test_key_keywords():
    x = torch.zeros(16)
    assert _key(x, BLOCK=32, num_warps=4) != _key(x, BLOCK=64, num_warps=4)
    assert _key(x, BLOCK=32, num_warps=4) != _key(x, BLOCK=32, num_warps=8)
    assert _key(x, FLAG=True) != _key(x, FLAG=1)
    assert _key(x, A=1, B=2) != _key(x, B=1, A=2)
    assert _key(x, A=1, B=2) == _key(torch.ones(16), A=1, B=2)
    assert _key(x, OTHER=x) is None                    # a tensor by keyword: left to Triton
    assert _key(x, (1, 2)) is None                     # tuple arguments: left to Triton


def test_host_int_helpers_match_triton():
    for n in list(range(0, 600)) + [2**31 - 1, 2**31, 2**40 + 3]:
        assert L.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128):
            assert L.cdiv(n, d) == triton.cdiv(n, d), (n, d)


# ---------------------------------------------------------------------------------------------------
# The cached path against a recorded launch (no GPU needed)
# ---------------------------------------------------------------------------------------------------
def _toy(X, n, BLOCK: tl.constexpr, stride):   # the constexpr sits mid-signature on purpose
    pass


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _compiled(recorder):
    ck = object.__new__(CompiledKernel)   # no binary: only what the cached path reads
    ck._run, ck.function, ck.packed_metadata, ck.module = recorder, "function-handle", ("packed",), None
    return ck


@pytest.fixture
def toy(monkeypatch):
    """A real JITFunction whose normal launch (``JITFunction.run``) records and returns a fake compiled
    kernel; device 0, stream 1234."""
    fn = JITFunction(_toy)
    rec = _Recorder()
    state = {"normal": [], "kernel": _compiled(rec)}

    def normal_run(*args, grid, warmup, **kwargs):
        state["normal"].append((grid, args, kwargs))
        return state["kernel"]

    monkeypatch.setattr(fn, "run", normal_run)
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    monkeypatch.setattr(L, "_current_device", lambda: 0)
    monkeypatch.setattr(L, "_current_stream", lambda device: 1234)
    return fn, rec, state


def test_cached_path_replays_the_launcher_call(toy):
    fn, rec, state = toy
    x = torch.zeros(32)
    L.launch(fn, (3,), x, 17, BLOCK=32, stride=16, num_warps=4)
    assert len(state["normal"]) == 1 and not rec.calls
    L.launch(fn, (3,), x, 17, BLOCK=32, stride=16, num_warps=4)
    assert len(state["normal"]) == 1
    # JITFunction.run's call: grid padded to 3-D, stream, function, packed metadata, no launch metadata
    # and no hooks (the chains are empty), then every parameter in signature order, constexpr included.
    assert rec.calls == [(3, 1, 1, 1234, "function-handle", ("packed",), None, None, None, x, 17, 32, 16)]
    # Same call with the keywords in the other order: a new layout, then the same signature order.
    L.launch(fn, (3, 2), x, 17, stride=16, BLOCK=32, num_warps=4)
    L.launch(fn, (3, 2), x, 17, stride=16, BLOCK=32, num_warps=4)
    assert rec.calls[-1][:3] == (3, 2, 1) and rec.calls[-1][9:] == (x, 17, 32, 16)
    st = L.launch_stats()["_toy"]
    assert (st["hits"], st["misses"], st["fallbacks"], st["entries"]) == (2, 2, 0, 2)


@pytest.mark.parametrize("change", ["stride 16->17", "stride 16->1", "unaligned x", "dtype", "constexpr",
                                    "num_warps", "device"])
def test_specialization_change_misses(toy, monkeypatch, change):
    fn, rec, state = toy
    buf = torch.zeros(64)
    args, kw = [buf[:32], 17], dict(BLOCK=32, stride=16, num_warps=4)
    L.launch(fn, (1,), *args, **kw)
    if change == "stride 16->17":
        kw["stride"] = 17
    elif change == "stride 16->1":
        kw["stride"] = 1
    elif change == "unaligned x":
        args[0] = buf[1:33]
    elif change == "dtype":
        args[0] = buf[:32].half()
    elif change == "constexpr":
        kw["BLOCK"] = 64
    elif change == "num_warps":
        kw["num_warps"] = 8
    else:
        monkeypatch.setattr(L, "_current_device", lambda: 1)
    L.launch(fn, (1,), *args, **kw)
    assert len(state["normal"]) == 2 and not rec.calls


def test_normal_path_when_the_cache_cannot_serve(toy, monkeypatch):
    fn, rec, state = toy
    x = torch.zeros(32)

    def call(grid=(1,)):
        L.launch(fn, grid, x, 17, BLOCK=32, stride=16)

    call()
    call()
    assert len(rec.calls) == 1 and len(state["normal"]) == 1
    hook = lambda metadata: None  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)   # e.g. the profiler
    try:
        call()
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    call(grid=lambda meta: (1,))                        # callable grid
    L.set_launch_cache("off")
    call()
    L.set_launch_cache("on")
    fn.pre_run_hooks.append(lambda *a, **k: None)
    call()
    fn.pre_run_hooks.clear()
    g = {"G": 2}
    monkeypatch.setattr(fn, "used_global_vals", {("G", id(g)): (1, g)})   # a global changed since compile
    call()
    monkeypatch.setattr(fn, "used_global_vals", {})
    assert len(state["normal"]) == 6 and len(rec.calls) == 1
    assert L.launch_stats()["_toy"]["fallbacks"] == 5
    call()
    assert len(rec.calls) == 2                          # and back on the cached path


def test_verify_mode_catches_a_different_kernel(toy):
    fn, rec, state = toy
    x = torch.zeros(32)
    L.set_launch_cache("verify")
    L.launch(fn, (1,), x, 17, BLOCK=32, stride=16)
    L.launch(fn, (1,), x, 17, BLOCK=32, stride=16)     # normal launch, same kernel: fine
    assert len(state["normal"]) == 2 and not rec.calls
    state["kernel"] = _compiled(rec)                   # Triton now picks another kernel for this key
    with pytest.raises(RuntimeError, match="launch cache"):
        L.launch(fn, (1,), x, 17, BLOCK=32, stride=16)


def test_set_launch_cache_rejects_unknown_modes():
    with pytest.raises(ValueError, match="verify"):
        L.set_launch_cache("fast")


# ---------------------------------------------------------------------------------------------------
# Our launchers
# ---------------------------------------------------------------------------------------------------
def _run_all_launchers(x, w, wo, c, q, k, v, keep, D, cfg):
    H = keep.shape[1]
    return [gemm_q.sparse_linear_q_triton(x, w, None, keep, D, 0, 16, H * D, config=cfg),
            gemm_o.sparse_linear_o_triton(x, wo, c, keep, None, None, D, 0, 16, config=cfg),
            gemm_o.out_proj_cache_triton(x, wo, None, keep, D, 0, 16, config=cfg),
            *attention.sparse_attention_triton(q, k, v, None, None, None, None, None, D ** -0.5, 16, 16)]


def _inputs(dev, dtype=torch.float32, B=1, H=2, N=40, D=16, offset=0):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):   # a view ``offset`` elements into its buffer: offset 1 is not 16-byte aligned
        buf = torch.randn(math.prod(shape) + offset, generator=g)
        return buf.to(dtype)[offset:].view(*shape).to(dev)

    q, k, v = (rnd(B, N, H, D).transpose(1, 2) for _ in range(3))
    keep = (torch.rand(B, H, (N + 15) // 16, generator=g) < 0.6).to(dev)
    return rnd(B, N, H * D), rnd(3 * H * D, H * D), rnd(H * D, H * D), rnd(B, N, H * D), q, k, v, keep, D


@pytest.mark.skipif(GPU, reason="the interpreter's fallback is what runs without a GPU")
def test_interpreter_takes_the_normal_path():
    x, w, wo, c, q, k, v, keep, D = _inputs("cpu")
    outs = _run_all_launchers(x, w, wo, c, q, k, v, keep, D, Config(32, 32, 32, 2, 4, 1, False))
    st = L.launch_stats()
    assert set(st) == {"_gemm_q_kernel", "_gemm_o_kernel", "_sparse_attn_fwd"}   # every launcher goes through
    for name, s in st.items():
        assert s["reason"] == "interpreter" and s["hits"] == s["misses"] == s["entries"] == 0, (name, s)
    assert st["_gemm_o_kernel"]["fallbacks"] == 2 and st["_gemm_q_kernel"]["fallbacks"] == 1
    ref = gemm_q.sparse_linear_q_ref(x, w, None, keep, D, 0, 16, keep.shape[1] * D)
    assert rel_err(outs[0], ref) < REL_TOL[torch.float32]


@pytest.mark.skipif(not GPU, reason="compiled launches need a GPU")
@pytest.mark.parametrize("cfg", [Config(32, 32, 32, 2, 4, 1, False), Config(64, 64, 32, 2, 4, 1, True)])  # ptr, TMA
def test_cached_launches_match_normal_launches(cfg):
    """Calls alternate between inputs that differ only in alignment (a view one element off: also no
    TMA for the GEMMs then) and dtype; every cached launch must give the bits of a normal launch of the
    same call. A key blind to alignment would run the aligned kernel on the unaligned views."""
    variants = [_inputs("cuda", dtype, offset=off) for dtype in (torch.float16, torch.bfloat16) for off in (0, 1)]
    L.set_launch_cache("off")
    want = [_run_all_launchers(*inp, cfg) for inp in variants]
    L.set_launch_cache("on")
    for _ in range(3):
        for inp, ref in zip(variants, want):
            got = _run_all_launchers(*inp, cfg)
            for a, b in zip(got, ref):
                assert torch.equal(a, b)
    st = L.launch_stats()
    assert all(s["hits"] > 0 and s["reason"] == "" for s in st.values()), st


HOPPER = GPU and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernels need a Hopper GPU")
def test_gluon_launches_are_cached_and_match_normal_launches():
    """The Gluon attention and GEMM-O kernels (descriptor arguments with shared layouts) take the cached
    path from their second call, with the bits of a normal launch, for both 2-byte dtypes."""
    from flashomni_compile.kernels import attention_sm90, gemm_o_sm90

    if not attention_sm90.AVAILABLE:
        pytest.skip("this triton has no Gluon")
    g = torch.Generator("cuda").manual_seed(0)
    N, D, H = attention.GLUON_MIN_NKV, 128, 2

    def calls(dtype):
        q, k, v = (torch.randn(1, N, H, D, generator=g, device="cuda").to(dtype).transpose(1, 2) for _ in range(3))
        a = torch.randn(1, 512, H * D, generator=g, device="cuda").to(dtype)
        w = torch.randn(256, H * D, generator=g, device="cuda").to(dtype)
        c = torch.randn(1, 512, 256, generator=g, device="cuda").to(dtype)
        keep = torch.rand(1, H, 4, generator=g, device="cuda") < 0.5
        return lambda: (attention.sparse_attention_triton(q, k, v, None, None, None, None, None, D ** -0.5, 128, 128)[0],
                        gemm_o.sparse_linear_o_triton(a, w, c, keep, None, None, D, 0, 128))

    runs = [calls(dt) for dt in (torch.float16, torch.bfloat16)]
    L.set_launch_cache("off")
    want = [run() for run in runs]
    names = (attention_sm90._sparse_attn_fwd_sm90.__name__, gemm_o_sm90._gemm_o_sm90_kernel.__name__)
    before = {n: L.launch_stats()[n]["fallbacks"] for n in names}   # "off" counts its launches as fallbacks
    L.set_launch_cache("on")
    for _ in range(3):
        for run, ref in zip(runs, want):
            for a, b in zip(run(), ref):
                assert torch.equal(a, b)
    st = L.launch_stats()
    for n in names:
        assert st[n]["hits"] > 0 and st[n]["fallbacks"] == before[n] and st[n]["reason"] == "", st
