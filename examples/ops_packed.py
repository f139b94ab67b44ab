"""The functional ops on packed sequences of different lengths (``cu_seqlens``).

Packs three sequences into one row, runs NSA once through ``nsa.ops.nsa`` and once branch by
branch, then checks both against each sequence run on its own: outputs, selected blocks and
the gradients of q, k and v.

    python examples/ops_packed.py                    # CPU: plain PyTorch, about a second
    python examples/ops_packed.py --device cuda      # the Triton kernels
"""

import argparse

import torch

import nsa

# Small NSA settings so that a few hundred tokens exercise every branch: compressed tokens of
# 16 keys every 8, 4 selected blocks of 16 keys (1 initial + 2 local + 1 by score), a window of 32.
SETTINGS = dict(kernel_size=16, stride=8, block_size=16, num_selected=4, num_initial=1, num_local=2, window_size=32)


def compress(x, cu_seqlens, kernel_size, stride):
    """Mean of every block of ``kernel_size`` positions taken every ``stride``, per sequence,
    packed in sequence order: ``[1, T, H, D] -> [1, Tc, H, D]``. (The layer learns an MLP here;
    any function of the block will do for the ops.)"""
    bounds = cu_seqlens.tolist()
    parts = [x[:, a:b].unfold(1, kernel_size, stride).mean(-1) for a, b in zip(bounds[:-1], bounds[1:])
             if b - a >= kernel_size]
    return torch.cat(parts, 1) if parts else x.new_zeros(1, 0, *x.shape[2:])


def run(q, k, v, gates, cu_seqlens, weight, by_branch=False):
    """Output, selected blocks and the gradients of q, k, v of ``loss = sum(o * weight)``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    s = SETTINGS
    k_cmp = compress(k, cu_seqlens, s["kernel_size"], s["stride"])
    v_cmp = compress(v, cu_seqlens, s["kernel_size"], s["stride"])
    g_cmp, g_slc, g_win = gates
    if by_branch:
        o_cmp, lse = nsa.compressed_attention(q, k_cmp, v_cmp, s["kernel_size"], s["stride"], cu_seqlens=cu_seqlens)
        blocks = nsa.select_blocks(q, k_cmp, lse, s["kernel_size"], s["stride"], s["block_size"], s["num_selected"],
                                   s["num_initial"], s["num_local"], cu_seqlens=cu_seqlens)
        o_slc = nsa.selected_attention(q, k, v, blocks, s["block_size"], cu_seqlens=cu_seqlens)
        o_win = nsa.sliding_window_attention(q, k, v, s["window_size"], cu_seqlens=cu_seqlens)
        o = (g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc + g_win.unsqueeze(-1) * o_win).to(q.dtype)
    else:
        # the same k, v serve the selected and the window branch here; the layer gives each its own
        o, blocks = nsa.nsa(q, k_cmp, v_cmp, k, v, k, v, g_cmp, g_slc, g_win, cu_seqlens=cu_seqlens,
                            return_block_indices=True, **s)
    (o.float() * weight).sum().backward()
    return o.detach(), blocks, q.grad, k.grad, v.grad


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--lens", default="300,77,150", help="comma-separated sequence lengths (default 300,77,150)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of q, k, v and the gates (default float32)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lens = [int(n) for n in args.lens.split(",")]
    torch.manual_seed(args.seed)

    HQ, H, Dk, Dv = 4, 2, 32, 16  # 2 query heads per KV head (GQA); value head dim != key head dim
    T = sum(lens)
    cu_seqlens = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)  # int32 [N + 1]
    q = torch.randn(1, T, HQ, Dk, device=device, dtype=dtype)
    k = torch.randn(1, T, H, Dk, device=device, dtype=dtype)
    v = torch.randn(1, T, H, Dv, device=device, dtype=dtype)
    gates = tuple(torch.rand(1, T, HQ, device=device, dtype=dtype) for _ in range(3))  # [B, T, HQ] each
    weight = torch.randn(1, T, HQ, Dv, device=device)  # the loss: sum(o * weight)
    print(f"packed {len(lens)} sequences of {lens} tokens on {device} ({args.dtype}): q {tuple(q.shape)}, "
          f"k {tuple(k.shape)}, v {tuple(v.shape)}, cu_seqlens {cu_seqlens.tolist()}")

    o, blocks, dq, dk, dv = run(q, k, v, gates, cu_seqlens, weight)
    print(f"nsa.ops.nsa: o {tuple(o.shape)}, selected blocks {tuple(blocks.shape)}; "
          f"the last query of KV head 0 attends blocks {blocks[0, -1, 0].tolist()}")
    # float32 on CPU is plain PyTorch (tight); the kernels' float32 products may use TF32
    tol = 3e-2 if dtype != torch.float32 else 1e-4 if device.type == "cpu" else 1e-2

    # the same computation branch by branch
    o_b, blocks_b, *grads_b = run(q, k, v, gates, cu_seqlens, weight, by_branch=True)
    err = max(rel_err(a, b) for a, b in zip([o_b, *grads_b], [o, dq, dk, dv]))
    same = torch.equal(blocks_b, blocks)
    print(f"branch by branch vs nsa(): output and gradients within {err:.1e}, "
          f"blocks {'equal' if same else 'DIFFERENT'}")
    ok = err <= tol and same

    # each sequence on its own: positions restart at 0 and nothing crosses a boundary, so the
    # packed call's output, blocks and gradients on a sequence's tokens are that sequence's alone
    bounds = cu_seqlens.tolist()
    err, same = 0.0, True
    for a, b in zip(bounds[:-1], bounds[1:]):
        one = torch.tensor([0, b - a], device=device, dtype=torch.int32)
        o1, blocks1, *grads1 = run(q[:, a:b], k[:, a:b], v[:, a:b], tuple(g[:, a:b] for g in gates), one,
                                   weight[:, a:b])
        err = max([err] + [rel_err(x[:, a:b], y) for x, y in zip([o, dq, dk, dv], [o1, *grads1])])
        same &= torch.equal(blocks[:, a:b], blocks1)
    print(f"packed vs each sequence alone: output and gradients within {err:.1e}, "
          f"blocks {'equal' if same else 'DIFFERENT'}")
    ok = ok and err <= tol and same
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
