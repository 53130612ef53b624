"""Compile kernels for sm_90 on a machine without a GPU (CI, laptops): a developer tool.

    with sm90_target():
        kernel.warmup(*args, grid=grid, **kw)      # compiles for sm_90, launches nothing
    regs, spilled_bytes = resource_usage(compiled)

``sm90_target`` makes triton's active driver a stub that reports an sm_90 target (what
``JITFunction.run`` asks before compiling); ``resource_usage`` reads registers and spilled bytes
(``STACK``) from ``cuobjdump --dump-resource-usage`` of the cubin (triton ships cuobjdump). Used by
``tests/sm90_compile_check.py`` and ``benchmarks/bench_gemm.py --compile-check``.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile

__all__ = ["sm90_target", "resource_usage"]


class _Sm90Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def sm90_target():
    """Within the block, triton compiles for sm_90 whatever the machine has."""
    from triton.runtime.driver import driver
    # The driver in force before (None: not chosen yet; reading ``driver.active`` would create the
    # default one, which fails on a machine without a GPU). Triton 3.6-3.9 keep it in ``_active``.
    prev = getattr(driver, "_active", None)
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        driver._active = prev


def resource_usage(compiled) -> tuple[int, int]:
    """``(registers per thread, spilled bytes per thread)`` of a compiled kernel."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return int(regs), int(stack)


def local_accesses_in_loops(compiled) -> int:
    """Local-memory instructions (``LDL``/``STL``: spills) inside an innermost loop of a compiled kernel's
    SASS: where a spill costs once per iteration of the hot loop (a reduction step, a kv tile).

    A loop is a backward branch and the instructions between its target and it; innermost: it holds no
    other loop. Not counted: the dispatch loops of warp specialisation (they hold the partitions' ``BRX``
    or ``USETMAXREG``: run once per partition) and the out-of-line retry stubs of mbarrier waits that
    ptxas places after the kernel's last ``EXIT`` (they branch back to their wait, across unrelated
    code). Values spilled at a kernel's entry and reloaded at a partition's start or once per output
    tile stay outside every innermost loop."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    end = max(a for a, text in ins if re.search(r"\bEXIT\b", text))

    def inside(lo, hi, pattern):
        return [a for a, text in ins if lo <= a <= hi and re.search(pattern, text)]

    loops = []
    for a, text in ins:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= a <= end:
            lo = int(m.group(1), 16)
            if not inside(lo, a, r"\b(BRX|USETMAXREG)\b"):
                loops.append((lo, a))
    innermost = [(lo, hi) for lo, hi in loops
                 if not any((lo, hi) != (l2, h2) and lo <= l2 and h2 <= hi for l2, h2 in loops)]
    return len({a for lo, hi in innermost for a in inside(lo, hi, r"\b(LDL|STL)\b")})
