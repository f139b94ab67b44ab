"""The decoding step over a paged cache (one GPU): the Triton kernels reading pages through the
page table, against the same step on the dense padded cache and against the former paged path
(every page gathered into the dense layout, then the dense kernels), on the same tokens.

    PYTHONPATH=src:benchmarks python3 benchmarks/probe_decode_paged.py [--T 65536] [--B 1,8,64]

The pages of every sequence are a random permutation of the pool (no two neighbours adjacent),
so nothing benefits from the dense layout's contiguity. Per case: ``graph ms`` of one step
replayed from a CUDA graph (median of 50) for each path, and the largest difference of the
paged output from the dense one (bf16: the same kernels in another address order, equal up to
rounding). NSA settings of the paper, HQ=64, H=4, D=128, bf16.
"""

from __future__ import annotations

import torch

from nsa.ops.decode import nsa_decode
from nsa.ops.decode_paged import gather_pages, nsa_decode_paged
from probe_decode_eager import SETTINGS, _graph_ms, batches


def paged_copy(x, block_size=64, stride=16, kernel_size=32, seed=1):
    """The dense step inputs ``x`` as page pools (pages of ``block_size`` tokens in a random order)
    and a page table: ``(pools dict, page_table)``."""
    N, L = x["k_slc"].shape[:2]
    M = L // block_size
    dev = x["k_slc"].device
    g = torch.Generator(device=dev).manual_seed(seed)
    table = torch.randperm(N * M, device=dev, generator=g).to(torch.int32).view(N, M)

    def raw(t):
        pool = t.new_empty(N * M, block_size, *t.shape[2:])
        pool[table.long()] = t.view(N, M, block_size, *t.shape[2:])
        return pool

    def cmp(t):
        # compressed token i at flat index i + kernel_size // stride - 1 of the pages' compressed slots
        cpb, shift = block_size // stride, kernel_size // stride - 1
        flat = t.new_zeros(N, M * cpb, *t.shape[2:])
        flat[:, shift:shift + t.shape[1]] = t[:, :M * cpb - shift]
        pool = t.new_empty(N * M, cpb, *t.shape[2:])
        pool[table.long()] = flat.view(N, M, cpb, *t.shape[2:])
        return pool

    k, v = raw(x["k_slc"]), raw(x["v_slc"])
    pools = dict(k_cmp=cmp(x["k_cmp"]), v_cmp=cmp(x["v_cmp"]), k_slc=k, v_slc=v, k_win=k, v_win=v)
    return pools, table


def main():
    for N, x in batches("decoding step, bf16", "batch   dense ms   paged ms  gathered ms  paged/dense  "
                                               "max |paged - dense|"):
        pools, table = paged_copy(x)
        gates = {k: x[k] for k in ("g_cmp", "g_slc", "g_win")}
        with torch.no_grad():
            def dense():
                return nsa_decode(**x, **SETTINGS)

            def paged():
                return nsa_decode_paged(x["q"], **pools, **gates, page_table=table, seq_lens=x["seq_lens"],
                                        backend="triton", **SETTINGS)

            def gathered():
                # the former GPU path: every page copied into the dense layout on each step
                shift = SETTINGS["kernel_size"] // SETTINGS["stride"] - 1
                kc, vc = (gather_pages(pools[n], table)[:, shift:] for n in ("k_cmp", "v_cmp"))
                ks, vs = gather_pages(pools["k_slc"], table), gather_pages(pools["v_slc"], table)
                return nsa_decode(x["q"], kc, vc, ks, vs, ks, vs, **gates, seq_lens=x["seq_lens"], **SETTINGS)

            err = (paged().float() - dense().float()).abs().max().item()
            t = [_graph_ms(fn) for fn in (dense, paged, gathered)]
        print(f"{N:5d} {t[0]:10.3f} {t[1]:10.3f} {t[2]:12.3f} {t[1] / t[0]:11.2f}x  {err:.3g}", flush=True)


if __name__ == "__main__":
    main()
