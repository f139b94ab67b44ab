"""Functional NSA ops. Layout ``[B, T, H, D]``; packed sequences through ``cu_seqlens``."""

from .api import (
    compressed_attention,
    nsa,
    rope,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)
from .decode import nsa_decode

__all__ = [
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "nsa",
    "nsa_decode",
    "rope",
]
