"""Shared test helpers: one relative-error check for every comparison."""

import pytest
import torch


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    ref, out = ref.detach().double(), out.detach().double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float):
    """Fails on shape mismatch, any NaN/inf where ref is finite, or relative error above ``ratio``."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bad = ~torch.isfinite(out.detach()) & torch.isfinite(ref.detach())
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite elements (unwritten output?)"
    err = rel_err(ref, out)
    assert err <= ratio, f"{name}: relative error {err:.3e} > {ratio:.1e}"


def write_small_corpus(root, chars: int = 3000):
    """Eight small text documents in ``root`` (the first ``chars`` characters of some
    standard-library modules' sources): a corpus for short training runs. Returns ``root``."""
    import inspect

    for mod in ("json", "os", "string", "textwrap", "random", "shutil", "pathlib", "argparse"):
        (root / f"{mod}.txt").write_text(inspect.getsource(__import__(mod))[:chars])
    return root


def train_tiny_run(root, **config):
    """A run directory ``root/run`` of two steps of :func:`nsa.train.train` on
    :func:`write_small_corpus` documents in ``root/corpus`` (byte tokenizer, a quarter of the
    documents held out, one validation batch), with torch on one thread; ``config``: the
    :class:`nsa.train.TrainConfig` fields of the test (model, seq_len, batch_tokens, ...)."""
    import torch

    from nsa.train import TrainConfig, train

    corpus = root / "corpus"
    corpus.mkdir()
    write_small_corpus(corpus)
    settings = dict(out=str(root / "run"), data=(str(corpus),), cache_dir=str(root / "cache"), steps=2,
                    progress=False, val_fraction=0.25, eval_batches=1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**{**settings, **config}))
    finally:
        torch.set_num_threads(n)
    return root / "run"


def load_benchmark_script(name: str):
    """The module ``benchmarks/<name>.py`` (a script, not a package), imported from its file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_compile_matches_eager(f, inputs, names, ratio=1e-6):
    """``torch.compile(f, fullgraph=True)`` (aot_eager) gives the eager scalar loss ``f(*inputs)``
    and its gradients with respect to ``inputs`` (named ``names``)."""
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    loss_ref = f(*inputs)
    grads_ref = torch.autograd.grad(loss_ref, inputs)
    assert_close("compiled loss", loss_ref, loss, ratio)
    for name, r, x in zip(names, grads_ref, grads):
        assert_close(f"compiled {name}", r, x, ratio)
