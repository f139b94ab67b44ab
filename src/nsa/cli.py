"""The ``nsa`` command: ``nsa demo`` (NSA, full and window attention trained on retrieval; ``--layer``:
a tour of one layer), ``nsa bench``, ``nsa train``, ``nsa generate``, ``nsa eval``. It parses and
dispatches; the work is done by functions a test can call (``nsa.demo.run_demo``, ...)."""

from __future__ import annotations

import argparse
import platform
import sys
import time

from ._cli_utils import DTYPE_NAMES, add_device_option, add_dtype_option, canonical_dtype, resolve_device, torch_dtype
from .demo import keys_per_query

__all__ = ["main", "keys_per_query", "resolve_device"]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


LAYER_DEFAULTS = dict(tokens=2048, decode_steps=64, hidden=256, heads=4, kv_heads=2, head_dim=64, dtype="fp32",
                      backend=None)


def _demo(args) -> int:
    if args.layer:
        for name, value in LAYER_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        return _demo_layer(args)
    given = [f"--{n.replace('_', '-')}" for n in LAYER_DEFAULTS if getattr(args, n) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: options of the layer tour; add --layer")
    from .demo import demo_settings, run_demo

    device = resolve_device(args.device)
    changes = {k: getattr(args, k) for k in ("seq_len", "steps", "task", "samples") if getattr(args, k) is not None}
    cfg = demo_settings(device.type, args.quick, out=args.out, overwrite=args.overwrite, seed=args.seed,
                        device=args.device, progress=not args.no_progress, **changes)
    try:
        run_demo(cfg)
    except KeyboardInterrupt as e:  # a signal: the run being trained saved a checkpoint
        print(str(e) or "nsa demo: interrupted", file=sys.stderr)
        return 130
    return 0


def _demo_layer(args) -> int:
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


def _dtype_arg(text):
    try:
        return canonical_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def _parser():
    p = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention (DeepSeek, arXiv 2502.11089).")
    sub = p.add_subparsers(dest="command", metavar="{demo,bench,train,generate,eval}")
    d = sub.add_parser("demo", help="train NSA, full and window attention on retrieval and compare them "
                                    "(--layer: a tour of one NSA layer)",
                       description="Trains three small models that differ only in their attention (NSA, full, a "
                                   "sliding window alone) on pass-key retrieval documents, then prints needle "
                                   "accuracy, validation loss, keys per query and tokens/s, writes summary.json "
                                   "and demo.png into --out and generates a sample with the cache. --layer instead "
                                   "builds one NSA layer, times forward + backward, checks prefill + decoding "
                                   "against the full forward and prints how many keys each query attends to.")
    d.add_argument("--out", default="demo-out", help="output directory (default demo-out/); refused if not empty "
                                                     "unless --overwrite")
    d.add_argument("--overwrite", action="store_true", help="replace the demo's outputs in --out")
    d.add_argument("--quick", action="store_true", help="a smoke test of the whole pipeline in well under a "
                                                        "minute (tiny sizes, a few steps; nothing is learned)")
    d.add_argument("--steps", type=int, help="training steps of each model (default: 160 on CPU, 600 on CUDA)")
    d.add_argument("--seq-len", type=int, help="training context and needle prompt length (default: 512 on CPU, "
                                               "2048 on CUDA)")
    d.add_argument("--task", choices=("needle", "recall", "mix"), help="training documents (default needle)")
    d.add_argument("--samples", type=int, help="needle prompts per depth (default: 8 on CPU, 20 on CUDA)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--layer", action="store_true", help="the layer tour instead (the options below)")
    d.add_argument("--tokens", type=int, help="--layer: sequence length T (default 2048)")
    d.add_argument("--decode-steps", type=int, help="--layer: tokens decoded one by one after a prefill of "
                                                    "T - steps (default 64)")
    d.add_argument("--hidden", type=int, help="--layer: hidden size (default 256)")
    d.add_argument("--heads", type=int, help="--layer: query heads (default 4)")
    d.add_argument("--kv-heads", type=int, help="--layer: KV heads (default 2)")
    d.add_argument("--head-dim", type=int, help="--layer: head dim (default 64)")
    d.add_argument("--dtype", type=_dtype_arg, metavar="DTYPE",
                   help="--layer: dtype of the layer and its input: " + ", ".join(
                       f"{n}/{DTYPE_NAMES[n][1]}" for n in DTYPE_NAMES) + " (default fp32)")
    add_device_option(d)
    d.add_argument("--backend", choices=("auto", "reference", "torch", "triton"), default=None,
                   help="--layer: nsa.ops backend (default: NSA_BACKEND or 'auto': kernels on CUDA, the torch "
                        "backend on CPU)")
    d.add_argument("--seed", type=int, default=0, help="seed of the weights, data and prompts (default 0)")
    d.set_defaults(func=_demo)
    sub.add_parser("bench", help="benchmarks (arguments go to nsa.bench; see `nsa bench --help`)", add_help=False)
    _train_parser(sub)
    _generate_parser(sub)
    _eval_parser(sub)
    return p


def _train_parser(sub):
    # Defaults are suppressed: an option left out keeps the value of --config, of the resumed
    # run, or TrainConfig's default (nsa.train.config_from_sources merges them in that order).
    t = sub.add_parser("train", help="train a language model (nsa.model) on text files; torchrun for several "
                                     "processes", argument_default=argparse.SUPPRESS,
                       description="Trains nsa.model.LanguageModel on packed documents and writes config.json, "
                                   "metrics.jsonl, tokenizer/ and checkpoint/ into --out. Under torchrun "
                                   "--nproc_per_node=N the same command runs data-parallel (DDP or FSDP2).")
    t.add_argument("--config", help="TOML file of options (keys: the option names; a [model] table of "
                                    "ModelConfig fields); flags given here override it")
    t.add_argument("--out", help="run directory (required; refused if it holds a run, unless --resume or "
                                 "--overwrite)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint "
                                                         "(its saved options unless overridden)")
    t.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    t.add_argument("--preset", choices=("tiny", "small", "base", "1b"), help="model size (default tiny)")
    t.add_argument("--attention", choices=("nsa", "full", "window"), help="attention kind (default nsa)")
    t.add_argument("--model", action="append", metavar="FIELD=VALUE",
                   help="override a ModelConfig field, e.g. --model window_size=128 (repeatable)")
    t.add_argument("--data", nargs="+", metavar="PATH", help="text files, directories or globs (default: the "
                                                             "Python sources of this interpreter's library)")
    t.add_argument("--task", choices=("lm", "needle", "recall", "mix"),
                   help="train on the --data documents ('lm', default) or on seeded retrieval documents made "
                        "from them: pass-key needles, associative recall, or a mix of both with plain text "
                        "(nsa.evals.tasks; each at most --seq-len tokens, packed whole)")
    t.add_argument("--loss-on", choices=("all", "answers"),
                   help="the loss on all tokens (default) or, with a retrieval --task, on the answers only")
    t.add_argument("--tokenizer", help="'byte' (default), 'bpe:VOCAB' (trained here, needs `tokenizers`) or a "
                                       "saved tokenizer directory")
    t.add_argument("--cache-dir", help="where tokenized corpora are cached (default ~/.cache/nsa/tokens)")
    t.add_argument("--val-fraction", type=float, help="share of documents held out for validation (default 0.05)")
    t.add_argument("--seq-len", type=int, help="longest training sequence in tokens (default 512)")
    t.add_argument("--batch-tokens", type=int, help="tokens per optimizer step over all processes (default 8192)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per step and process (default 1)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 1000 unless --tokens)")
    t.add_argument("--tokens", type=int, help="training tokens (instead of --steps)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    t.add_argument("--min-lr-ratio", type=float, help="final learning rate / peak (default 0.1)")
    t.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 2%% of the run)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices (default 0.1)")
    t.add_argument("--beta1", type=float, help="AdamW beta1 (default 0.9)")
    t.add_argument("--beta2", type=float, help="AdamW beta2 (default 0.95)")
    t.add_argument("--grad-clip", type=float, help="gradient-norm clip, 0 for none (default 1.0)")
    add_dtype_option(t, None, "compute dtype (bf16 autocast, or fp32; default bf16 on CUDA, fp32 on CPU)",
                     allowed=("bf16", "fp32"))
    t.add_argument("--compile", action="store_true", help="torch.compile each block")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward (less memory)")
    t.add_argument("--seed", type=int, help="seed of the weights and the data order (default 0)")
    t.add_argument("--eval-every", type=int, help="evaluate every N steps (default 0: only at the end)")
    t.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default 8)")
    t.add_argument("--log-every", type=int, help="write a metrics line every N steps (default 10)")
    t.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default 0: at the end)")
    t.add_argument("--parallel", choices=("ddp", "fsdp"), help="data parallelism under torchrun (default ddp)")
    t.add_argument("--context-parallel", type=int, metavar="P",
                   help="split every sequence over P ranks under torchrun (NSA models; default 1)")
    add_device_option(t)
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    t.set_defaults(func=_train)


def _model_overrides(items):
    import dataclasses
    import json

    from .model import ModelConfig

    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"--model: expected FIELD=VALUE with FIELD one of {sorted(types)}, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[name] = value
    return out


def _train(args) -> int:
    from .train import config_from_sources, train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    if options.get("dtype") is None:  # add_dtype_option's default: not given
        options.pop("dtype", None)
    if "model" in options:
        options["model"] = _model_overrides(options["model"])
    cfg = config_from_sources(options, getattr(args, "config", None))
    try:
        summary = train(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        state = "stopped early (checkpoint saved)" if summary["stopped"] else "done"
        val = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
        print(f"nsa train: {state}: step {summary['step']}, {summary['tokens']:,} tokens, "
              f"val_loss {val}, {summary['num_parameters']:,} parameters -> {summary['out']}")
    return 130 if summary["stopped"] else 0


def _generate_parser(sub):
    g = sub.add_parser("generate", help="continue a prompt with a trained model (streams to the terminal)",
                       description="Loads a run directory or checkpoint written by `nsa train` and streams the "
                                   "continuation of --prompt.")
    g.add_argument("--checkpoint", required=True, help="run directory (or its checkpoint/ directory)")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 for greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: none)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_device_option(g)
    g.set_defaults(func=_generate)


def _generate(args) -> int:
    import torch

    from .train import load_checkpoint_model, load_run_tokenizer

    device = resolve_device(args.device)
    model = load_checkpoint_model(args.checkpoint, device=device).eval()
    tok = load_run_tokenizer(args.checkpoint)
    ids = [tok.bos_id] + tok.encode(args.prompt)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    # Bytes of one character can arrive over several tokens: decode the whole continuation
    # each step and print what is new.
    produced: list[int] = []
    shown = ""
    for step in model.stream_generate([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                      top_p=args.top_p, eos_token_id=tok.eos_id, generator=gen,
                                      vocab_limit=tok.vocab_size):
        t = int(step[0])
        if t < 0 or t == tok.eos_id:
            break
        produced.append(t)
        text = tok.decode(produced)
        if text.endswith("\ufffd"):
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write(tok.decode(produced)[len(shown):] + "\n")
    return 0


def _grid(kind):
    """An argparse type: comma-separated ints (``kind=int``) or numbers in [0, 1] (``float``)."""
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            values = None
        if not values or (kind is int and min(values) < 1) or (kind is float and not all(0 <= v <= 1 for v in values)):
            want = "positive ints, e.g. 256,512" if kind is int else "numbers in [0, 1], e.g. 0,0.5,1"
            raise argparse.ArgumentTypeError(f"expected comma-separated {want}, got {text!r}")
        return values
    return parse


def _eval_parser(sub):
    e = sub.add_parser("eval", help="evaluate a trained model: loss by position, needle / recall retrieval, "
                                    "NSA's selection", description="Evaluates a run of `nsa train` and writes "
                                    "<kind>.json and <kind>.png into --out (see nsa.evals).")
    kinds = e.add_subparsers(dest="kind", metavar="{loss,needle,recall,selection}", required=True)
    helps = {"loss": "held-out loss and bits per byte, overall and per position bucket",
             "needle": "pass-key retrieval accuracy over context lengths x needle depths (heatmap)",
             "recall": "multi-query associative recall accuracy over context lengths",
             "selection": "how often the needle's block is selected, blocks shared by neighbouring queries, gates"}
    for kind, text in helps.items():
        k = kinds.add_parser(kind, help=text, description=text)
        k.add_argument("--checkpoint", required=True, help="run directory of `nsa train` (or its checkpoint/)")
        k.add_argument("--data", nargs="+", metavar="PATH", help="documents to evaluate on / draw filler from "
                                                                 "(default: the run's validation documents)")
        k.add_argument("--out", help="output directory (default: <run>/eval)")
        if kind == "loss":
            k.add_argument("--seq-len", type=int, help="longest sequence (default: the run's seq_len)")
            k.add_argument("--max-tokens", type=int, help="predicted tokens to evaluate (default 262144)")
        else:
            k.add_argument("--lengths", type=_grid(int), help="context lengths in tokens, e.g. 256,512 (default: "
                                                              "1/4, 1/2 and all of the run's seq_len)")
            k.add_argument("--samples", type=int, help="prompts per grid cell (default 10; selection 4)")
        if kind in ("needle", "selection"):
            k.add_argument("--depths", type=_grid(float), help="needle depths (default 0,0.25,0.5,0.75,1)")
        k.add_argument("--seed", type=int, default=0, help="seed of the prompts (default 0)")
        k.add_argument("--dtype", choices=("bf16", "fp32"), help="compute dtype: bf16 autocast or fp32 (default "
                                                                  "bf16 on CUDA, fp32 on CPU)")
        add_device_option(k)
        k.add_argument("--no-plot", dest="plot", action="store_false", help="write no PNG (no matplotlib needed)")
        k.set_defaults(func=_eval)


def _eval(args) -> int:
    from .evals.run import run_eval, summary

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "kind", "checkpoint")}
    print(summary(run_eval(args.kind, args.checkpoint, **options)))
    return 0


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
