"""Sequence bookkeeping helpers against their definitions."""

import math

import pytest
import torch

from nsa.ops.utils import compressed_cu_seqlens, num_compressed, prepare_chunk_indices


@pytest.mark.parametrize("lens", [[64], [1, 36, 100], [5, 1, 1, 293]], ids=["one", "three", "ones"])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_prepare_chunk_indices(lens, chunk):
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    want = [(n, c) for n, L in enumerate(lens) for c in range(math.ceil(L / chunk))]
    got = prepare_chunk_indices(cu, chunk)
    assert got.dtype == torch.int32 and got.tolist() == [list(r) for r in want]


def test_compressed_cu_seqlens():
    lens = [1, 31, 32, 33, 48, 200]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    want = [0] + list(torch.tensor([num_compressed(L, 32, 16) for L in lens]).cumsum(0).tolist())
    assert compressed_cu_seqlens(cu, 32, 16).tolist() == want


def test_split_dim():
    """Head dims as two power-of-two tiles where that is narrower than one padded tile."""
    from nsa.ops.triton_utils import split_dim
    want = {16: (16, 0), 24: (32, 0), 40: (32, 16), 48: (32, 16), 64: (64, 0), 80: (64, 16), 96: (64, 32),
            112: (128, 0), 128: (128, 0), 160: (128, 32), 192: (128, 64), 200: (256, 0), 256: (256, 0)}
    for n, ab in want.items():
        assert split_dim(n) == ab, n
        a, b = ab
        assert a + b >= n and (b == 0 or a < n)


def test_head_tiles_setting(monkeypatch):
    """SPLIT_HEAD_DIMS off: one padded tile; a value that is not a bool is refused by name."""
    from nsa.ops import triton_utils
    assert triton_utils.head_tiles(192) == (128, 64)
    monkeypatch.setattr(triton_utils, "SPLIT_HEAD_DIMS", False)
    assert triton_utils.head_tiles(192) == (256, 0) and triton_utils.head_tiles(128) == (128, 0)
    monkeypatch.setattr(triton_utils, "SPLIT_HEAD_DIMS", "yes")
    with pytest.raises(ValueError, match="SPLIT_HEAD_DIMS"):
        triton_utils.head_tiles(192)
