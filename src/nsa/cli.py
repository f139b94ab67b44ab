"""The ``nsa`` command: ``nsa demo`` (a quick tour on CPU or GPU) and ``nsa bench`` (benchmarks)."""

from __future__ import annotations

import argparse
import platform
import sys
import time

from ._cli_utils import add_device_option, add_dtype_option, resolve_device, torch_dtype

__all__ = ["main", "keys_per_query", "resolve_device"]


def keys_per_query(seq_len, kernel_size=32, stride=16, block_size=64, num_selected=16, window_size=512,
                   whole_blocks=False):
    """Keys each query attends to, averaged over the causal positions ``t < seq_len``.

    compressed: visible compressed tokens (``i*stride + kernel_size - 1 <= t``); selected:
    ``min(num_selected, t // block_size + 1)`` blocks, keys ``s <= t`` in them (the query's own
    block is partial), or every key of every chosen block with ``whole_blocks`` (what a kernel
    loads; the convention of the cost table in NSA.md); window: ``min(t + 1, window_size)``;
    full: ``t + 1``. Returns a dict of floats with keys cmp, slc, win, nsa, full.
    """
    import torch

    t = torch.arange(seq_len, dtype=torch.float64)
    cmp = torch.where(t >= kernel_size - 1, torch.div(t - kernel_size + 1, stride, rounding_mode="floor") + 1, 0)
    n_blk = torch.clamp(torch.div(t, block_size, rounding_mode="floor") + 1, max=num_selected)
    own = block_size if whole_blocks else torch.remainder(t, block_size) + 1
    slc = (n_blk - 1) * block_size + own
    win = torch.clamp(t + 1, max=window_size)
    out = {"cmp": cmp.mean().item(), "slc": slc.mean().item(), "win": win.mean().item(),
           "full": (t + 1).mean().item()}
    out["nsa"] = out["cmp"] + out["slc"] + out["win"]
    return out


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _demo(args) -> int:
    import torch

    import nsa
    from nsa.layer import NativeSparseAttention, NSAConfig

    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype)
    T, steps = args.tokens, args.decode_steps
    if T < 2 or not 1 <= steps < T:
        print("nsa demo: need --tokens >= 2 and 1 <= --decode-steps < --tokens", file=sys.stderr)
        return 2
    cfg = NSAConfig.preset("small", hidden_size=args.hidden, num_heads=args.heads, num_kv_heads=args.kv_heads,
                           head_dim=args.head_dim, backend=args.backend)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"nsa {nsa.__version__} | torch {torch.__version__} | triton {triton_version}")
    print(f"device: {_device_name(device)} | dtype {args.dtype} | backend {args.backend or 'auto'}")
    print(f"layer: hidden {cfg.hidden_size}, {cfg.num_heads} query heads, {cfg.num_kv_heads} KV heads, "
          f"head dim {cfg.head_dim}, compression {cfg.compression} l={cfg.kernel_size} d={cfg.stride}, "
          f"selection l'={cfg.block_size} n={cfg.num_selected}, window {cfg.window_size}")

    torch.manual_seed(args.seed)
    layer = NativeSparseAttention(cfg).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in layer.parameters())
    x = torch.randn(1, T, cfg.hidden_size, device=device, dtype=dtype)
    print(f"\n1. forward + backward, batch 1, {T} tokens ({n_params / 1e6:.2f}M parameters)")
    _sync(device)
    t0 = time.perf_counter()
    y = layer(x)
    _sync(device)
    t1 = time.perf_counter()
    y.float().square().mean().backward()
    _sync(device)
    t2 = time.perf_counter()
    finite = all(torch.isfinite(p.grad).all() for p in layer.parameters())
    print(f"   forward {1e3 * (t1 - t0):9.1f} ms   backward {1e3 * (t2 - t1):9.1f} ms   "
          f"gradients finite: {'yes' if finite else 'NO'}")

    print(f"\n2. prefill {T - steps} tokens, then decode {steps} tokens one by one")
    with torch.no_grad():
        cache = layer.new_cache()
        _sync(device)
        t0 = time.perf_counter()
        layer(x[:, :T - steps], cache=cache)
        _sync(device)
        t1 = time.perf_counter()
        out = [layer(x[:, t:t + 1], cache=cache) for t in range(T - steps, T)]
        _sync(device)
        t2 = time.perf_counter()
    dec = torch.cat(out, 1).double()
    ref = y.detach()[:, T - steps:].double()
    diff = (dec - ref).abs().max().item()
    rel = ((dec - ref).norm() / ref.norm()).item()
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    match = rel <= tol
    print(f"   prefill {1e3 * (t1 - t0):9.1f} ms   decode {1e3 * (t2 - t1) / steps:7.2f} ms/token")
    print(f"   decoded vs full forward: max |diff| {diff:.2e}, relative {rel:.2e} "
          f"-> {'match' if match else 'MISMATCH'} (tolerance {tol:.0e})")

    k = keys_per_query(T, cfg.kernel_size, cfg.stride, cfg.block_size, cfg.num_selected, cfg.window_size)
    print(f"\n3. keys attended per query, average over t < {T} (this layer's settings)")
    print(f"   {'compressed':<14}{k['cmp']:10.1f}")
    print(f"   {'selected':<14}{k['slc']:10.1f}")
    print(f"   {'window':<14}{k['win']:10.1f}")
    print(f"   {'NSA total':<14}{k['nsa']:10.1f}")
    print(f"   {'full causal':<14}{k['full']:10.1f}   full / NSA = {k['full'] / k['nsa']:.2f}x")
    print(f"   (selected + window stop growing past n*l' = {cfg.num_selected * cfg.block_size} and "
          f"w = {cfg.window_size} keys; compressed grows as T/(2d), full as T/2)")

    print("\n   paper settings (l=32, d=16, l'=64, n=16, w=512); NSA counted with whole selected blocks,")
    print("   as loaded by a kernel (NSA.md's convention; keys s <= t only in parentheses)")
    print(f"   {'T':>6} {'full':>8} {'NSA':>8} {'(s <= t)':>10} {'full/NSA':>9}")
    for n in (8, 16, 32, 64, 128):
        whole = keys_per_query(n * 1024, whole_blocks=True)
        causal = keys_per_query(n * 1024)
        causal_txt = "({:.0f})".format(causal["nsa"])
        print(f"   {str(n) + 'k':>6} {whole['full']:8.0f} {whole['nsa']:8.0f} {causal_txt:>10} "
              f"{whole['full'] / whole['nsa']:8.2f}x")
    return 0 if (match and finite) else 1


def _bench(argv) -> int:
    try:
        from nsa.bench import cli_main
    except ImportError as e:
        print(f"nsa bench: the benchmark package is not available ({e})", file=sys.stderr)
        return 2
    return cli_main(list(argv))


def _parser():
    p = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention (DeepSeek, arXiv 2502.11089).")
    sub = p.add_subparsers(dest="command", metavar="{demo,bench}")
    d = sub.add_parser("demo", help="build an NSA layer, time forward/backward, check decoding, show the sparsity",
                       description="Builds one NSA layer, times forward + backward, checks that prefill + "
                                   "token-by-token decoding reproduces the full forward, and prints how many "
                                   "keys each query attends to.")
    d.add_argument("--tokens", type=int, default=2048, help="sequence length T (default 2048)")
    d.add_argument("--decode-steps", type=int, default=64, help="tokens decoded one by one after a prefill "
                                                                "of T - steps (default 64)")
    d.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    d.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    d.add_argument("--kv-heads", type=int, default=2, help="KV heads (default 2)")
    d.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    add_dtype_option(d, "fp32", "dtype of the layer and its input")
    add_device_option(d)
    d.add_argument("--backend", choices=("auto", "reference", "triton"), default=None,
                   help="nsa.ops backend (default: NSA_BACKEND or 'auto': kernels on CUDA, reference on CPU)")
    d.add_argument("--seed", type=int, default=0, help="seed of the weights and the input (default 0)")
    d.set_defaults(func=_demo)
    sub.add_parser("bench", help="benchmarks (arguments go to nsa.bench; see `nsa bench --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nsa`` console command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        # Everything after `bench`, --help included, belongs to the benchmark's own parser.
        return _bench(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ValueError as e:
        print(f"nsa {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
