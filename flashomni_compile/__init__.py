"""flashomni-compile: a torch.compile backend for sparse attention in diffusion transformers.

``torch.compile(model, backend="flashomni")`` works once the package is installed (entry point).
"""

from .config import FlashOmniConfig, register_policy
from .explain import ExplainReport, explain
from .kernels.ops import out_proj_cache, sparse_attention, sparse_linear_o, sparse_linear_q
from .symbols import SparseSymbols

__all__ = ["SparseSymbols", "sparse_attention", "sparse_linear_q", "out_proj_cache", "sparse_linear_o",
           "FlashOmniConfig", "register_policy", "explain", "ExplainReport"]
__version__ = "0.1.0"
