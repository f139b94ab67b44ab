import torch, triton, sys
sys.path.insert(0, "benchmarks")
from nsa.ops import checks, selected_attention
from nsa.ops import selected as SL
from probe import random_selection
T, H, D = 65536, 4, 128
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(1, T, 4, D, device="cuda", generator=g).bfloat16()
k = torch.randn(1, T, H, D, device="cuda", generator=g).bfloat16()
v = torch.randn(1, T, H, D, device="cuda", generator=g).bfloat16()
idx = random_selection(T, H, 16, 64, g)
ms = lambda f: triton.testing.do_bench(f, warmup=10, rep=200, return_mode="median")
orig = checks._block_indices_flags
for name in ("triton", "torch", "triton", "torch"):
    checks._block_indices_flags = orig if name == "triton" else (lambda bi, bs, cu: checks._block_indices_flags_torch(bi, bs, cu))
    t_op = ms(lambda: selected_attention(q, k, v, idx, 64, backend="triton"))
    t_chk = ms(lambda: checks.check_block_indices(idx, q, H, 64, None))
    print(f"G=1 64k public selected_attention fwd with {name} validation: {t_op:.3f} ms; check alone {t_chk:.3f} ms", flush=True)
checks._block_indices_flags = orig
t_k = ms(lambda: SL._selected_fwd_op(q, k, v, idx, 64, None, None) if False else SL._selected_fwd_op(q, k, v, idx, 64, D ** -0.5, None))
print(f"kernel path alone (_selected_fwd_op): {t_k:.3f} ms")
