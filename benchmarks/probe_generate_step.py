"""Probe: where the time of one decoding step of the ``base`` model goes, and which PyTorch
attention a fair full-attention baseline should decode with.

Part 1 (``--profile``): per attention (nsa, full) and batch, the base model in bf16 is prefilled
with random prompts of T tokens, its cache made static, and a few eager steps are profiled; the
CUDA kernels are listed by total time (the eager step's kernel times; launch gaps are not kernel
time).

Part 2: one layer's decoding attention of the full model (16 query / 2 KV heads, D = 64) over a
static cache of capacity T + 64 holding T tokens per sequence, timed with CUDA events:
``masked``: what KVCache.attend does (SDPA, a KV head's query heads as query rows, a length mask:
the memory-efficient kernel); ``flash_varlen``: ``aten._flash_attention_forward`` over the same
buffer with ``seqused_k`` (FlashAttention-2 varlen; split-KV chosen by its heuristic);
``flash_exact`` / ``cudnn_exact``: SDPA without a mask over exactly T keys (not capturable: the key
length changes every step; the bytes-bound reference). GPU only.

    PYTHONPATH=src python3 benchmarks/probe_generate_step.py [--T 65536] [--B 1,16] [--profile]
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def attention_variants(T, B, HQ=16, H=2, D=64, extra=64):
    dev, dt = torch.device("cuda"), torch.bfloat16
    cap = T + extra
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(B, cap, H, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, cap, H, D, device=dev, dtype=dt, generator=g)
    q = torch.randn(B, HQ, D, device=dev, dtype=dt, generator=g)
    lens = torch.full((B,), T, device=dev, dtype=torch.int32)
    s = D ** -0.5
    G = HQ // H

    def masked():
        kk, vv = k.transpose(1, 2), v.transpose(1, 2)
        mask = (torch.arange(cap, device=dev) < lens.long().view(B, 1)).view(B, 1, 1, cap)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q.view(B, H, G, D), kk, vv, attn_mask=mask,
                                                  scale=s).reshape(B, HQ, D)

    cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32)
    cu_k = cu_q * cap

    def flash_varlen():
        out = torch.ops.aten._flash_attention_forward(
            q, k.view(B * cap, H, D), v.view(B * cap, H, D), cu_q, cu_k, 1, cap, 0.0, False, False,
            scale=s, seqused_k=lens)[0]
        return out.view(B, HQ, D)

    def exact(backend):
        def fn():
            kk, vv = k[:, :T].transpose(1, 2), v[:, :T].transpose(1, 2)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q.view(B, HQ, 1, D), kk, vv, scale=s,
                                                      enable_gqa=True).view(B, HQ, D)
        return fn

    ref = exact(SDPBackend.FLASH_ATTENTION)().float()
    gb = 2 * B * T * H * D * 2 / 1e9
    print(f"T={T} B={B}: {gb * 1e3:.1f} MB of keys/values per layer")
    for name, fn in [("masked", masked), ("flash_varlen", flash_varlen),
                     ("flash_exact", exact(SDPBackend.FLASH_ATTENTION)),
                     ("cudnn_exact", exact(SDPBackend.CUDNN_ATTENTION))]:
        try:
            err = (fn().float() - ref).abs().max().item()
            ms = time_ms(fn)
            print(f"  {name:13s} {ms:8.4f} ms  {gb / ms * 1e3:7.0f} GB/s  max|err| {err:.2e}")
        except Exception as e:  # a probe: report and go on
            print(f"  {name:13s} failed: {type(e).__name__}: {str(e)[:200]}")


def profile_steps(T, B, attention):
    from torch.profiler import ProfilerActivity, profile

    from nsa.model import LanguageModel, ModelConfig
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset("base", attention=attention)).to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (B, T), device=dev)
    with torch.no_grad():
        cache = model.new_cache()
        flat = ids.view(1, -1)
        cu = torch.arange(B + 1, device=dev, dtype=torch.int32) * T
        model(flat, cu_seqlens=cu, cache=cache)
        cache.make_static(16)
        tok = ids[:, -1].clone()
        for _ in range(3):
            model._decode_logits(tok, cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                model._decode_logits(tok, cache)
            torch.cuda.synchronize()
    print(f"--- {attention} T={T} B={B}: 4 eager steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))
    del model, cache
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--B", default="1,16")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for B in [int(x) for x in a.B.split(",")]:
        attention_variants(a.T, B)
    if a.profile:
        for B in [int(x) for x in a.B.split(",")]:
            for att in ("nsa", "full"):
                profile_steps(a.T, B, att)


if __name__ == "__main__":
    main()
