"""Helpers shared by the ``bench_*.py`` scripts: run header, timing, correctness check, table, JSON.

Every result file has the shape ``{"header": header(), "records": [...]}``; :func:`write_results` writes
it to the path the script names and, when the environment variable ``OUT`` is set (the lent GPU
machine), to ``$OUT/<same file name>`` too.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """``HEAD``'s sha, with ``-dirty`` when tracked files differ from it (``unknown`` outside git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_hash() -> str:
    """sha1 over the package and benchmark sources (path + bytes): identifies the code that ran where the
    tree travels without ``.git`` (the lent GPU machine); recompute it at a commit to match a result."""
    import hashlib

    h = hashlib.sha1()
    for path in sorted([*REPO.glob("flashomni_compile/**/*.py"), *REPO.glob("benchmarks/*.py")]):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def header(command: Optional[str] = None) -> dict:
    """Where and how the numbers were taken: device, versions, git sha, command line, UTC date."""
    import triton

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        cap = torch.cuda.get_device_capability()
        device += f" (sm_{cap[0]}{cap[1]}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs)"
    else:
        device = "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": command or " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": os.environ.get("GIT_SHA") or git_sha(),  # GIT_SHA: where the tree travels without .git
        "source_hash": source_hash(),
    }


def device_and_dtype(parser, tiny: bool) -> tuple[str, torch.dtype]:
    """``("cuda", bfloat16)`` on a GPU; ``--tiny`` runs toy sizes in float32, on CPU too."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        parser.error("full sizes need a GPU; use --tiny on CPU")
    return device, torch.float32 if tiny else torch.bfloat16


def results_path(out: Optional[str], stem: str, tiny: bool) -> str:
    """``--out`` if given, else ``benchmarks/results/<stem>_h100.json`` (``_tiny_cpu`` for toy runs)."""
    return out or f"benchmarks/results/{stem}_{'tiny_cpu' if tiny else 'h100'}.json"


def bench_ms(fn: Callable[[], object], warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median milliseconds of ``fn()`` (``triton.testing.do_bench``: CUDA events, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_ms(fn, n: int = 10, reps: int = 5) -> float:
    """Median device milliseconds of ``fn()`` from CUDA-graph replays, L2 flushed before each call.

    One graph holds ``n x (flush; fn)``, another ``n x flush``; the difference over ``n`` is fn's time.
    Graphs take the host out: our launchers cost tens of microseconds of Python each (``host_us``),
    as much as a short kernel (GEMMs at M = 4608, attention at N = 4608 and low density), which eager
    timing would report instead. Step graphs (``cuda_graphs=True``) run the kernels this way."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def capture(with_fn: bool):
        def body():
            for _ in range(n):
                flush.zero_()
                if with_fn:
                    fn()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        return g

    def replay_ms(g) -> float:
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    g1, g0 = capture(True), capture(False)
    t = (replay_ms(g1) - replay_ms(g0)) / n
    del g1, g0, flush
    return t


def host_us(fn, calls: int = 50) -> float:
    """Host microseconds per call (enqueue only: the device runs behind)."""
    import time
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return t


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` if ``out`` holds NaN/inf."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Fixed-width text table of ``rows`` (dicts) over ``columns``; floats get 3 significant digits."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_results(path: str | os.PathLike, head: dict, records: Iterable[dict]) -> list[Path]:
    """Write ``{"header", "records"}`` JSON to ``path`` (relative paths: from the repo root) and to
    ``$OUT/<name>`` when ``OUT`` is set. Returns the paths written."""
    payload = json.dumps({"header": head, "records": list(records)}, indent=1)
    path = Path(path)
    targets = [path if path.is_absolute() else REPO / path]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / path.name)
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_text(payload + "\n")
    return targets


def runtime_density() -> dict:
    """Attention density actually used, from the runtime's per-site statistics.

    Per site: update steps count as dense; dispatch steps as ``kv_density``, the fraction of (query, key)
    pairs computed (cached q-blocks count 0), averaged over the dispatch steps. ``density``, ``q_density``
    and ``kv_density`` are means over the model's layers (each site weighted by its layers: Flux has 19
    joint and 38 single-stream layers); no statistics (the dense policy keeps none) means 1.0.
    """
    import flashomni_compile

    rows = [s for s in flashomni_compile.site_stats() if s.updates + s.dispatches]
    if not rows:
        return {"density": 1.0, "density_source": "dense (no statistics)"}
    per_site, qd, kd, w = [], [], [], []
    for s in rows:
        q = 1.0 if s.q_density is None else s.q_density
        kv = 1.0 if s.kv_density is None else s.kv_density
        per_site.append((s.updates + s.dispatches * kv) / (s.updates + s.dispatches))
        qd.append(q)
        kd.append(kv)
        w.append(s.layers)
    n = sum(w)
    mean = lambda xs: sum(x * k for x, k in zip(xs, w)) / n  # noqa: E731
    return {"density": mean(per_site), "density_source": "runtime", "q_density": mean(qd),
            "kv_density": mean(kd), "dispatch_fraction": sum(s.dispatches for s in rows) /
            sum(s.updates + s.dispatches for s in rows)}
