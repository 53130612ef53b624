"""flashomni-compile: a torch.compile backend for sparse attention in diffusion transformers.

``torch.compile(model, backend="flashomni")`` works once the package is installed (entry point).
Importing this package loads neither diffusers nor CUDA state.
"""

from .config import FlashOmniConfig
from .explain import ExplainReport, explain
from .kernels.ops import out_proj_cache, sparse_attention, sparse_linear_o, sparse_linear_q
from .runtime.controller import StepCallback, clear_step, set_step, step_callback
from .runtime.engine import reset as reset_runtime
from .runtime.engine import set_runtime_options
from .runtime.hooks import clear_symbol_hooks, register_symbol_hook
from .runtime.options import RuntimeOptions
from .runtime.policies import (DensePolicy, FlashOmniPolicy, LayerCachePolicy, PolicyContext, PooledQKPolicy,
                               QCachePolicy, WindowPolicy, get_policy, policy_names, register_policy)
from .runtime.stats import reset_stats, site_stats, stats_report
from .symbols import SparseSymbols

__all__ = [
    # kernels
    "SparseSymbols", "sparse_attention", "sparse_linear_q", "out_proj_cache", "sparse_linear_o",
    # backend
    "FlashOmniConfig", "explain", "ExplainReport",
    # runtime
    "RuntimeOptions", "set_step", "clear_step", "StepCallback", "step_callback", "reset_runtime",
    "set_runtime_options",
    "get_policy", "policy_names", "register_policy", "PolicyContext", "DensePolicy", "WindowPolicy",
    "PooledQKPolicy", "QCachePolicy", "LayerCachePolicy", "FlashOmniPolicy",
    "register_symbol_hook", "clear_symbol_hooks", "reset_stats", "site_stats", "stats_report",
]
__version__ = "0.1.0"
