"""A decoding step reads no device value on the host (no host synchronisation).

On a GPU every such read (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, ``nonzero``, a
blocking copy...) stalls the host until the GPU has caught up, which makes an eager decoding
step host-bound. Here, on CPU, every Python entry point that reads tensor values is replaced by
one that raises while a step runs: a layer step driven by :class:`nsa.NSACache` (steps that
complete compression blocks for every sequence, for none, and for some) and ``nsa_decode``
called directly, on the 'torch' backend and on the Triton kernels (interpreter). The Triton
interpreter itself copies kernel arguments to the host to emulate the GPU; that is the kernel's
own memory traffic, so reads inside a kernel launch are allowed. The outputs still equal the
reference. The same on a GPU with ``torch.cuda.set_sync_debug_mode('error')``:
tests/gpu/test_decode_gpu.py.
"""

import contextlib

import pytest
import torch

from nsa.ops.decode import nsa_decode
from tests.helpers import assert_close
from tests.ops.test_decode import ORDER, _build
from tests.test_layer import make_layer, tiny

# Tensor methods that hand a device value to Python.
_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__complex__", "__index__", "cpu", "numpy",
          "__array__", "__repr__", "__str__", "__format__", "nonzero", "masked_select", "unique",
          "unique_consecutive", "argwhere", "equal", "allclose")
# torch functions whose output size depends on values (a hidden device-to-host copy)
_TORCH_READS = ("nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "equal", "allclose",
                "bincount", "histc")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Inside: any read of a tensor's values outside a Triton kernel launch raises HostRead."""
    state = {"on": True, "kernel": 0}

    def guard(name, orig):
        def wrapped(*args, **kwargs):
            if state["on"] and not state["kernel"]:
                raise HostRead(f"host read of device values: {name}")
            return orig(*args, **kwargs)
        return wrapped

    for name in _READS:
        if hasattr(torch.Tensor, name):
            monkeypatch.setattr(torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in _TORCH_READS:
        monkeypatch.setattr(torch, name, guard(f"torch.{name}", getattr(torch, name)))

    def repeat_interleave(orig, name):
        def wrapped(input, repeats=None, *args, output_size=None, **kwargs):
            if (state["on"] and not state["kernel"] and output_size is None
                    and (repeats is None or isinstance(repeats, torch.Tensor))):
                raise HostRead(f"{name} with tensor repeats and no output_size")
            return orig(input, repeats, *args, output_size=output_size, **kwargs)
        return wrapped

    monkeypatch.setattr(torch, "repeat_interleave", repeat_interleave(torch.repeat_interleave, "torch.repeat_interleave"))
    monkeypatch.setattr(torch.Tensor, "repeat_interleave",
                        repeat_interleave(torch.Tensor.repeat_interleave, "Tensor.repeat_interleave"))
    def masked_index(orig, name):
        # indexing with a boolean mask sizes its result by the mask's values (a nonzero inside)
        def wrapped(self, index, *args):
            idx = index if isinstance(index, tuple) else (index,)
            if (state["on"] and not state["kernel"]
                    and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx)):
                raise HostRead(f"{name} with a boolean mask")
            return orig(self, index, *args)
        return wrapped

    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, masked_index(getattr(torch.Tensor, name), f"Tensor.{name}"))
    try:
        from triton.runtime import interpreter
    except ImportError:
        interpreter = None
    if interpreter is not None:
        launch = interpreter.GridExecutor.__call__

        def in_kernel(self, *args, **kwargs):
            state["kernel"] += 1
            try:
                return launch(self, *args, **kwargs)
            finally:
                state["kernel"] -= 1
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", in_kernel)
    try:
        yield
    finally:
        state["on"] = False


def test_guard_catches_reads(monkeypatch):
    """The guard is not vacuous: each kind of read raises inside it."""
    t = torch.arange(4)

    def assign():
        t[t > 1] = 0

    reads = dict(item=lambda: t.sum().item(), tolist=lambda: t.tolist(), bool=lambda: bool(t[0]),
                 int=lambda: int(t[1]), float=lambda: float(t[1]), cpu=lambda: t.cpu(), numpy=lambda: t.numpy(),
                 nonzero=lambda: t.nonzero(), torch_nonzero=lambda: torch.nonzero(t), mask=lambda: t[t > 1],
                 mask_assign=assign, repeat_interleave=lambda: torch.repeat_interleave(t, t),
                 print=lambda: print(t), index=lambda: range(10)[t[1]], sync_if=lambda: 1 if t.any() else 0)
    for name, read in reads.items():
        with no_host_reads(monkeypatch), pytest.raises(HostRead):
            read()
            pytest.fail(f"{name}: not caught")
        monkeypatch.undo()
    with no_host_reads(monkeypatch):
        torch.repeat_interleave(t, t, output_size=6)
        (t + 1).view(2, 2)


def _backend_cfg(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    return dict(backend=backend)


# (backend, lens, shared_kv): every combination on 'torch'; two on the (slow) interpreter
LAYER_CASES = [(b, lens, shared) for b in ("torch",) for lens in ([9, 9], [3, 13, 8, 1]) for shared in (False, True)]
LAYER_CASES += [("triton", [9, 9], True), ("triton", [3, 13, 8, 1], False)]


def _layer_id(case):
    b, lens, shared = case
    return f"{b}-{'equal' if len(set(lens)) == 1 else 'mixed'}_lens-{'shared' if shared else 'indep'}_kv"


@pytest.mark.parametrize("backend,lens,shared_kv", LAYER_CASES, ids=[_layer_id(c) for c in LAYER_CASES])
def test_layer_decode_step_reads_no_device_values(backend, lens, shared_kv, monkeypatch):
    """Prefill, then steps crossing compression blocks (tiny config: kernel 8, stride 4; equal
    lengths complete blocks for all sequences or none, mixed ones for some): no host read in
    any step, and every step == the layer's full forward of each sequence alone (reference)."""
    torch.manual_seed(0)
    steps = 10
    m = make_layer(tiny(shared_kv=shared_kv, **_backend_cfg(backend)), dtype=torch.float32)
    xs = [torch.randn(1, L + steps, 64) for L in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    cache = m.new_cache()
    with torch.no_grad():
        m(torch.cat([xi[:, :L] for xi, L in zip(xs, lens)], 1), cache=cache, cu_seqlens=cu)
        ys, completed = [], []
        for s in range(steps):
            x = torch.cat([xi[:, L + s] for xi, L in zip(xs, lens)], 0).unsqueeze(1)
            with no_host_reads(monkeypatch):
                ys.append(m(x, cache=cache))
            monkeypatch.undo()
            completed.append(list(cache.completed))
    y = torch.cat(ys, 1)  # [N, steps, hidden]
    N = len(lens)
    assert any(c for c in completed), "no step completed a compression block"
    if len(set(lens)) > 1:
        assert any(0 < len(c) < N for c in completed), "no step completed blocks for only some sequences"
    else:
        assert any(len(c) == N for c in completed) and any(not c for c in completed)
    ref = make_layer(tiny(shared_kv=shared_kv), dtype=torch.float32)
    with torch.no_grad():
        for n, (xi, L) in enumerate(zip(xs, lens)):
            assert_close(f"seq {n}", ref(xi)[0, L:], y[n], 1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nsa_decode_reads_no_device_values(backend, monkeypatch):
    """nsa_decode called directly: no host read (value checks off by default), and the output
    equals the reference backend's."""
    _backend_cfg(backend)
    cfg = dict(kernel_size=8, stride=4, block_size=8, num_selected=4, window_size=16)
    pad, _, seq_lens = _build(4, 2, 16, 8, [1, 7, 8, 9, 33, 40], cfg, torch.float32)
    args = [pad[k] for k in ORDER]
    monkeypatch.delenv("NSA_DEBUG_CHECKS", raising=False)
    ref, ref_idx = nsa_decode(*args, seq_lens, backend="reference", return_block_indices=True, **cfg)
    with torch.no_grad():
        with no_host_reads(monkeypatch):
            o, idx = nsa_decode(*args, seq_lens, backend=backend, return_block_indices=True, **cfg)
            o2 = nsa_decode(*args, seq_lens, backend=backend, **cfg)  # second call: the cached plan
        monkeypatch.undo()
    assert_close("o", ref, o, 1e-5)
    assert_close("o (second call)", ref, o2, 1e-5)
    assert torch.equal(idx, ref_idx)
