"""Context parallelism (nsa.parallel) on CPU: P = 2 and 4 gloo processes give the outputs and every
gradient of one process running the whole sequences, with the reference and the Triton kernels
(interpreter), dense batches of odd length and packed documents crossing rank boundaries."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nsa.layer import NativeSparseAttention, NSAConfig
from nsa.parallel import ContextParallel, SequenceShards

from .helpers import assert_close


def _config(backend, shared_kv=False):
    return NSAConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=6, kernel_size=8, stride=4,
                     block_size=8, num_selected=3, num_initial=1, num_local=1, window_size=9, backend=backend,
                     shared_kv=shared_kv)


def _worker(rank, P, init, case):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=P)
    try:
        _compare(rank, P, **case)
    finally:
        dist.destroy_process_group()


def _compare(rank, P, backend, dtype, B, T, lens, shared_kv, balanced, tol):
    torch.manual_seed(0)
    layer = NativeSparseAttention(_config(backend, shared_kv)).to(dtype)
    with torch.no_grad():
        for pe in (layer.compress_k.pos_emb, layer.compress_v.pos_emb):
            pe.normal_(std=0.5)
    x = torch.randn(B, T, 32, dtype=dtype)
    w = torch.randn(B, T, 32, dtype=dtype)  # the upstream gradient
    cu = None if lens is None else torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    # one process, the whole sequences
    xw = x.clone().requires_grad_(True)
    y = layer(xw, cu_seqlens=cu)
    y.backward(w)
    want = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    # this rank's share
    shards = SequenceShards(T, P, cu_seqlens=cu, balanced=balanced)
    cp = ContextParallel(shards, batch=B)
    xl = shards.shard(x, rank).requires_grad_(True)
    yl = layer(xl, context=cp)
    assert_close(f"rank {rank} output", shards.shard(y.detach(), rank), yl, tol)
    yl.backward(shards.shard(w, rank))
    assert_close(f"rank {rank} dx", shards.shard(xw.grad, rank), xl.grad, tol)
    for n, p in layer.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)  # the data-parallel sum over the shards
        assert_close(f"rank {rank} d{n}", want[n], g, tol)


CASES = {
    "dense-odd-P2-reference": dict(backend="reference", dtype=torch.float64, B=2, T=45, lens=None, shared_kv=False,
                                   balanced=True, tol=1e-10, P=2),
    "packed-crossing-P4-reference": dict(backend="reference", dtype=torch.float64, B=1, T=56, lens=(17, 30, 9),
                                         shared_kv=False, balanced=True, tol=1e-10, P=4),
    "packed-contiguous-shared-P2-torch": dict(backend="torch", dtype=torch.float64, B=1, T=41, lens=(5, 36),
                                              shared_kv=True, balanced=False, tol=1e-10, P=2),
    "dense-odd-P2-triton": dict(backend="triton", dtype=torch.float32, B=2, T=37, lens=None, shared_kv=False,
                                balanced=True, tol=2e-5, P=2),
    "packed-crossing-P4-triton": dict(backend="triton", dtype=torch.float32, B=1, T=50, lens=(13, 29, 8),
                                      shared_kv=False, balanced=True, tol=2e-5, P=4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_equals_one_process(name):
    case = dict(CASES[name])
    P = case.pop("P")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(P, f"file://{os.path.join(d, 'init')}", case), nprocs=P, join=True)


def test_shards_cover_every_position_once():
    for T, P, balanced in [(45, 2, True), (56, 4, True), (7, 3, False), (8, 4, True)]:
        sh = SequenceShards(T, P, balanced=balanced)
        pos = torch.cat([sh.local_positions(r) for r in range(P)])
        assert sorted(pos.tolist()) == list(range(T))
        x = torch.randn(2, T, 3)
        assert torch.equal(sh.unshard([sh.shard(x, r) for r in range(P)]), x)
    sh = SequenceShards(8, 2)
    assert sh.chunks == [[(0, 2), (6, 8)], [(2, 4), (4, 6)]]  # rank r: chunks r and 2P-1-r
    assert sh.doc_positions(1).tolist() == [2, 3, 4, 5]
    sh = SequenceShards(8, 2, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))
    assert sh.doc_positions(0).tolist() == [0, 1, 3, 4]  # positions 0, 1 (doc 0) and 6, 7 (doc 1 from 3)


@pytest.mark.parametrize("kw,match", [
    (dict(length=3, world_size=2), "cannot be cut into 4 non-empty chunks"),
    (dict(length=0, world_size=1), "length: expected an int >= 1"),
    (dict(length=8, world_size=0), "world_size: expected an int >= 1"),
    (dict(length=8, world_size=2, cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32)), "cu_seqlens: expected"),
    (dict(length=8, world_size=2, cu_seqlens=torch.tensor([0, 8])), "cu_seqlens: expected an int32"),
])
def test_bad_shards(kw, match):
    with pytest.raises(ValueError, match=match):
        SequenceShards(**kw)


def test_context_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        ContextParallel(SequenceShards(8, 2))


def _model_worker(rank, P, init, lens):
    from nsa.model import LanguageModel, ModelConfig

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=P)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          intermediate_size=48, max_seq_len=64, kernel_size=8, stride=4, block_size=8, num_selected=3,
                          num_initial=1, num_local=1, window_size=9, backend="reference")
        model = LanguageModel(cfg).double()
        T = sum(lens)
        ids = torch.randint(0, 50, (1, T))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        out = model(ids, cu_seqlens=cu, labels=ids, return_logits=True)
        out.loss.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        shards = SequenceShards(T, P, cu_seqlens=cu)
        cp = ContextParallel(shards)
        part = model(shards.shard(ids, rank), labels=ids, return_logits=True, context=cp)
        assert_close(f"rank {rank} logits", shards.shard(out.logits.detach(), rank), part.logits, 1e-10)
        part.loss.backward()
        loss = part.loss.detach().clone()
        dist.all_reduce(loss)
        assert_close("loss", out.loss.detach(), loss, 1e-12)
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            assert_close(f"rank {rank} d{n}", want[n], g, 1e-10)
    finally:
        dist.destroy_process_group()


def test_model_context_parallel_equals_one_process():
    """The whole model (2 NSA blocks, loss over packed documents crossing ranks), P = 2: logits,
    the loss (the ranks' parts summed) and every parameter gradient (summed over the ranks)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_model_worker, args=(2, f"file://{os.path.join(d, 'init')}", (11, 30, 6)), nprocs=2, join=True)
