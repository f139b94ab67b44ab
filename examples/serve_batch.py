"""Serve a batch of prompts of different lengths with the decoding cache, streaming the output.

:meth:`nsa.model.LanguageModel.generate` prefills all prompts at once, packed (no padding),
then decodes one token per prompt per step; its ``callback`` sees every step's tokens as they
are produced. Here the first prompt's text is streamed to the terminal, the throughput is
reported, and the batch is checked against each prompt generated on its own.

    python examples/serve_batch.py                                  # a random tiny model, CPU
    python examples/serve_batch.py --checkpoint runs/tiny           # a model trained by `nsa train`
"""

import argparse
import sys
import time

import torch

from nsa.data import ByteTokenizer, load_tokenizer
from nsa.model import LanguageModel, ModelConfig

PROMPTS = [
    "def fibonacci(n):",
    "Native Sparse Attention keeps",
    "import torch\nimport torch.nn as nn\n\nclass Block(nn.Module):\n    def __init__(self, dim):",
    "#",
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--checkpoint", default=None,
                   help="an `nsa train` run directory (default: a randomly initialised tiny model)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per prompt (default 48)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default), > 0 samples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)

    if args.checkpoint:
        from nsa.train import load_checkpoint_model

        model = load_checkpoint_model(args.checkpoint, device=device)
        tok = load_tokenizer(f"{args.checkpoint}/tokenizer")
    else:
        torch.manual_seed(args.seed)
        tok = ByteTokenizer()
        model = LanguageModel(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_layers=2)).to(device)
    model.eval()
    prompts = [[tok.bos_id] + tok.encode(text) for text in PROMPTS]
    print(f"{len(prompts)} prompts of {[len(x) for x in prompts]} tokens, {model.num_parameters():,} parameters "
          f"({model.config.attention} attention) on {device}")

    def text_of(ids):
        return tok.decode([t for t in ids if 0 <= t < tok.vocab_size])

    # Stream the first prompt's continuation as it is produced; count tokens for every prompt.
    streamed, shown, steps = [], "", []

    def on_step(tokens):  # int64 [N]: this step's token per prompt, -1 once a prompt has finished
        nonlocal shown
        steps.append(time.perf_counter())
        if tokens[0] >= 0:
            streamed.append(int(tokens[0]))
            text = text_of(streamed)
            if not text.endswith("\ufffd"):  # a character split over several bytes: wait for the rest
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text

    print(f"--- prompt 0, streamed ---\n{PROMPTS[0]}", end="")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    outs = model.generate(prompts, args.max_new_tokens, temperature=args.temperature, eos_token_id=tok.eos_id,
                          generator=gen, callback=on_step)
    t1 = time.perf_counter()
    print(text_of(streamed)[len(shown):] + "\n---")
    total = sum(len(o) for o in outs)
    first = steps[0] - t0 if steps else float("nan")
    print(f"{total} tokens in {t1 - t0:.2f} s: prefill + first token {1e3 * first:.0f} ms, then "
          f"{(len(steps) - 1) / max(t1 - steps[0], 1e-9):.1f} steps/s x {len(prompts)} prompts")
    for i, (text, out) in enumerate(zip(PROMPTS, outs)):
        print(f"[{i}] {text[-30:]!r} -> {text_of(out.tolist())!r}")

    if args.temperature == 0:
        # greedy decoding of the batch == each prompt decoded alone
        alone = [model.generate([x], args.max_new_tokens, temperature=0, eos_token_id=tok.eos_id)[0] for x in prompts]
        same = all(torch.equal(a, b) for a, b in zip(alone, outs))
        print(f"batch vs one prompt at a time: {'identical' if same else 'DIFFERENT'}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
