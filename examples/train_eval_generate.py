"""Train a tiny NSA language model, evaluate it on held-out text, and generate from it.

Writes a small corpus of text files, trains with :func:`nsa.train.train` (what ``nsa train``
runs), reloads the checkpoint with :meth:`nsa.model.LanguageModel.from_pretrained`, measures
the next-token loss on text it has not seen (against the same model untrained) and continues
a prompt.

    python examples/train_eval_generate.py                       # CPU, about half a minute
    python examples/train_eval_generate.py --steps 300 --device cuda --out runs/example
"""

import argparse
import json
import math
import random
import shutil
import tempfile
from pathlib import Path

import torch

from nsa.data import load_tokenizer
from nsa.model import LanguageModel
from nsa.train import TrainConfig, train


def arithmetic_lines(rng: random.Random, n: int) -> str:
    """Lines like ``17 + 5 = 22``: a format a byte-level model picks up in a few steps."""
    lines = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        lines.append(f"{a} + {b} = {a + b}")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per step (default 1024)")
    p.add_argument("--out", default=None, help="run directory to keep (default: a temporary one, removed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nsa-example-"))
    out = Path(args.out) if args.out else work / "run"
    try:
        # 1. a corpus: any directory of UTF-8 text files (nsa train --data DIR)
        rng = random.Random(args.seed)
        corpus = work / "corpus"
        corpus.mkdir()
        for i in range(12):
            (corpus / f"sums_{i:02d}.txt").write_text(arithmetic_lines(rng, 150))

        # 2. train: the 'tiny' preset cut to 2 layers, byte-level tokenizer, packed sequences of 128
        cfg = TrainConfig(out=str(out), data=(str(corpus),), cache_dir=str(work / "cache"), preset="tiny",
                          model=dict(num_layers=2), seq_len=128, batch_tokens=args.batch_tokens, steps=args.steps,
                          lr=3e-3, log_every=1, eval_batches=2, device=args.device, seed=args.seed,
                          progress=False, overwrite=args.out is not None)
        summary = train(cfg)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        print(f"trained {summary['step']} steps ({summary['tokens']:,} tokens, {summary['num_parameters']:,} "
              f"parameters) on {args.device}: training loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
              f"validation loss {summary['val_loss']:.3f}")
        print(f"run directory {out}: {', '.join(sorted(q.name for q in out.iterdir()))}")

        # 3. evaluate: reload the checkpoint, score text from another seed (not in the corpus)
        model = LanguageModel.from_pretrained(out / "checkpoint", device=args.device).eval()
        tok = load_tokenizer(out / "tokenizer")
        text = arithmetic_lines(random.Random(args.seed + 1), 40)
        ids = torch.tensor([[tok.bos_id] + tok.encode(text)], device=args.device)
        torch.manual_seed(args.seed)
        untrained = LanguageModel(model.config).to(args.device).eval()
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
            base = untrained(ids, labels=ids).loss.item()
        print(f"held-out loss: {loss:.3f} nats/byte ({loss / math.log(2):.2f} bits), untrained {base:.3f}")

        # 4. generate: greedy continuation of a prompt, with the decoding cache
        prompt = "12 + 30 ="
        new = model.generate([[tok.bos_id] + tok.encode(prompt)], max_new_tokens=24, temperature=0,
                             eos_token_id=tok.eos_id)[0]
        text = tok.decode([t for t in new.tolist() if t < tok.vocab_size])
        print(f"generate: {prompt!r} -> {text!r}")
        ok = losses[-1] < losses[0] and loss < base
        print("OK" if ok else "FAILED: the loss did not fall")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
