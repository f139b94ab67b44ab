"""NativeSparseAttention inside a model you write yourself.

A small decoder (embedding, pre-norm blocks of NSA + MLP, LM head) takes a few training steps
on packed sequences of different lengths (``cu_seqlens``), then decodes greedily with one
:class:`nsa.NSACache` per layer, and checks every cached step against a full forward over the
same tokens.

    python examples/custom_model.py                   # CPU, a few seconds
    python examples/custom_model.py --device cuda     # the Triton kernels
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from nsa import NativeSparseAttention, NSAConfig


class Block(nn.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: NSAConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size)
        self.attn = NativeSparseAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size), nn.GELU(),
                                 nn.Linear(4 * cfg.hidden_size, cfg.hidden_size))

    def forward(self, x, cache=None, cu_seqlens=None):
        # the layer takes [B, T, hidden] (or packed [1, total, hidden] with cu_seqlens) and, with a
        # cache, prefills it (empty cache) or decodes one token per sequence (filled cache)
        x = x + self.attn(self.attn_norm(x), cache=cache, cu_seqlens=cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, cfg: NSAConfig, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)

    def new_caches(self):
        return [b.attn.new_cache() for b in self.blocks]

    def forward(self, ids, caches=None, cu_seqlens=None):
        """ids int64 ``[B, T]`` (or ``[1, total]`` with cu_seqlens) -> logits ``[B, T, vocab]``."""
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i], cu_seqlens=cu_seqlens)
        return self.head(self.norm(x))


def toy_batch(lens, vocab_size, period, generator):
    """Packed sequences that repeat a random pattern of ``period`` tokens: from the second period
    on, every token is predictable by looking ``period`` tokens back."""
    seqs = []
    for n in lens:
        pattern = torch.randint(0, vocab_size, (period,), generator=generator)
        seqs.append(pattern.repeat(-(-n // period))[:n])
    cu_seqlens = torch.tensor([0] + list(lens)).cumsum(0).to(torch.int32)
    return torch.cat(seqs).unsqueeze(0), cu_seqlens


def packed_loss(logits, ids, cu_seqlens):
    """Next-token cross-entropy inside each packed sequence (no target across a boundary)."""
    targets = ids[0, 1:].clone()
    targets[(cu_seqlens[1:-1] - 1).long()] = -100
    return F.cross_entropy(logits[0, :-1].float(), targets, ignore_index=-100)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    p.add_argument("--decode-steps", type=int, default=16, help="tokens decoded after the prompt (default 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    # hidden 64, 4 query heads on 2 KV heads of dim 16; compression 8/4, 4 blocks of 8, window 16
    cfg = NSAConfig.preset("tiny")
    vocab, period = 16, 12
    model = TinyLM(vocab, cfg, num_layers=2).to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, 2 NSA layers "
          f"(hidden {cfg.hidden_size}, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads, window {cfg.window_size}, "
          f"{cfg.num_selected} blocks of {cfg.block_size}) on {device}")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, args.steps + 1):
        ids, cu_seqlens = toy_batch([80, 48, 64], vocab, period, gen)
        logits = model(ids.to(device), cu_seqlens=cu_seqlens.to(device))
        loss = packed_loss(logits, ids.to(device), cu_seqlens.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    # Decoding: prefill two prompts of different lengths (padding-free, packed), then greedy steps.
    model.eval()
    prompts, _ = toy_batch([30, 45], vocab, period, gen)
    prompts = [prompts[0, :30], prompts[0, 30:]]
    with torch.no_grad():
        caches = model.new_caches()
        cu = torch.tensor([0, 30, 75], dtype=torch.int32, device=device)
        logits = model(torch.cat(prompts).view(1, -1).to(device), caches=caches, cu_seqlens=cu)
        last = logits[0, (cu[1:] - 1).long()]  # [N, vocab]: the prompts' last positions
        generated, step_logits = [], []
        for _ in range(args.decode_steps):
            token = last.argmax(-1)  # [N]
            generated.append(token)
            last = model(token.view(-1, 1), caches=caches)[:, 0]  # one token per sequence -> [N, vocab]
            step_logits.append(last)
        generated = torch.stack(generated, 1).cpu()  # [N, decode_steps]

        # each cached step == the last row of a full forward over prompt + generated tokens
        worst = 0.0
        for n, prompt in enumerate(prompts):
            full = torch.cat([prompt, generated[n]]).view(1, -1).to(device)
            ref = model(full)[0, len(prompt):]  # logits after each generated token
            got = torch.stack([s[n] for s in step_logits])
            worst = max(worst, ((got - ref).norm() / ref.norm()).item())
    for n, prompt in enumerate(prompts):
        print(f"prompt {n} ({len(prompt)} tokens) -> generated {generated[n].tolist()}")
    ok = worst <= (1e-4 if device.type == "cpu" else 1e-2)  # the kernels' float32 products may use TF32
    print(f"cached decoding vs full forward: relative difference {worst:.1e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
