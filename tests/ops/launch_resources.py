"""Compile every kernel launch of the library for sm_90 (H100/H200) without a GPU.

Run as a script by ``test_launch_resources.py`` in a fresh interpreter WITHOUT ``TRITON_INTERPRET``:
the launchers then take their GPU launch configs (``nsa.ops.utils.interpreting()`` is False) while
the tensors stay on the CPU. ``kernel[grid](*args, **kw)`` is replaced by a recorder, so nothing
runs; each distinct launch (as Triton's own binder specializes it) is compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and its shared memory is read from the
compiled metadata. Inputs that an earlier kernel would produce (lse, block indices, the fused
path's delta) are given in valid form (zeros; every causal block). No launcher makes a host-side
decision on a kernel's output, which stays uninitialized here (compressed attention's dK/dV
partials are summed by torch regardless: harmless).

usage: python launch_resources.py OUT_JSON [--full] [--workers N] [--ops OP,OP] [--case SUBSTR] [--ptxas]
                                 [--override KERNEL:JSON]
  --full      the whole shape matrix (default: the pruned one, see cases())
  --ops, --case  only these ops / the cases whose name contains SUBSTR (e.g. 'bfloat16 G=4 Dk=256')
  --ptxas     also run ptxas -v on each kernel (registers, spill bytes; slower)
  --override  launch keywords replacing those of every launch of KERNEL, e.g.
              'selected_bwd_dq_scatter_kernel:{"num_warps": 4, "num_stages": 3}' (the config
              before the fix of the H200 OutOfResources): checks that the test catches it
"""
from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import KernelInterface, create_function_from_signature  # noqa: E402

# sm_90 opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200; the
# H200 reported "Hardware limit: 232448" in triton.runtime.errors.OutOfResources)
SM90_SHARED_LIMIT = 232448
TARGET = GPUTarget("cuda", 90, 32)
OPTION_KEYS = ("num_warps", "num_stages", "maxnreg", "num_ctas")

# NSA paper settings: compression 32/16, selection blocks of 64, 16 selected, window 512
KS, ST, BS, NSEL, NUM_INIT, NUM_LOCAL, WIN = 32, 16, 64, 16, 1, 2, 512
T = 512  # tokens: 8 selection blocks, 31 compressed tokens (every path of every launcher runs)
H = 2  # KV heads (a constexpr only: no tile size depends on it)
OPS = ("compressed", "selection", "selected", "window", "gate", "decode", "rope")


def cases(full: bool = False) -> list[dict]:
    """The shape matrix: bf16 at head dims (Dk, Dv) in (128,128), (192,128), (256,256), (64,64) and
    group sizes G in 16, 4, 1; fp16 and fp32 at (128,128), G=4; fp32 at (192,128), G=16.

    ``full``: every bf16 pair x G (14 shapes, ~1.35x the compile time). Default: the pruned matrix
    (10 shapes) that still takes every launch-config branch of the launchers: the config choices
    depend on the dtype, the padded head widths (<= 256, <= 384, wider; max <= 128) and on G only
    through one position per tile (G = 16: gather walks, pipelined) or several (G < 16: scatter);
    G = 1 and G = 4 compiled to the same shared memory for every kernel (Triton 3.9) except the
    selection scores, which grow with G (G = 16 is their largest)."""
    bf16 = [((128, 128), (16, 4, 1)), ((192, 128), (16, 4)), ((256, 256), (16, 4)), ((64, 64), (4,))]
    if full:
        bf16 = [(dims, (16, 4, 1)) for dims, _ in bf16]
    out = [dict(dtype="bfloat16", G=g, Dk=dk, Dv=dv) for (dk, dv), gs in bf16 for g in gs]
    out.append(dict(dtype="float16", G=4, Dk=128, Dv=128))
    out.append(dict(dtype="float32", G=4, Dk=128, Dv=128))
    # float32 at the paper's wide head (2026-12-07, H100: the layer's float32 check at Dk/Dv
    # 192/128, G = 16, raised OutOfResources, 278528 bytes of shared memory)
    out.append(dict(dtype="float32", G=16, Dk=192, Dv=128))
    return out


def case_name(c: dict) -> str:
    return f"{c['dtype']} G={c['G']} Dk={c['Dk']} Dv={c['Dv']}"


# ------------------------------------------------------------------------------------------------
# Recording the launches
# ------------------------------------------------------------------------------------------------

_recorded: list = []


def _record(self, grid):
    def launch(*args, **kw):
        _recorded.append((self, args, kw))
    return launch


def _install_recorder():
    KernelInterface.__getitem__ = _record
    from nsa.ops import compressed
    compressed._num_sms = lambda device: 132  # H100 SXM and H200: 132 SMs (no CUDA here)


def _causal_block_indices(n_heads: int) -> torch.Tensor:
    """Valid selections int32 ``[1, T, H, NSEL]``: every causal block of the position (T has at most
    NSEL blocks), ascending, then -1."""
    assert T // BS <= NSEL
    t = torch.arange(T).view(T, 1, 1)
    j = torch.arange(NSEL).view(1, 1, NSEL)
    return torch.where(j <= t // BS, j, -1).expand(T, n_heads, NSEL).unsqueeze(0).to(torch.int32).contiguous()


def _fused_kwargs(fn, available: dict) -> dict:
    """The keyword arguments among ``available`` that launcher ``fn`` takes: what the fused NSA
    path (nsa.ops.fused) passes the branch backward launchers beyond the composed path's."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in available.items() if k in params}


def run_case(op: str, c: dict) -> list:
    """Calls the host launchers of ``op`` (forward and backward) at shape ``c``; returns the
    recorded launches as (label, kernel, args, kw). The backward launchers run as the composed
    path calls them and, where they take its extra arguments (``delta``, ``dq_a``/``dq_b``), as the fused
    NSA path calls them (other kernel specializations: delta given, not computed; dq of the other
    branches added)."""
    from nsa.ops import checks, compressed, decode_triton, gate, rotary, selected, selection, window
    dt = getattr(torch, c["dtype"])
    G, Dk, Dv = c["G"], c["Dk"], c["Dv"]
    HQ = H * G
    scale = Dk ** -0.5
    Tc = (T - KS) // ST + 1
    z = lambda *shape, dtype=dt: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    q, do = z(1, T, HQ, Dk), z(1, T, HQ, Dv)
    lse = z(1, T, HQ, dtype=torch.float32)
    # what the fused NSA path (nsa.ops.fused) passes the backward launchers beyond the composed path
    fused = dict(delta=z(1, T, HQ, dtype=torch.float32), dq_a=z(1, T, HQ, Dk), dq_b=z(1, T, HQ, Dk))
    labels = []

    def mark(label):
        labels.extend([label] * (len(_recorded) - len(labels)))

    _recorded.clear()
    if op == "compressed":
        kc, vc = z(1, Tc, H, Dk), z(1, Tc, H, Dv)
        compressed.compressed_attention_fwd(q, kc, vc, KS, ST, scale, None)
        mark("fwd")
        compressed.compressed_attention_bwd(q, kc, vc, do, lse, do, None, KS, ST, scale, None)
        mark("bwd")
        compressed.compressed_attention_bwd(q, kc, vc, do, lse, do, lse, KS, ST, scale, None)
        mark("bwd dlse")
        kw = _fused_kwargs(compressed.compressed_attention_bwd, fused)
        if kw:
            compressed.compressed_attention_bwd(q, kc, vc, do, lse, do, None, KS, ST, scale, None, **kw)
            mark("bwd fused")
    elif op == "selection":
        selection.selection_fwd(q, z(1, Tc, H, Dk), lse, KS, ST, BS, NSEL, NUM_INIT, NUM_LOCAL, scale, None)
        mark("fwd")
    elif op == "selected":
        k, v, bi = z(1, T, H, Dk), z(1, T, H, Dv), _causal_block_indices(H)
        saved = selected.FWD_MODE, selected.DQ_MODE, selected.FWD_TMA
        try:
            for mode in ("gather", "scatter"):
                selected.FWD_MODE = selected.DQ_MODE = mode
                selected._selected_fwd_op(q, k, v, bi, BS, scale, None)
                mark(f"fwd {mode}")
                if mode == "gather":
                    # "auto" (above) takes the TMA loads of the one-position tiles (G = 16, 16-bit);
                    # the pointer loads, its fallback (e.g. misaligned k/v), too
                    selected.FWD_TMA = False
                    selected._selected_fwd_op(q, k, v, bi, BS, scale, None)
                    mark("fwd gather no-tma")
                    selected.FWD_TMA = saved[2]
                selected._selected_bwd_op(q, k, v, do, lse, do, bi, BS, scale, None)
                mark(f"bwd dq={mode}")
                kw = _fused_kwargs(selected._launch_bwd, fused)
                if kw:
                    selected._selected_bwd_op(q, k, v, do, lse, do, bi, BS, scale, None, **kw)
                    mark(f"bwd dq={mode} fused")
        finally:
            selected.FWD_MODE, selected.DQ_MODE, selected.FWD_TMA = saved
        checks._block_indices_flags(bi, BS, None)  # the public op's validation pass
        mark("checks")
    elif op == "window":
        k, v = z(1, T, H, Dk), z(1, T, H, Dv)
        window._launch_fwd(q, k, v, WIN, scale, None)
        mark("fwd")
        if "gate" in inspect.signature(window._launch_fwd).parameters:
            # the fused NSA forward's launch: the gate combination in the epilogue
            window._launch_fwd(q, k, v, WIN, scale, None, gate=(do, do, lse, lse, lse))
            mark("fwd gated")
        window._launch_bwd(q, k, v, do, lse, do, WIN, scale, None)
        mark("bwd")
        kw = _fused_kwargs(window._launch_bwd, fused)
        if kw:
            window._launch_bwd(q, k, v, do, lse, do, WIN, scale, None, **kw)
            mark("bwd fused")
    elif op == "gate":
        xs = [z(1, T, HQ, Dv) for _ in range(3)] + [z(1, T, HQ) for _ in range(3)]
        gate.gate_combine_fwd(*xs, dt)
        mark("fwd")
        gate.gate_combine_bwd(do, *xs, [True] * 6)
        mark("bwd")
        if hasattr(gate, "gate_bwd_fused"):
            names = ("o_cmp", "o_slc", "o_win", "g_cmp", "g_slc", "g_win")
            args = dict(do=do, **dict(zip(names, xs)), **{f"lse_{x}": lse for x in ("cmp", "slc", "win")})
            gate.gate_bwd_fused(**_fused_kwargs(gate.gate_bwd_fused, args))
            mark("bwd fused")
    elif op == "decode":
        # a cache long enough for several compressed splits (NS_C > 1): with one, Triton's
        # specialization of integer arguments equal to 1 compiles a different kernel
        N, L = 2, 8192
        q1, Lc = z(N, HQ, Dk), (L - KS) // ST + 1
        kc, vc = z(N, Lc, H, Dk), z(N, Lc, H, Dv)
        ks, vs = z(N, L, H, Dk), z(N, L, H, Dv)
        kw, vw = z(N, WIN, H, Dk), z(N, WIN, H, Dv)
        g = [z(N, HQ) for _ in range(3)]
        decode_triton.decode_fwd(q1, kc, vc, ks, vs, kw, vw, *g, torch.full((N,), L, dtype=torch.int32),
                                 KS, ST, BS, NSEL, NUM_INIT, NUM_LOCAL, WIN, scale)
        mark("fwd")
        # the same step over page pools (nsa.ops.decode_paged): the PAGED specialization
        M = L // BS
        pool = lambda D, S=BS: z(N * M, S, H, D)  # noqa: E731
        table = torch.arange(N * M, dtype=torch.int32).view(N, M)
        decode_triton.decode_fwd(q1, pool(Dk, BS // ST), pool(Dv, BS // ST), pool(Dk), pool(Dv), pool(Dk), pool(Dv),
                                 *g, torch.full((N,), L, dtype=torch.int32), KS, ST, BS, NSEL, NUM_INIT, NUM_LOCAL,
                                 WIN, scale, page_table=table)
        mark("fwd paged")
        # the plan's variants (sorted top-n, per-tile block sums), dense and paged
        plan = decode_triton.default_plan(N, H, Lc, L // BS, WIN, BS, NSEL, q1.dtype)._replace(
            topk_sort=True, tile_sums=True)
        decode_triton.decode_fwd(q1, kc, vc, ks, vs, kw, vw, *g, torch.full((N,), L, dtype=torch.int32),
                                 KS, ST, BS, NSEL, NUM_INIT, NUM_LOCAL, WIN, scale, plan=plan)
        mark("fwd variants")
        decode_triton.decode_fwd(q1, pool(Dk, BS // ST), pool(Dv, BS // ST), pool(Dk), pool(Dv), pool(Dk), pool(Dv),
                                 *g, torch.full((N,), L, dtype=torch.int32), KS, ST, BS, NSEL, NUM_INIT, NUM_LOCAL,
                                 WIN, scale, plan=plan, page_table=table)
        mark("fwd variants paged")
        # the step's RoPE and cache writes in one launch (nsa.ops.decode_write), separate window keys
        from nsa.ops import decode_write
        raw = [z(N, H, D) for D in (Dk, Dv, Dk, Dv, Dk, Dv)]
        tail = [z(N, KS, H, D) for D in (Dk, Dv)]
        decode_write.decode_write(torch.full((N,), L - 1, dtype=torch.int32), 10000.0, q1, *raw, *tail, ks, vs,
                                  z(N, L, H, Dk), z(N, L, H, Dv))
        mark("step write")
        decode_write.decode_write(torch.full((N,), L - 1, dtype=torch.int32), 10000.0, q1, *raw, *tail, pool(Dk),
                                  pool(Dv), pool(Dk), pool(Dv), page_table=table)
        mark("step write paged")
    elif op == "rope":
        pos = torch.arange(T).view(1, T)
        rotary._launch(q, pos, 10000.0, 1)
        mark("fwd")
        rotary._launch(q, pos, 10000.0, -1)
        mark("bwd")
    else:
        raise ValueError(op)
    return [(lab, kern, args, kw) for lab, (kern, args, kw) in zip(labels, _recorded)]


# ------------------------------------------------------------------------------------------------
# Specializing and compiling
# ------------------------------------------------------------------------------------------------

_backend = None


def specialize(kern, args, kw):
    """(signature, constexprs, attrs, options) of a launch, as the JIT specializes it at a
    launch (Triton's binder: dtypes, int widths, 16-byte alignment / divisibility, constexprs)."""
    global _backend
    if _backend is None:
        _backend = make_backend(TARGET)
    binder = create_function_from_signature(kern.signature, kern.params, _backend)
    kw = dict(kw)
    options = {k: kw[k] for k in OPTION_KEYS if k in kw}
    bound, spec, _ = binder(*args, **kw)
    names = [p.name for p in kern.params]
    values = list(bound.values())
    signature = {n: s[0] for n, s in zip(names, spec)}
    constexprs = {(i,): values[i] for i, s in enumerate(spec) if s[0] == "constexpr"}
    attrs = {(i,): _backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str) and s[1]}
    return signature, constexprs, attrs, options


def _short(v):
    if isinstance(v, triton.language.dtype):
        return str(v)
    return v


def describe(kern, constexprs, options) -> str:
    """The launch config: num_warps / num_stages / maxnreg, then the constexprs."""
    names = [p.name for p in kern.params]
    opts = " ".join(f"{k}={v}" for k, v in options.items())
    consts = " ".join(f"{names[i[0]]}={_short(v)}" for i, v in constexprs.items() if v is not None)
    return f"{opts} | {consts}"


_unique: list = []  # (kernel, signature, constexprs, attrs, options), set before the workers fork
_ptxas = False


def _ptxas_info(ptx: str, options: dict) -> dict:
    """Registers and spill bytes from ptxas -v on the kernel's PTX (sm_90a)."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        tool = get_ptxas(TARGET.arch)  # Triton 3.9: the ptxas that Triton itself runs for sm_90
    except TypeError:
        tool = get_ptxas()
    ptxas = getattr(tool, "path", tool)
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", "--gpu-name=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"]
        if options.get("maxnreg"):
            cmd.append(f"--maxrregcount={options['maxnreg']}")
        err = subprocess.run(cmd, capture_output=True, text=True).stderr
    m = lambda pat: int(re.search(pat, err).group(1)) if re.search(pat, err) else -1  # noqa: E731
    return dict(regs=m(r"Used (\d+) registers"), spill_stores=m(r"(\d+) bytes spill stores"),
                spill_loads=m(r"(\d+) bytes spill loads"))


def compile_one(i: int) -> dict:
    kern, signature, constexprs, attrs, options = _unique[i]
    t0 = time.time()
    try:
        ck = triton.compile(ASTSource(kern, signature, constexprs, attrs), target=TARGET, options=options)
    except Exception as e:  # noqa: BLE001 (the test reports it)
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        return dict(index=i, ok=False, error=msg[-2000:], seconds=time.time() - t0)
    res = dict(index=i, ok=True, shared=int(ck.metadata.shared), seconds=time.time() - t0)
    if _ptxas:
        res.update(_ptxas_info(ck.asm["ptx"], options))
    return res


def launched_kernels() -> list[str]:
    """Every JIT function that a module of nsa.ops launches (``name[grid](...)`` in its source)."""
    import importlib
    import pkgutil

    import nsa.ops
    from triton.runtime.jit import JITFunction
    names = set()
    for info in pkgutil.iter_modules(nsa.ops.__path__):
        mod = importlib.import_module(f"nsa.ops.{info.name}")
        for name in re.findall(r"\b(\w+)\[", inspect.getsource(mod)):
            if isinstance(getattr(mod, name, None), JITFunction):
                names.add(name)
    return sorted(names)


def main():
    global _ptxas
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--ptxas", action="store_true")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--case", default="")
    ap.add_argument("--override", action="append", default=[])
    a = ap.parse_args()
    _ptxas = a.ptxas
    overrides = {}
    for o in a.override:
        name, js = o.split(":", 1)
        overrides[name] = json.loads(js)
    _install_recorder()
    import nsa.ops.triton_utils
    nsa.ops.triton_utils.COMPILE_AUDIT = True  # the GPU paths (TMA) for these CPU tensors
    t0 = time.time()
    launches, keys = [], {}
    for op in a.ops.split(","):
        for c in [c for c in cases(a.full) if a.case in case_name(c)]:
            for label, kern, args, kw in run_case(op, c):
                name = kern.fn.__name__
                kw = dict(kw, **overrides.get(name, {}))
                signature, constexprs, attrs, options = specialize(kern, args, kw)
                key = (kern.fn.__module__, name, repr(signature), repr(constexprs), repr(sorted(attrs)),
                       repr(sorted(options.items())))
                if key not in keys:
                    keys[key] = len(_unique)
                    _unique.append((kern, signature, constexprs, attrs, options))
                launches.append(dict(op=op, case=case_name(c), label=label, kernel=name, unique=keys[key],
                                     config=describe(kern, constexprs, options)))
    t_capture = time.time() - t0
    if a.workers > 1:  # forked workers inherit _unique
        with multiprocessing.get_context("fork").Pool(a.workers) as pool:
            compiled = pool.map(compile_one, range(len(_unique)), chunksize=1)
    else:
        compiled = [compile_one(i) for i in range(len(_unique))]
    compiled = {r["index"]: r for r in compiled}
    for launch in launches:
        launch.update({k: v for k, v in compiled[launch["unique"]].items() if k != "index"})
    with open(a.out, "w") as f:
        json.dump(dict(launches=launches, kernels=launched_kernels(), unique=len(_unique), capture_seconds=t_capture,
                       compile_seconds=time.time() - t0 - t_capture, limit=SM90_SHARED_LIMIT,
                       triton=triton.__version__), f, indent=1)


if __name__ == "__main__":
    main()
