"""The quantization math: one 2-D Linear weight in, the compressed-tensors tensors out.

Small pure functions, vectorized torch, device-agnostic (everything stays on the weight's device).
The output is byte-identical to what llm-compressor's ``model_free_ptq`` writes (an ``nn.Linear``
per weight, ``initialize_module_for_quantization``, a memoryless min-max observer,
``calculate_qparams`` and ``compress_module``), without building modules or observers:

* statistics: per tensor / channel / group / block max |w| (the float's bits without the sign,
  reduced as integers) or, for asymmetric schemes, min and max; one chunked pass;
* scale / zero point: compressed-tensors' ``calculate_qparams`` step for step on those small
  tensors, in the same dtypes: the scale is computed in the weight's dtype (fp32 after the
  TENSOR_GROUP global scale), rounded to ``scale_dtype`` if any, a zero scale becomes that dtype's
  eps (fp8: 0.125, uint8 MX exponent: 1.0, else ``finfo.eps``), and it is stored in the weight's
  dtype. The NVFP4 global scale is ``generate_gparam`` itself (``448·6 / amax`` in the weight
  dtype, which torch evaluates as ``reciprocal(amax) * 2688``);
* elementwise, over row chunks (cache-sized, on a pool of single-threaded workers on CPU; one
  chunk of up to 64M elements on accelerators): compressed-tensors' eager ``_quantize``.
  ``w / scale`` is computed in the promoted dtype of weight and scale (the weight's dtype for
  every scheme but TENSOR_GROUP, fp32 there), rounded to that dtype, then clamped and rounded
  (integers: ``torch.round``, half to even; FP8: the dtype cast, nearest even);
* FP4 / FP6 values are encoded with a 65536-entry table indexed by the 16-bit pattern of the
  scaled value (bf16 or fp16; an fp32 value is first narrowed to bf16 with round-to-odd, which
  keeps the later nearest-even rounding exact), then packed two nibbles per byte (FP4) or four
  6-bit codes per three bytes (FP6); integers are packed densely into int32 words.

On CUDA with Triton installed, compressed-tensors itself switches ``_quantize`` to a fused kernel
that divides in fp32 and never rounds the quotient to the weight dtype, so the reference's output
then differs from its CPU output for FP8 / INT schemes (measured on a bf16 N(0, 0.02) weight:
3% of FP8_DYNAMIC, 0.6% of W4A16 and 7% of W8A8 elements move by one step). NVFP4 divides in fp32
either way and MX scales are powers of two, so those should agree. This module always follows
the eager semantics: its output is the same on every device and equals the reference run on CPU.

Public API: :func:`compression_format`, :func:`output_layout`, :func:`needs_global_scale`,
:func:`global_scale`, :func:`quantize_weight`, :func:`dequantize_weight`, :class:`ShapeError`.
"""

from __future__ import annotations

import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import generate_gparam

__all__ = [
    "ShapeError",
    "compression_format",
    "output_layout",
    "needs_global_scale",
    "global_scale",
    "quantize_weight",
    "dequantize_weight",
]


class ShapeError(ValueError):
    """A weight's shape cannot be quantized with a scheme (raised before any byte is read)."""


# formats this module writes, by compressed-tensors' CompressionFormat value
_NAIVE = CompressionFormat.naive_quantized.value  # "naive-quantized"
_INT = CompressionFormat.int_quantized.value  # "int-quantized"
_FLOAT = CompressionFormat.float_quantized.value  # "float-quantized"
_PACK = CompressionFormat.pack_quantized.value  # "pack-quantized"
_NVFP4 = CompressionFormat.nvfp4_pack_quantized.value  # "nvfp4-pack-quantized"
_MXFP4 = CompressionFormat.mxfp4_pack_quantized.value  # "mxfp4-pack-quantized"
_MXFP8 = CompressionFormat.mxfp8_quantized.value  # "mxfp8-quantized"
_MXFP6 = getattr(CompressionFormat, "mxfp6_pack_quantized", None)
_MXFP6 = _MXFP6.value if _MXFP6 is not None else "mxfp6-pack-quantized"

_UNPACKED_FORMATS = (_NAIVE, _INT, _FLOAT, _MXFP8)  # "weight" in the quantized dtype
_FP4_FORMATS = (_NVFP4, _MXFP4)
_SUPPORTED_FORMATS = (*_UNPACKED_FORMATS, _PACK, *_FP4_FORMATS, _MXFP6)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MINMAX_OBSERVERS = (None, "minmax", "static_minmax", "memoryless_minmax")

# elements per row chunk of the elementwise pass, per CPU thread: each thread's share of a chunk
# stays in cache, and per-op overhead (one parallel region per op) does not matter; accelerators
# take up to _GPU_CHUNK elements at once (64M: a 14336x4096 weight in one go)
_CPU_CHUNK = 1 << 19
_GPU_CHUNK = 1 << 26


# ----------------------------------------------------------------------------------------------
# scheme → spec
# ----------------------------------------------------------------------------------------------


def compression_format(scheme: QuantizationScheme) -> str:
    """The CompressionFormat value compress_module uses for an nn.Linear with this scheme."""
    if scheme.format is not None:
        return CompressionFormat(scheme.format).value
    from compressed_tensors.compressors.format import infer_module_format

    return CompressionFormat(infer_module_format(torch.nn.Linear, scheme)).value


@dataclass(frozen=True)
class _Spec:
    fmt: str
    args: QuantizationArgs
    strategy: str
    num_bits: int
    is_float: bool
    symmetric: bool
    group_size: int | None
    block: tuple[int, int] | None
    tensor_group: bool

    @property
    def uses_global_scale_in_quantize(self) -> bool:
        # NVFP4/MXFP4 compressors pass the global scale to quantize; the others ignore it
        return self.tensor_group and self.fmt in _FP4_FORMATS


def _spec(scheme: QuantizationScheme) -> _Spec:
    args = scheme.weights
    if args is None:
        raise ValueError("scheme has no weight quantization (scheme.weights is None)")
    if args.dynamic is not False:
        raise ValueError(f"dynamic weight quantization (dynamic={args.dynamic!r}) writes no scales")
    if args.observer not in _MINMAX_OBSERVERS:
        raise ValueError(
            f"weight observer {args.observer!r} is not supported: only the min-max observer is "
            "data-free and deterministic (leave `observer` unset)"
        )
    fmt = compression_format(scheme)
    if fmt not in _SUPPORTED_FORMATS:
        raise ValueError(f"compression format {fmt!r} is not supported (expected one of {_SUPPORTED_FORMATS})")
    strategy = QuantizationStrategy(args.strategy).value
    if strategy in (QuantizationStrategy.TOKEN.value, QuantizationStrategy.ATTN_HEAD.value):
        raise ValueError(f"strategy {strategy!r} cannot be applied to weights")
    is_float = QuantizationType(args.type) == QuantizationType.FLOAT
    bits = int(args.num_bits)
    if is_float and bits not in (4, 6, 8):
        raise ValueError(f"float quantization with num_bits={bits} is not supported (4, 6 or 8)")
    if is_float and not args.symmetric:
        # compressed-tensors refuses FP4/FP6; for FP8 it writes an fp8 zero point that vLLM cannot
        # load and NaN for every all-zero channel/group
        raise ValueError(f"asymmetric FP{bits} quantization is not supported (use symmetric=True)")
    if not is_float and not 1 <= bits <= 8:
        raise ValueError(f"integer quantization with num_bits={bits} is not supported (1..8)")
    if fmt == _PACK and is_float:
        raise ValueError("pack-quantized format holds integer weights only")
    if fmt in _FP4_FORMATS and not (is_float and bits == 4):
        raise ValueError(f"{fmt} holds FP4 weights only")
    if fmt == _MXFP6 and not (is_float and bits == 6):
        raise ValueError(f"{fmt} holds FP6 weights only")
    if fmt in _UNPACKED_FORMATS and is_float and bits != 8:
        raise ValueError(f"{fmt} cannot hold FP{bits} weights (use a packed format)")
    if fmt == _MXFP8 and not (is_float and bits == 8):
        raise ValueError(f"{fmt} holds FP8 weights only")
    block = tuple(int(v) for v in args.block_structure) if args.block_structure is not None else None
    if strategy == QuantizationStrategy.BLOCK.value and (block is None or len(block) != 2):
        raise ValueError("block strategy needs a block_structure [rows, cols]")
    gs = int(args.group_size) if args.group_size is not None else None
    if strategy in (QuantizationStrategy.GROUP.value, QuantizationStrategy.TENSOR_GROUP.value):
        if gs is None or gs <= 0:
            raise ValueError(f"{strategy} strategy needs a positive group_size")
    return _Spec(
        fmt=fmt,
        args=args,
        strategy=strategy,
        num_bits=bits,
        is_float=is_float,
        symmetric=bool(args.symmetric),
        group_size=gs,
        block=block,
        tensor_group=strategy == QuantizationStrategy.TENSOR_GROUP.value,
    )


def needs_global_scale(scheme: QuantizationScheme) -> bool:
    """TENSOR_GROUP strategy (NVFP4 style): a fp32 global scale shared by fused weights."""
    w = scheme.weights
    return w is not None and QuantizationStrategy(w.strategy) == QuantizationStrategy.TENSOR_GROUP


def _scheme_label(spec: _Spec) -> str:
    if spec.strategy in ("group", "tensor_group"):
        return f"{spec.strategy} quantization with group_size {spec.group_size}"
    if spec.strategy == "block":
        return f"block quantization with block_structure {list(spec.block)}"
    return f"{spec.strategy} quantization"


def _scale_shape(spec: _Spec, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) != 2:
        raise ShapeError(
            f"weight of shape {list(shape)} is not 2-D; only Linear weights (out, in) can be "
            "quantized: ignore this module with --ignore"
        )
    rows, cols = shape
    if rows <= 0 or cols <= 0:
        raise ShapeError(f"weight of shape {list(shape)} is empty: ignore this module with --ignore")
    s = spec.strategy
    if s == "tensor":
        return (1,)
    if s == "channel":
        return (rows, 1)
    if s in ("group", "tensor_group"):
        gs = spec.group_size
        if cols % gs:
            raise ShapeError(
                f"weight of shape {list(shape)}: in_features {cols} is not divisible by "
                f"group_size {gs} ({_scheme_label(spec)}); ignore this module with --ignore "
                f"or use a scheme whose group size divides {cols}"
            )
        return (rows, cols // gs)
    if s == "block":
        bh, bw = spec.block
        return (-(-rows // bh), -(-cols // bw))
    raise ValueError(f"unsupported strategy {s!r}")


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    # initialize_qparams: scales are stored in the weight's dtype when it is a float dtype
    return dtype if dtype in _FLOAT_DTYPES else torch.float16


def output_layout(
    shape: Sequence[int], dtype: torch.dtype, scheme: QuantizationScheme
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of what :func:`quantize_weight` returns, computing nothing.

    Raises :class:`ShapeError` when a weight of this shape cannot be quantized by the scheme.
    """
    spec = _spec(scheme)
    shape = tuple(int(v) for v in shape)
    if dtype not in _FLOAT_DTYPES:
        raise ShapeError(
            f"weight of shape {list(shape)} is {dtype}, not a float dtype; only float weights can "
            "be quantized: ignore this module with --ignore"
        )
    sshape = _scale_shape(spec, shape)
    rows, cols = shape
    pdt = _param_dtype(dtype)
    args = spec.args
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    if spec.fmt in _UNPACKED_FORMATS:
        out["weight"] = (args.pytorch_dtype(), shape)
    elif spec.fmt == _PACK:
        out["weight_packed"] = (torch.int32, (rows, -(-cols * spec.num_bits // 32)))
    elif spec.fmt in _FP4_FORMATS:
        if cols % 2:
            raise ShapeError(
                f"weight of shape {list(shape)}: in_features {cols} must be even to pack FP4 "
                "values two per byte; ignore this module with --ignore"
            )
        out["weight_packed"] = (torch.uint8, (rows, cols // 2))
    elif spec.fmt == _MXFP6:
        if cols % 4:
            raise ShapeError(
                f"weight of shape {list(shape)}: in_features {cols} must be a multiple of 4 to "
                "pack FP6 values; ignore this module with --ignore"
            )
        out["weight_packed"] = (torch.uint8, (rows, cols * 3 // 4))

    if spec.fmt == _NVFP4:
        out["weight_scale"] = (args.scale_dtype or torch.float8_e4m3fn, sshape)
    elif spec.fmt in (_MXFP4, _MXFP6, _MXFP8):
        out["weight_scale"] = (args.scale_dtype or torch.uint8, sshape)
    else:
        out["weight_scale"] = (pdt, sshape)

    if not spec.symmetric:
        if spec.fmt == _PACK and spec.strategy in ("group", "channel"):
            out["weight_zero_point"] = (torch.int32, (-(-rows * spec.num_bits // 32), sshape[1]))
        else:
            out["weight_zero_point"] = (args.zp_dtype, sshape)
    if spec.tensor_group:
        out["weight_global_scale"] = (torch.float32, (1,))
    if spec.fmt == _PACK:
        out["weight_shape"] = (torch.int64, (2,))
    return out


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------

_INT_VIEW = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}


def _chunk_rows(rows: int, cols: int, device: torch.device, align: int = 1) -> int:
    target = _GPU_CHUNK if device.type != "cpu" else _CPU_CHUNK * (1 if _pool() else max(1, torch.get_num_threads()))
    n = max(1, target // max(cols, 1))
    n = max(align, n // align * align)
    return min(n, -(-rows // align) * align)


def _row_chunks(rows: int, step: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


# -- running chunks ------------------------------------------------------------------------------
#
# On CPU the chunks run on a small pool of worker threads whose torch ops are single-threaded,
# instead of one thread issuing ops that each open an OpenMP parallel region: a few hundred
# regions per weight, each ending in a barrier, collapse when another process (or the engine's
# own I/O threads) holds a core, while independent workers simply share what is free. Torch's
# intra-op thread count is per thread once a thread has run an op; workers set theirs to 1.

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _serial_worker() -> None:
    torch.set_num_threads(1)


def _pool() -> ThreadPoolExecutor | None:
    """The chunk workers for the calling thread's torch thread count (None: run serially)."""
    global _POOL, _POOL_SIZE
    n = torch.get_num_threads()
    if n <= 1:
        return None
    if _POOL is not None and _POOL_SIZE == n:
        return _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != n:
            pool = ThreadPoolExecutor(n, thread_name_prefix="streamer-quantize", initializer=_serial_worker)
            barrier = threading.Barrier(n)
            for f in [pool.submit(barrier.wait) for _ in range(n)]:  # start every worker now
                f.result()
            # set_num_threads(1) in the workers also changed the default that threads starting
            # later inherit: give it back (this thread already runs with n)
            torch.set_num_threads(n)
            old, _POOL, _POOL_SIZE = _POOL, pool, n
            if old is not None:
                old.shutdown(wait=False)
    return _POOL


def _scratch() -> "_Scratch":
    """This thread's reusable CPU buffers (a few chunk-sized tensors, kept between calls)."""
    s = getattr(_LOCAL, "scratch", None)
    if s is None:
        s = _LOCAL.scratch = _Scratch()
    return s


def _run(fn: Callable, items: Iterable, device: torch.device) -> list:
    """fn(item, scratch) for every item: on the CPU workers, or serially (accelerators, one
    thread, one item) with fresh buffers on accelerators."""
    items = list(items)
    if device.type != "cpu":
        scratch = _Scratch()
        return [fn(it, scratch) for it in items]
    pool = _pool() if len(items) > 1 else None
    if pool is None:
        return [fn(it, _scratch()) for it in items]
    return list(pool.map(lambda it: fn(it, _scratch()), items))


def _abs_max(w: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Per tensor / channel / group / block max |w|, in w's dtype, shaped like the scale.

    Equals the observer's max(|min(min_vals, 0)|, |max(max_vals, 0)|) exactly: |x| of a float
    is its bit pattern without the sign bit, and non-negative floats order like those integers.
    One pass over row chunks (aligned to the block height for block strategy).
    """
    rows, cols = w.shape
    ity, mask = _INT_VIEW[w.dtype]
    wi = w.view(ity)
    s = spec.strategy
    bh, bw = spec.block if s == "block" else (1, 1)
    step = _chunk_rows(rows, cols, w.device, align=bh)
    chunks = list(enumerate(_row_chunks(rows, step)))
    out = torch.empty(_scale_shape(spec, (rows, cols)) if s != "tensor" else (len(chunks),),
                      dtype=ity, device=w.device)

    def one(item, scratch):
        i, (r0, r1) = item
        n = r1 - r0
        a = scratch.get("absbits", ity, (n, cols), w.device)
        torch.bitwise_and(wi[r0:r1], mask, out=a)
        if s == "tensor":
            torch.amax(a, out=out[i])
        elif s == "channel":
            torch.amax(a, dim=1, keepdim=True, out=out[r0:r1])
        elif s in ("group", "tensor_group"):
            gs = spec.group_size
            torch.amax(a.view(n, cols // gs, gs), dim=-1, out=out[r0:r1])
        else:  # block: max over each block row's rows, then over each block column
            nb = -(-n // bh)
            full = n // bh
            r = scratch.get("blockrows", ity, (nb, cols), w.device)
            if full:
                torch.amax(a[: full * bh].view(full, bh, cols), dim=1, out=r[:full])
            if n % bh:
                torch.amax(a[full * bh :], dim=0, keepdim=True, out=r[full:])
            fc = cols // bw
            o = out[r0 // bh : r0 // bh + nb]
            if fc:
                torch.amax(r[:, : fc * bw].view(nb, fc, bw), dim=-1, out=o[:, :fc])
            if cols % bw:
                o[:, fc:] = torch.amax(r[:, fc * bw :], dim=1, keepdim=True)

    _run(one, chunks, w.device)
    if s == "tensor":
        out = torch.amax(out).reshape(1)
    return out.view(w.dtype)


def _min_max(w: torch.Tensor, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor / channel / group / block (min, max) as the observer computes them."""
    rows, cols = w.shape
    s = spec.strategy
    if s == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if s == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if s in ("group", "tensor_group"):
        g = w.view(rows, cols // spec.group_size, spec.group_size)
        return g.amin(dim=-1), g.amax(dim=-1)
    if s == "block":
        bh, bw = spec.block
        pr, pc = (-rows) % bh, (-cols) % bw
        # zero padding as the observer does (it cannot change min(·, 0) / max(·, 0))
        p = torch.nn.functional.pad(w, (0, pc, 0, pr)) if pr or pc else w
        nbr, nbc = p.shape[0] // bh, p.shape[1] // bw
        b = p.reshape(nbr, bh, nbc, bw)
        return b.amin(dim=(1, 3)), b.amax(dim=(1, 3))
    raise ValueError(f"unsupported strategy {s!r}")


# ----------------------------------------------------------------------------------------------
# global scale and qparams
# ----------------------------------------------------------------------------------------------


def _tensor_abs_max(w: torch.Tensor) -> torch.Tensor:
    """max |w| over the whole tensor, 0-dim, in w's dtype (chunked, no full-size temporary)."""
    w = w.contiguous()
    ity, mask = _INT_VIEW[w.dtype]
    wi = w.view(ity).reshape(w.shape[0], -1) if w.ndim >= 2 else w.view(ity).reshape(1, -1)
    rows, cols = wi.shape

    def one(rr, scratch):
        a = scratch.get("absbits", ity, (rr[1] - rr[0], cols), w.device)
        return torch.amax(torch.bitwise_and(wi[rr[0] : rr[1]], mask, out=a))

    maxes = _run(one, _row_chunks(rows, _chunk_rows(rows, cols, w.device)), w.device)
    return torch.amax(torch.stack(maxes)).view(w.dtype)


def _gparam(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' generate_gparam(-amax, amax) (NVFP4: 448 · 6 / amax), fp32 (1,)."""
    amax = amax.reshape(1)
    return generate_gparam(-amax, amax)


def global_scale(weights: Sequence[torch.Tensor], scheme: QuantizationScheme) -> torch.Tensor:
    """The fp32 (1,) global scale shared by a fused set (q/k/v, gate/up, ...).

    As the reference's observer: the max |w| over every member (in the weights' dtype, promoted
    like torch.max when members differ), then compressed-tensors' generate_gparam
    (448 · 6 / amax in that dtype, zero → 1.0), stored as float32.
    """
    if not weights:
        raise ValueError("global_scale needs at least one weight")
    amax = None
    for w in weights:
        if w.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"cannot quantize a {w.dtype} weight (expected a float dtype)")
        m = _tensor_abs_max(w)
        amax = m if amax is None else torch.maximum(amax, m.to(amax.device))
    return _gparam(amax)


def _round_to_dtype(x: torch.Tensor, dtype: torch.dtype, keep_dtype: bool = True) -> torch.Tensor:
    """compressed-tensors' round_to_quantized_type_dtype."""
    if dtype.is_floating_point:
        fi = torch.finfo(dtype)
        r = torch.clamp(x, fi.min, fi.max).to(dtype)
    else:
        ii = torch.iinfo(dtype)
        r = torch.round(torch.clamp(x, ii.min, ii.max)).to(dtype)
    return r.to(x.dtype) if keep_dtype else r


def _dtype_eps(dtype: torch.dtype) -> float:
    """compressed-tensors' _get_dtype_eps: what a zero scale becomes."""
    if dtype == torch.float8_e4m3fn:
        return 0.125
    if dtype.is_floating_point:
        return torch.finfo(dtype).eps
    return 1


def _calculate_qparams(
    spec: _Spec,
    amax: torch.Tensor | None,
    mins: torch.Tensor | None,
    maxs: torch.Tensor | None,
    gscale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """compressed-tensors' calculate_qparams, step for step and in the same dtypes.

    Symmetric schemes pass ``amax`` (max |w| per scale, in the weight dtype), asymmetric ones the
    observer's ``mins`` / ``maxs``. Mixed-dtype products are written with an explicit upcast
    (same values, much faster on CPU than TensorIterator's casting loops).
    """
    args = spec.args
    ref = amax if amax is not None else mins
    dtype, device = ref.dtype, ref.device
    q_lo, q_hi = _q_range(spec)
    bit_min = torch.tensor(q_lo, device=device)  # float32, as calculate_range makes them
    bit_max = torch.tensor(q_hi, device=device)
    bit_range = bit_max - bit_min
    zp = None
    if spec.symmetric:
        if _is_mx(spec):
            from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

            scales = generate_mx_scales(x=amax, num_bits=spec.num_bits)
        else:
            scales = amax / (bit_range.to(dtype) / 2)
    else:
        mins = torch.minimum(mins, torch.zeros_like(mins))
        maxs = torch.maximum(maxs, torch.zeros_like(maxs))
        scales = (maxs - mins) / bit_range.to(dtype)
        zp = torch.clamp(bit_min - (mins / scales), bit_min, bit_max)
    if gscale is not None:  # global_scale * scales, promoted to float32
        gt = torch.promote_types(gscale.dtype, scales.dtype)
        scales = scales.to(gt) * gscale.to(gt)
    if args.scale_dtype is not None:
        scales = _round_to_dtype(scales, args.scale_dtype)
    if _is_mx(spec):  # maybe_convert_from_mx_exp: E8M0 exponent -> power of two
        scales = (2.00 ** (scales.to(torch.int32) - 127).to(torch.float)).to(scales.dtype)
    eps = _dtype_eps(args.scale_dtype if args.scale_dtype is not None else scales.dtype)
    scales = torch.where(scales == 0, torch.tensor(eps, dtype=scales.dtype, device=device), scales)
    if zp is not None:
        zp = _round_to_dtype(zp, args.zp_dtype, keep_dtype=False)
    if scales.ndim == 0:
        scales = scales.reshape(1)
        zp = zp.reshape(1) if zp is not None else None
    return scales, zp


def _is_mx(spec: _Spec) -> bool:
    """compressed-tensors' should_generate_mx_scales."""
    a = spec.args
    return spec.is_float and spec.num_bits in (4, 6, 8) and a.group_size == 32 and a.scale_dtype == torch.uint8


def _qparams(
    spec: _Spec, w: torch.Tensor, gscale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(weight_scale, weight_zero_point or None, weight_global_scale or None, |w| max per scale
    or None) as the module parameters hold them after observer calibration.

    A TENSOR_GROUP weight without a fused ``gscale`` gets its own, from the max of its group
    statistics (what the observer does when the weight belongs to no fused set).
    """
    amax = mins = maxs = None
    if spec.symmetric:
        amax = _abs_max(w, spec)
    else:
        mins, maxs = _min_max(w, spec)
    if spec.tensor_group and gscale is None:
        gscale = _gparam(amax.max() if amax is not None else torch.maximum(maxs.max(), -mins.min()))
    scale, zp = _calculate_qparams(spec, amax, mins, maxs, gscale)
    # update_offload_parameter copies into parameters created in the weight's dtype (scale)
    # and in zp_dtype (zero point)
    scale = scale.to(_param_dtype(w.dtype))
    if zp is not None:
        zp = zp.to(spec.args.zp_dtype)
    return scale, zp, gscale, amax


# ----------------------------------------------------------------------------------------------
# FP4 / FP6 code tables
# ----------------------------------------------------------------------------------------------

_LUTS: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}


def _fp4_nibbles(v: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' cast_to_fp4 + pack_fp4_to_uint8 nibble for each value (exact).

    Clamp to ±6, round to nearest even on {0, .5, 1, 1.5, 2, 3, 4, 6}; the sign bit (bit 3) is set
    when the value is < 0 (so -0.0 gives +0, a tiny negative gives -0).
    """
    a = v.abs()
    code = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    ).to(torch.uint8)
    return code | ((v < 0).to(torch.uint8) << 3)


# E2M3 magnitudes in code order (compressed-tensors' kE2M3ToFloat)
_E2M3 = [m / 8 for m in range(8)] + [(1 + m / 8) * 2**e for e in range(3) for m in range(8)]


def _fp6_codes(v: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' clamp(±7.5) + cast_to_fp6 + pack code for each value (exact).

    Nearest even on the E2M3 grid; the sign bit (bit 5) is the sign bit of the value, so -0.0
    and tiny negatives give 0x20.
    """
    x = v.float().clamp(-7.5, 7.5)
    a = x.abs()
    exp = (((a.view(torch.int32) >> 23) & 0xFF) - 127).clamp(min=0)
    step = torch.exp2(exp - 3.0)
    r = torch.round(a / step).mul_(step).clamp_(max=7.5)
    table = torch.tensor(_E2M3, dtype=torch.float32, device=v.device)
    code = torch.searchsorted(table, r).to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 5)


def _lut(kind: str, key_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = (kind, key_dtype, str(device))
    t = _LUTS.get(k)
    if t is None:
        vals = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(key_dtype).float()
        t = (_fp4_nibbles(vals) if kind == "fp4" else _fp6_codes(vals)).to(device)
        _LUTS[k] = t
    return t


def _key16(v: torch.Tensor, scratch: "_Scratch | None" = None) -> tuple[torch.Tensor, torch.dtype]:
    """A non-negative int32 16-bit key of each value (flat) and the dtype those 16 bits encode.

    bf16 / fp16 values are their own bit pattern; fp32 values are narrowed to bf16 with
    round-to-odd (truncate, then set the last bit if anything nonzero was dropped). bf16 keeps
    8 bits of precision and FP4/FP6 need at most 4, so nearest-even rounding of the narrowed
    value lands where rounding of the fp32 value does (the classic round-to-odd argument), the
    sign survives, and a nonzero value never becomes zero.
    """
    scratch = scratch or _Scratch()
    n = v.numel()
    key = scratch.get("key", torch.int32, (n,), v.device)
    if v.dtype in (torch.bfloat16, torch.float16):
        key.copy_(v.reshape(-1).view(torch.int16))
        return key.bitwise_and_(0xFFFF), v.dtype
    if v.dtype != torch.float32:
        v = v.float()  # float64: only reached through the generic path
    u = v.reshape(-1).view(torch.int32)
    sticky = scratch.get("sticky", torch.int32, (n,), v.device)
    torch.bitwise_and(u, 0xFFFF, out=sticky).clamp_(max=1)
    torch.bitwise_right_shift(u, 16, out=key)
    return key.bitwise_or_(sticky).bitwise_and_(0xFFFF), torch.bfloat16


def _encode(v: torch.Tensor, kind: str, scratch: "_Scratch | None" = None) -> torch.Tensor:
    """FP4 nibble / FP6 code (uint8) of each value of v (any shape), flat."""
    if v.dtype == torch.float64:
        return (_fp4_nibbles(v) if kind == "fp4" else _fp6_codes(v)).reshape(-1)
    scratch = scratch or _Scratch()
    key, kdt = _key16(v.contiguous(), scratch)
    codes = scratch.get("codes", torch.uint8, (key.numel(),), v.device)
    return torch.index_select(_lut(kind, kdt, v.device), 0, key, out=codes)


def _pack_nibbles(n: torch.Tensor) -> torch.Tensor:
    """(rows, 2k) uint8 values < 16 -> (rows, k) bytes, even column in the low nibble."""
    rows, cols = n.shape
    if sys.byteorder == "little":
        w = n.contiguous().view(torch.int16)
        return torch.bitwise_or(w, torch.bitwise_right_shift(w, 4)).to(torch.uint8).view(rows, cols // 2)
    p = n.view(rows, cols // 2, 2)
    return p[..., 0] | (p[..., 1] << 4)


def _pack_fp6(c: torch.Tensor) -> torch.Tensor:
    """(rows, 4k) 6-bit codes -> (rows, 3k) bytes, four codes little-endian in three bytes."""
    rows, cols = c.shape
    c = c.view(rows, cols // 4, 4).to(torch.int32)
    word = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)
    packed = torch.stack([word, word >> 8, word >> 16], dim=-1) & 0xFF
    return packed.to(torch.uint8).reshape(rows, cols * 3 // 4)


# ----------------------------------------------------------------------------------------------
# integer packing (compressed-tensors' pack_to_int32 layout: element i at bit i·bits, dense)
# ----------------------------------------------------------------------------------------------


def _pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32(q, bits) for a (rows, cols) int8 tensor of values in
    [-2^(bits-1), 2^(bits-1)): element i of a row at bit i·bits of the row's int32 words, stored
    with the 2^(bits-1) offset, zero-padded to ceil(cols·bits/32) words."""
    rows, cols = q.shape
    words = -(-cols * bits // 32)
    off = 1 << (bits - 1)
    if sys.byteorder != "little":  # pragma: no cover - the library's packer is layout-agnostic
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        return pack_to_int32(q, bits)
    if bits in (8, 4):
        per = 32 // bits  # values per word
        pad = (-cols) % per
        if pad:  # -off packs to all-zero bits, as the library's zero padding of q + off
            q = torch.nn.functional.pad(q, (0, pad), value=-off)
        if bits == 8:  # q + 128 as a byte is q's byte with the top bit flipped
            b = q.contiguous().view(torch.uint8) ^ 0x80
        else:  # (q + 8) mod 16 is q's low nibble with bit 3 flipped; pairs of bytes -> one byte
            p = q.contiguous().view(torch.int16) ^ 0x0808
            b = ((p & 0x000F) | ((p >> 4) & 0x00F0)).to(torch.uint8)
        return b.view(rows, -1).view(torch.int32)
    u = q.to(torch.int32) + off
    if bits in (2, 1):
        per = 8 // bits  # values per byte
        pad = (-cols) % (4 * per)
        if pad:
            u = torch.nn.functional.pad(u, (0, pad))
        g = u.view(rows, -1, per)
        acc = g[..., 0].clone()
        for j in range(1, per):
            acc |= g[..., j] << (bits * j)
        return acc.to(torch.uint8).view(rows, -1).view(torch.int32)[:, :words]
    # 3, 5, 6, 7 bits: eight values fill `bits` bytes exactly
    pad = (-cols) % 32
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    g = u.view(rows, -1, 8).to(torch.int64)
    acc = g[..., 0].clone()
    for j in range(1, 8):
        acc |= g[..., j] << (bits * j)
    b = acc.view(torch.uint8).view(rows, -1, 8)[..., :bits]
    return b.reshape(rows, -1).view(torch.int32)[:, :words]


# ----------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------


class _Chunk:
    """One row slice of the weight with its scale / zero point broadcast to it."""

    __slots__ = ("r0", "r1", "x", "s", "z")

    def __init__(self, r0, r1, x, s, z):
        self.r0, self.r1, self.x, self.s, self.z = r0, r1, x, s, z


def _chunks(w: torch.Tensor, spec: _Spec, scale: torch.Tensor, zp: torch.Tensor | None) -> Iterator[_Chunk]:
    """Row chunks of w viewed so that ``x / s`` broadcasts like compressed-tensors' quantize."""
    rows, cols = w.shape
    s = spec.strategy
    if s == "block":
        bh, bw = spec.block
        # scale (nbr, nbc) -> (nbr, cols): each block's scale repeated over its columns
        sc = scale.repeat_interleave(bw, dim=1)[:, :cols]
        zc = zp.repeat_interleave(bw, dim=1)[:, :cols] if zp is not None else None
        step = _chunk_rows(rows, cols, w.device, align=bh)
        for r0, r1 in _row_chunks(rows, step):
            b0 = r0 // bh
            n_full = (r1 - r0) // bh
            if n_full:
                e = r0 + n_full * bh
                yield _Chunk(
                    r0, e,
                    w[r0:e].view(n_full, bh, cols),
                    sc[b0 : b0 + n_full].unsqueeze(1),
                    zc[b0 : b0 + n_full].unsqueeze(1) if zc is not None else None,
                )
                r0, b0 = e, b0 + n_full
            if r0 < r1:  # partial last block row
                yield _Chunk(
                    r0, r1, w[r0:r1], sc[b0 : b0 + 1], zc[b0 : b0 + 1] if zc is not None else None
                )
        return
    step = _chunk_rows(rows, cols, w.device)
    for r0, r1 in _row_chunks(rows, step):
        x = w[r0:r1]
        if s in ("group", "tensor_group"):
            gs = spec.group_size
            x = x.view(r1 - r0, cols // gs, gs)
            yield _Chunk(r0, r1, x, scale[r0:r1].unsqueeze(-1), zp[r0:r1].unsqueeze(-1) if zp is not None else None)
        elif s == "channel":
            yield _Chunk(r0, r1, x, scale[r0:r1], zp[r0:r1] if zp is not None else None)
        else:  # tensor
            yield _Chunk(r0, r1, x, scale, zp)


class _Scratch:
    """Reusable per-call buffers (one weight's chunks all fit the first chunk's size)."""

    def __init__(self):
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, shape, device) -> torch.Tensor:
        n = math.prod(shape)
        b = self.bufs.get((name, dtype))
        if b is None or b.numel() < n or b.device != device:
            b = torch.empty(n, dtype=dtype, device=device)
            self.bufs[(name, dtype)] = b
        return b[:n].view(shape)


def _scaled(c: _Chunk, gscale: torch.Tensor | None, scratch: _Scratch) -> torch.Tensor:
    """x / scale (+ zp) in the promoted dtype, as compressed-tensors' eager _quantize.

    A mixed-dtype division (bf16 weight, fp32 scale: TENSOR_GROUP) is written as an explicit
    upcast of x followed by the division: the same values, without the slow casting loop.
    """
    s = c.s
    if gscale is not None:
        s = s / gscale
    x = c.x
    dt = torch.promote_types(x.dtype, s.dtype)
    if x.dtype != dt:
        x = scratch.get("x_up", dt, x.shape, x.device).copy_(x)
    if s.dtype != dt:
        s = s.to(dt)
    v = scratch.get("v", dt, torch.broadcast_shapes(x.shape, s.shape), x.device)
    torch.div(x, s, out=v)
    if c.z is not None:
        v += c.z.to(c.x.dtype)
    return v


def _q_range(spec: _Spec) -> tuple[float, float]:
    if spec.is_float:
        return {8: (-448.0, 448.0), 6: (-7.5, 7.5), 4: (-6.0, 6.0)}[spec.num_bits]
    half = 2.0 ** spec.num_bits / 2
    return -half, half - 1


def _fp8_clamp_is_noop(spec: _Spec, amax: torch.Tensor | None, scale: torch.Tensor) -> bool:
    """True when clamping x / scale to ±448 cannot change the FP8 cast.

    The cast rounds to nearest even, so values in (448, 464] become 448 with or without the
    clamp; beyond that torch's cast saturates on some builds and gives NaN on others. With
    |x| <= amax per scale group, |x / scale| <= amax / scale, so a bound of 460 on amax / scale
    (checked on the small scale tensor, in fp32) leaves a margin for the quotient's rounding to
    the weight dtype. Fails (clamp kept) for fp16 subnormal scales, NaN / inf, zero points, or a
    scale not derived from the weight's own groups.
    """
    if amax is None or spec.num_bits != 8 or spec.tensor_group:
        return False
    return bool((amax.float() / scale.float() <= 460.0).all())


def quantize_weight(
    weight: torch.Tensor, scheme: QuantizationScheme, global_scale: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Quantize and compress one 2-D Linear weight -> suffix -> tensor (on weight's device).

    Suffixes replace ``weight`` in ``<module>.weight``; see :func:`output_layout`. For
    TENSOR_GROUP schemes pass the fused set's :func:`global_scale` (None: this weight alone).
    """
    spec = _spec(scheme)
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"cannot quantize a {weight.dtype} weight (expected a float dtype)")
    layout = output_layout(tuple(weight.shape), weight.dtype, scheme)
    w = weight.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    dev = w.device
    rows, cols = w.shape

    gscale = None
    if spec.tensor_group and global_scale is not None:
        gscale = global_scale.detach().to(device=dev, dtype=torch.float32).reshape(1)
    scale, zp, gscale, amax = _qparams(spec, w, gscale)
    q_gscale = gscale if spec.uses_global_scale_in_quantize else None

    out: dict[str, torch.Tensor] = {}
    qmin, qmax = _q_range(spec)
    if spec.fmt in _UNPACKED_FORMATS:
        q = torch.empty((rows, cols), dtype=spec.args.pytorch_dtype(), device=dev)
        clamp = not (spec.is_float and _fp8_clamp_is_noop(spec, amax, scale))

        def one(c: _Chunk, scratch: _Scratch) -> None:
            v = _scaled(c, q_gscale, scratch)
            if clamp:
                v.clamp_(qmin, qmax)
            if not spec.is_float:
                v.round_()
            q[c.r0 : c.r1].view(v.shape).copy_(v)

        out["weight"] = q
    elif spec.fmt == _PACK:
        bits = spec.num_bits
        q = torch.empty((rows, -(-cols * bits // 32)), dtype=torch.int32, device=dev)

        def one(c: _Chunk, scratch: _Scratch) -> None:
            v = _scaled(c, q_gscale, scratch).clamp_(qmin, qmax).round_()
            i8 = scratch.get("i8", torch.int8, (c.r1 - c.r0, cols), dev)
            i8.view(v.shape).copy_(v)
            q[c.r0 : c.r1] = _pack_int32(i8, bits)

        out["weight_packed"] = q
    elif spec.fmt in _FP4_FORMATS:
        q = torch.empty((rows, cols // 2), dtype=torch.uint8, device=dev)

        def one(c: _Chunk, scratch: _Scratch) -> None:
            v = _scaled(c, q_gscale, scratch)  # clamping to ±6 is part of the code table
            q[c.r0 : c.r1] = _pack_nibbles(_encode(v, "fp4", scratch).view(c.r1 - c.r0, cols))

        out["weight_packed"] = q
    else:  # MXFP6
        q = torch.empty((rows, cols * 3 // 4), dtype=torch.uint8, device=dev)

        def one(c: _Chunk, scratch: _Scratch) -> None:
            v = _scaled(c, q_gscale, scratch)  # clamping to ±7.5 is part of the code table
            q[c.r0 : c.r1] = _pack_fp6(_encode(v, "fp6", scratch).view(c.r1 - c.r0, cols))

        out["weight_packed"] = q
    _run(one, _chunks(w, spec, scale, zp), dev)

    args = spec.args
    if spec.fmt == _NVFP4:
        out["weight_scale"] = scale.to(args.scale_dtype or torch.float8_e4m3fn)
    elif spec.fmt in (_MXFP4, _MXFP6, _MXFP8):
        # compress_mx_scale: the E8M0 exponent, 127 + floor(log2(scale))
        exp = 127 + torch.floor(torch.log2(scale)).to(torch.int32)
        out["weight_scale"] = exp.to(args.scale_dtype or torch.uint8)
    else:
        out["weight_scale"] = scale
    if zp is not None:
        if spec.fmt == _PACK and spec.strategy in ("group", "channel"):
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

            out["weight_zero_point"] = pack_to_int32(zp, spec.num_bits, packed_dim=0).contiguous()
        else:
            out["weight_zero_point"] = zp
    if spec.tensor_group:
        out["weight_global_scale"] = gscale
    if spec.fmt == _PACK:
        out["weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64, device=dev)

    for k, (dt, shp) in layout.items():  # cheap self-check against the promised layout
        t = out[k]
        if t.dtype != dt or tuple(t.shape) != shp:
            raise AssertionError(f"internal error: {k} is {t.dtype}{list(t.shape)}, expected {dt}{list(shp)}")
    return {k: (t if t.is_contiguous() else t.contiguous()) for k, t in out.items()}


# ----------------------------------------------------------------------------------------------
# dequantize
# ----------------------------------------------------------------------------------------------


def dequantize_weight(
    tensors: dict[str, torch.Tensor], scheme: QuantizationScheme, dtype: torch.dtype
) -> torch.Tensor:
    """The dense weight of a compressed-tensors module (suffix -> tensor), in ``dtype``.

    compressed-tensors' own decompressor for the scheme's format, then a cast to ``dtype``: the
    values its ``CompressedTensorsDequantizer`` converter produces (it computes in the scale's
    dtype, bf16 for the FP4 formats).
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format

    state = dict(tensors)
    fmt = compression_format(scheme)
    if fmt == CompressionFormat.dense.value:
        return state["weight"].to(dtype)
    try:
        compressor = BaseCompressor.get_value_from_registry(fmt)
    except (KeyError, ValueError):  # e.g. "mixed-precision" on a group: infer it per module
        compressor = BaseCompressor.get_value_from_registry(infer_module_format(torch.nn.Linear, scheme).value)
    if "weight_shape" in state:
        state["weight_shape"] = state["weight_shape"].cpu()
    with torch.no_grad():
        out = compressor.decompress(state, scheme)
    return out["weight"].to(dtype)
