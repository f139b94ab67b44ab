"""The language model and the trainer on the GPU: the model on the Triton kernels == the reference
backend (packed documents, every gradient), cached greedy generation == re-running the forward,
and `nsa train` on CUDA — bf16 autocast with fused AdamW, torch.compile, and torchrun's NCCL path
(DDP and FSDP2, one process per GPU) against the plain single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa import train as train_mod
from nsa.model import LanguageModel, ModelConfig
from nsa.train import TrainConfig, train
from tests.helpers import assert_close, needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]

# Every NSA branch active from T = 64; selection blocks of 64 (the kernels' smallest tile).
MODEL = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
             max_seq_len=4096, kernel_size=32, stride=16, block_size=64, num_selected=4, num_local=1,
             window_size=128)


def _model(backend, attention="nsa", seed=0, **kw):
    torch.manual_seed(seed)
    m = LanguageModel(ModelConfig(**{**MODEL, "attention": attention, "backend": backend, **kw}))
    with torch.no_grad():  # larger than GPT init, so that attention shapes the logits
        for name, p in m.named_parameters():
            if p.dim() == 2 and not name.startswith(("embed", "lm_head")):
                p.normal_(0, 2 / p.shape[1] ** 0.5)
            elif name.endswith("pos_emb"):
                p.normal_(0, 0.5)
    return m.cuda()


def test_model_on_the_kernels_matches_the_reference():
    """float32, packed documents of lengths that are no multiple of a block; every selectable block
    is selected (num_selected >= blocks per document) so that top-n has one answer."""
    lens = [300, 700]
    ref = _model("reference", num_selected=12)
    tri = _model("triton", num_selected=12)
    ids = torch.randint(0, 320, (1, sum(lens)), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    outs = []
    for m in (ref, tri):
        o = m(ids, cu_seqlens=cu, labels=ids, return_logits=True)
        o.loss.backward()
        outs.append((o, {n: p.grad for n, p in m.named_parameters()}))
    (o_r, g_r), (o_t, g_t) = outs
    assert_close("logits", o_r.logits, o_t.logits, 1e-4)
    assert_close("loss", o_r.loss, o_t.loss, 1e-5)
    for n in g_r:
        assert_close(n, g_r[n], g_t[n], 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("window", [None, 1, 37])
def test_kv_cache_attend_flash_equals_brute_force(dtype, static, window):
    """KVCache.attend on CUDA (FlashAttention-2 varlen over the cache in place, seqused_k) against
    softmax over each sequence's own keys in float32: sequences of different lengths (one shorter
    than the window, one of a single token), GQA, the unused capacity (dynamic or static cache)
    filled with NaN (never read)."""
    from nsa.cache import KVCache, _flash_varlen_decodes
    g = torch.Generator(device="cuda").manual_seed(0)
    lens, HQ, H, D = [1, 30, 700, 2049], 8, 2, 64
    ks = [torch.randn(n, H, D, device="cuda", generator=g).to(dtype) for n in lens]
    vs = [torch.randn(n, H, D, device="cuda", generator=g).to(dtype) for n in lens]
    cache = KVCache()
    cache.prefill(list(lens), torch.cat(ks), torch.cat(vs))
    if static:
        cache.make_static(5)
    for n, L in enumerate(lens):
        cache.k[n, L:] = float("nan")
        cache.v[n, L:] = float("nan")
    q = torch.randn(len(lens), HQ, D, device="cuda", generator=g).to(dtype)
    assert _flash_varlen_decodes(q, cache.k, cache.v)
    o = cache.attend(q, window_size=window, scale=0.2)
    for n, L in enumerate(lens):
        lo = 0 if window is None else max(0, L - window)
        k = ks[n][lo:].float().repeat_interleave(HQ // H, dim=1)  # [keys, HQ, D]
        v = vs[n][lo:].float().repeat_interleave(HQ // H, dim=1)
        p = torch.einsum("hd,khd->hk", q[n].float(), k).mul(0.2).softmax(-1)
        ref = torch.einsum("hk,khd->hd", p, v)
        assert_close(f"o[{n}]", ref, o[n].float(), 1e-2)


@pytest.mark.parametrize("attention", ["nsa", "full", "window"])
def test_cached_greedy_equals_uncached(attention):
    m = _model("triton" if attention != "full" else None, attention).eval()
    g = torch.Generator("cuda").manual_seed(2)
    prompts = [torch.randint(0, 320, (n,), device="cuda", generator=g) for n in (200, 37, 1)]
    out = m.generate(prompts, 40, temperature=0)
    with torch.no_grad():
        for p, o in zip(prompts, out):
            seq = p.clone()
            for _ in range(40):
                seq = torch.cat([seq, m(seq[None]).logits[0, -1].argmax().view(1)])
            assert torch.equal(o, seq[p.numel():]), (attention, p.numel())
            assert len(set(o.tolist())) > 3


@pytest.mark.parametrize("attention", ["nsa", "full", "window"])
def test_generate_cuda_graph_equals_eager(attention):
    """bf16 generation with the decoding step replayed from a CUDA graph == the same steps run
    eagerly (same tokens, greedy and sampled with one seed; dense and, for NSA, paged caches),
    and the replayed steps read nothing on the host (CUDA sync debug mode "error" once both kinds of
    step, with and without compression, are captured)."""
    m = _model("triton" if attention != "full" else None, attention).eval().to(torch.bfloat16)
    g = torch.Generator("cuda").manual_seed(2)
    prompts = [torch.randint(0, 320, (n,), device="cuda", generator=g) for n in (300, 37, 1, 129)]
    caches = (False, True) if attention == "nsa" else (False,)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=50)):
        for paged in caches:
            outs = {}
            for graph in (False, True):
                outs[graph] = m.generate(prompts, 48, generator=torch.Generator("cuda").manual_seed(5),
                                         cuda_graph=graph, paged=paged, **kw)
            for a, b in zip(outs[False], outs[True]):
                assert torch.equal(a, b), (attention, kw, paged)
    stream = m.stream_generate(prompts, 40, temperature=0, cuda_graph=True)
    # The prefill and each kind of step's eager run and capture synchronise: steps 1 and 2 complete
    # no compression block; step 4 (the 300-token prompt reaches 304) is the first that completes
    # one, step 11 (37 + 11 = 48) the second. Tokens 0..11 come before every later replay.
    first = [next(stream) for _ in range(12)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(stream)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(first) + len(rest) == 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    import inspect

    for mod in ("json", "os", "string", "textwrap", "random", "shutil", "pathlib", "argparse", "inspect",
                "typing", "dataclasses", "functools"):
        (root / f"{mod}.txt").write_text(inspect.getsource(__import__(mod)))
    return root


def _cfg(tmp_path, corpus, name, **kw):
    base = dict(out=str(tmp_path / name), data=(str(corpus),), cache_dir=str(tmp_path / "cache"),
                model={k: v for k, v in MODEL.items()}, seq_len=1024, batch_tokens=8192, steps=30, log_every=1,
                eval_batches=4, progress=False, val_fraction=0.2, warmup_steps=5, lr=2e-3, device="cuda")
    base.update(kw)
    return TrainConfig(**base)


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_train_bf16_fused_adamw(tmp_path, corpus, monkeypatch):
    made = []
    real = train_mod._optimizer

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(train_mod, "_optimizer", spy)
    summary = train(_cfg(tmp_path, corpus, "bf16"))
    assert made[0].defaults["fused"] is True
    lines = _metrics(tmp_path / "bf16")
    losses = [m["loss"] for m in lines if "loss" in m]
    assert len(losses) == 30 and all(map(lambda x: x == x, losses))
    # At initialisation the loss is about log(320) = 5.77; 30 steps of 8k tokens learn the bytes' statistics.
    assert summary["val_loss"] < 3.5, lines[-3:]
    model = train_mod.load_checkpoint_model(tmp_path / "bf16")
    assert model.num_parameters() == summary["num_parameters"]


def test_compile_matches_eager(tmp_path, corpus):
    eager = train(_cfg(tmp_path, corpus, "eager", steps=4, dtype="fp32"))
    comp = train(_cfg(tmp_path, corpus, "compiled", steps=4, dtype="fp32", compile=True))
    a, b = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    for x, y in zip(a, b):
        for k in ("loss", "val_loss"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4), (k, x, y)
    assert comp["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_nccl_equals_one_process(tmp_path, corpus, parallel):
    """torchrun with one process per GPU (NCCL) runs the DDP / FSDP2 code; in float32 it matches the
    plain run; in bf16 (FSDP2: MixedPrecisionPolicy) it trains."""
    one = train(_cfg(tmp_path, corpus, "one", steps=3, dtype="fp32"))
    n = torch.cuda.device_count()
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"tr_{dtype}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
               "nsa.cli", "train", "--out", str(out), "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
               "--seq-len", "1024", "--batch-tokens", "8192", "--steps", "3", "--log-every", "1",
               "--eval-batches", "4", "--val-fraction", "0.2", "--warmup-steps", "5", "--lr", "2e-3",
               "--no-progress", "--device", "cuda", "--dtype", dtype, "--parallel", parallel,
               *[f"--model={k}={v}" for k, v in MODEL.items()]]
        r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        lines = _metrics(out)
        if dtype == "fp32" and n == 1:
            ref = _metrics(tmp_path / "one")
            assert len(lines) == len(ref)
            for x, y in zip(ref, lines):
                for k in ("loss", "grad_norm", "val_loss"):
                    if k in x:
                        assert y[k] == pytest.approx(x[k], rel=1e-4), (k, x, y)
        else:
            losses = [m["loss"] for m in lines if "loss" in m]
            assert len(losses) == 3 and losses[-1] < losses[0], lines
        assert train_mod.load_checkpoint_model(out).num_parameters() == one["num_parameters"]
