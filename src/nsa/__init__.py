"""nsa: Native Sparse Attention (DeepSeek, arXiv 2502.11089) for PyTorch."""

from . import ops
from .cache import NSACache
from .layer import NativeSparseAttention, NSAConfig
from .paged_cache import CacheCapacityError, PagedNSACache
from .ops import compressed_attention, nsa, select_blocks, selected_attention, sliding_window_attention

__version__ = "0.1.0"

__all__ = [
    "ops",
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "nsa",
    "NSAConfig",
    "NativeSparseAttention",
    "NSACache",
    "PagedNSACache",
    "CacheCapacityError",
]
