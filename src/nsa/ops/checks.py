"""Input validation for the public ops: every invalid input becomes a ValueError naming the argument."""

from __future__ import annotations

import torch

from .utils import compressed_cu_seqlens, interpreting, num_compressed

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(msg: str):
    raise ValueError(msg)


def _in_functorch_transform() -> bool:
    """Inside torch.func.vmap / grad / jvp: tensors are wrappers whose values the host cannot read."""
    stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return stack is not None and stack() is not None


def skip_value_checks() -> bool:
    """The value checks read tensors on the host (a device synchronization). They are skipped
    under torch.compile, so graphs trace without breaks, while a CUDA graph is being captured
    (a decode step is captured after an eager, checked call), and inside torch.func transforms
    (wrapped tensors have no host values); shapes, dtypes and devices are still checked. Run
    eagerly once to validate values."""
    return (torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
            or _in_functorch_transform())


def check_tensor(name, t, ndim, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        _fail(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same(name, t, ref_name, ref, dtype=True):
    if t.device != ref.device:
        _fail(f"{name}: expected device {ref.device} like {ref_name}, got {t.device}")
    if dtype and t.dtype != ref.dtype:
        _fail(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {t.dtype}")


def check_positive_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        _fail(f"{name}: expected an int >= {minimum}, got {v!r}")


def check_scale(scale):
    if scale is None:
        return
    try:
        ok = not isinstance(scale, bool) and isinstance(scale, (int, float)) and 0 < float(scale) < float("inf")
    except OverflowError:  # an int beyond float range
        ok = False
    if not ok:
        _fail(f"scale: expected None or a positive finite float, got {scale!r}")


def check_qkv(q, k, v, same_len=True, names=("q", "k", "v")):
    """q ``[B, T, HQ, Dk]``, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``; returns (B, T, HQ, H).

    ``names``: the caller's argument names for (q, k, v), used in the messages.
    """
    nq, nk, nv = names
    check_tensor(nq, q, 4)
    check_tensor(nk, k, 4)
    check_tensor(nv, v, 4)
    check_same(nk, k, nq, q)
    check_same(nv, v, nq, q)
    B, T, HQ, Dk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        _fail(f"{nk}, {nv}: expected batch size {B} like {nq}, got {k.shape[0]} and {v.shape[0]}")
    if same_len and k.shape[1] != T:
        _fail(f"{nk}: expected {T} tokens like {nq}, got {k.shape[1]}")
    if v.shape[1] != k.shape[1]:
        _fail(f"{nv}: expected {k.shape[1]} tokens like {nk}, got {v.shape[1]}")
    H = k.shape[2]
    if H == 0 or HQ == 0 or HQ % H != 0:
        _fail(f"{nq}: number of query heads ({HQ}) must be a positive multiple of the KV heads of {nk} ({H})")
    if v.shape[2] != H:
        _fail(f"{nv}: expected {H} heads like {nk}, got {v.shape[2]}")
    if k.shape[3] != Dk:
        _fail(f"{nk}: expected head dim {Dk} like {nq}, got {k.shape[3]}")
    if Dk == 0 or v.shape[3] == 0:
        _fail(f"{nq}, {nv}: head dims must be positive")
    return B, T, HQ, H


def check_cu_seqlens(cu_seqlens, q):
    """Validates packed-sequence boundaries; returns the host list of boundaries or None."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        _fail(f"cu_seqlens: expected an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        _fail(f"cu_seqlens: expected an int32 1-D tensor of N+1 >= 2 offsets, got {cu_seqlens.dtype} "
              f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        _fail(f"cu_seqlens: expected device {q.device} like q, got {cu_seqlens.device}")
    if q.shape[0] != 1:
        _fail(f"q: packed input (cu_seqlens given) needs batch size 1, got {q.shape[0]}")
    if skip_value_checks():
        return None
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        _fail(f"cu_seqlens: must start at 0, got {cu[0]}")
    if any(b <= a for a, b in zip(cu[:-1], cu[1:])):
        _fail("cu_seqlens: must be strictly increasing (every sequence non-empty)")
    if cu[-1] != q.shape[1]:
        _fail(f"cu_seqlens: last offset {cu[-1]} must equal the number of tokens of q ({q.shape[1]})")
    return cu


def check_key_positions(q_offset, cu_seqlens_k, cu_seqlens, cu, q):
    """Validates where the queries sit among their keys: ``q_offset`` (dense input) or
    ``cu_seqlens_k`` (packed input: the raw keys' boundaries, each sequence at least as long as
    its queries). Returns the host list of key boundaries (None for dense input, for packed input
    without ``cu_seqlens_k``, or when values are not read)."""
    check_positive_int("q_offset", q_offset, 0)
    if cu_seqlens is not None and q_offset:
        _fail(f"q_offset: packed input (cu_seqlens given) takes each sequence's offset from cu_seqlens_k; "
              f"q_offset must be 0, got {q_offset}")
    if cu_seqlens_k is None:
        return None
    if cu_seqlens is None:
        _fail("cu_seqlens_k: needs cu_seqlens (the queries' boundaries); dense input takes q_offset")
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dtype != torch.int32 or cu_seqlens_k.dim() != 1:
        what = (f"{cu_seqlens_k.dtype} shape {tuple(cu_seqlens_k.shape)}" if isinstance(cu_seqlens_k, torch.Tensor)
                else type(cu_seqlens_k).__name__)
        _fail(f"cu_seqlens_k: expected an int32 1-D tensor like cu_seqlens, got {what}")
    if cu_seqlens_k.numel() != cu_seqlens.numel():
        _fail(f"cu_seqlens_k: expected {cu_seqlens.numel()} offsets like cu_seqlens, got {cu_seqlens_k.numel()}")
    if cu_seqlens_k.device != q.device:
        _fail(f"cu_seqlens_k: expected device {q.device} like q, got {cu_seqlens_k.device}")
    if cu is None:  # values unchecked (torch.compile, capture)
        return None
    ck = cu_seqlens_k.tolist()
    if ck[0] != 0:
        _fail(f"cu_seqlens_k: must start at 0, got {ck[0]}")
    for n in range(len(cu) - 1):
        if ck[n + 1] - ck[n] < cu[n + 1] - cu[n]:
            _fail(f"cu_seqlens_k: sequence {n} has {ck[n + 1] - ck[n]} keys, fewer than its "
                  f"{cu[n + 1] - cu[n]} queries (the queries are the last positions of their keys)")
    return ck


def check_key_tokens(name, k, T, q_offset, ck, cu_seqlens_k):
    """The raw keys ``k`` (dim 1) of queries of length T: ``q_offset + T`` tokens, or the last of
    the key boundaries ``ck`` (packed input with cu_seqlens_k; unchecked when not read)."""
    if cu_seqlens_k is not None and ck is None:
        return
    want = ck[-1] if ck is not None else q_offset + T
    if k.shape[1] != want:
        where = (f"cu_seqlens_k[-1] = {want}" if ck is not None else
                 f"q_offset + T = {q_offset} + {T}" if q_offset else f"T = {T} like q")
        _fail(f"{name}: expected {want} tokens ({where}), got {k.shape[1]}")


def check_compression(kernel_size, stride):
    check_positive_int("kernel_size", kernel_size)
    check_positive_int("stride", stride)
    if kernel_size % stride != 0:
        _fail(f"kernel_size: must be a multiple of stride ({stride}), got {kernel_size}")


def check_selection(kernel_size, stride, block_size, num_selected, num_initial, num_local):
    check_compression(kernel_size, stride)
    check_positive_int("block_size", block_size)
    if block_size % stride != 0:
        _fail(f"block_size: must be a multiple of stride ({stride}), got {block_size}")
    check_positive_int("num_selected", num_selected)
    check_positive_int("num_initial", num_initial, 0)
    check_positive_int("num_local", num_local, 0)
    if num_initial + num_local > num_selected:
        _fail(f"num_initial + num_local ({num_initial} + {num_local}) must not exceed num_selected ({num_selected})")


def check_compressed_kv(k_cmp, v_cmp, q, T, kernel_size, stride, cu_seqlens, cu, q_offset=0, cu_seqlens_k=None):
    """k_cmp/v_cmp must hold exactly the compressed tokens of the sequences' raw keys (q_offset + T
    tokens, or cu_seqlens_k's, default cu_seqlens's)."""
    if cu is None and cu_seqlens is not None:  # values unchecked under torch.compile
        return
    if cu is None:
        want = num_compressed(q_offset + T, kernel_size, stride)
    else:
        cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
        want = int(compressed_cu_seqlens(cu_k, kernel_size, stride)[-1].item())
    if k_cmp.shape[1] != want:
        what = "packed compressed tokens" if cu is not None else "compressed tokens"
        _fail(f"k_cmp: expected {want} {what} for kernel_size={kernel_size}, stride={stride} "
              f"and the key lengths, got {k_cmp.shape[1]}")


def check_lse(lse, q):
    check_tensor("lse", lse, 3, (torch.float32, torch.float64))
    if lse.device != q.device:
        _fail(f"lse: expected device {q.device} like q, got {lse.device}")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        _fail(f"lse: expected shape {tuple(q.shape[:3])} ([B, T, HQ]), got {tuple(lse.shape)}")


def check_gate(name, g, q):
    check_tensor(name, g, 3)
    if g.device != q.device:
        _fail(f"{name}: expected device {q.device} like q, got {g.device}")
    if tuple(g.shape) != tuple(q.shape[:3]):
        _fail(f"{name}: expected shape {tuple(q.shape[:3])} ([B, T, HQ]), got {tuple(g.shape)}")


def check_block_indices(block_indices, q, H, block_size, cu, q_offset=0, ck=None):
    """int32 ``[B, T, H, S]``; each entry -1 or a block of the query's own sequence (of its keys:
    ``q_offset + T`` tokens, or ``ck``'s); no repeats in a row."""
    check_tensor("block_indices", block_indices, 4, (torch.int32,))
    if block_indices.device != q.device:
        _fail(f"block_indices: expected device {q.device} like q, got {block_indices.device}")
    B, T = q.shape[:2]
    if tuple(block_indices.shape[:3]) != (B, T, H) or block_indices.shape[3] < 1:
        _fail(f"block_indices: expected shape [B={B}, T={T}, H={H}, S>=1], got {tuple(block_indices.shape)}")
    if skip_value_checks():
        return
    if block_indices.is_cuda or (interpreting() and block_indices.device.type == "cpu"):
        bad = _block_indices_flags(block_indices, block_size, cu, q_offset, ck)
    else:
        bad = _block_indices_flags_torch(block_indices, block_size, cu, q_offset, ck)
    if bad[0]:
        _fail("block_indices: entries must be -1 or a block index in [0, ceil(seq_len / block_size)) "
              "of the query's own sequence")
    if bad[1]:
        _fail("block_indices: a row lists the same block twice; entries must be distinct")


def _block_limits(T, block_size, cu, device, q_offset=0, ck=None):
    """Per query row: the number of blocks of its sequence's keys (``cu``, ``ck`` host lists of the
    queries' and keys' boundaries, or None: per batch row one sequence of q_offset + T keys)."""
    if cu is None:
        return torch.full((T,), -(-(q_offset + T) // block_size), device=device, dtype=torch.int32)
    ck = cu if ck is None else ck
    lens = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:])], device=device)
    klens = torch.tensor([b - a for a, b in zip(ck[:-1], ck[1:])], device=device)
    return torch.repeat_interleave(-(-klens // block_size), lens).to(torch.int32)


def _block_indices_flags_torch(bi, block_size, cu, q_offset=0, ck=None):
    """[any entry out of range, any row with a repeated block] with torch ops (CPU tensors)."""
    T = bi.shape[1]
    limit = _block_limits(T, block_size, cu, bi.device, q_offset, ck)
    out_of_range = (bi < -1) | (bi >= limit.view(1, T, 1, 1))
    # Rows in select_blocks' form (valid ids strictly ascending, then -1) cannot repeat an id:
    # only the other rows need a sort (one more host read when some row has another form).
    a, b = bi[..., :-1], bi[..., 1:]
    other_form = ~(((a >= 0) & (b > a)) | (b == -1))
    bad = torch.stack([out_of_range.any(), other_form.any()]).tolist()
    if bad[1]:
        srt = torch.sort(bi, dim=-1).values
        bad[1] = bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any())
    return bad


def _block_indices_flags(bi, block_size, cu, q_offset=0, ck=None):
    """The same two flags from one Triton pass over the rows (GPU, or CPU under the
    interpreter) and one host read: ~50x fewer bytes moved than sorting every row."""
    from ._validate import block_indices_flags
    B, T, H, S = bi.shape
    limit = None if cu is None else _block_limits(T, block_size, cu, bi.device, q_offset, ck)
    return block_indices_flags(bi.contiguous(), limit, -(-(q_offset + T) // block_size))
