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
* FP4 / FP6 codes and the bit packings are :mod:`streamer.quant.codecs`'; what the scheme
  asks of a weight (format, scale shapes, output layout) is :mod:`streamer.quant.spec`'s; the
  chunks run on :mod:`streamer.quant.workers`.

On CUDA with Triton installed, compressed-tensors itself switches ``_quantize`` to a fused kernel
that divides in fp32 and never rounds the quotient to the weight dtype, so the reference's output
then differs from its CPU output for FP8 / INT schemes (measured on a bf16 N(0, 0.02) weight:
3% of FP8_DYNAMIC, 0.6% of W4A16 and 7% of W8A8 elements move by one step). NVFP4 divides in fp32
either way and MX scales are powers of two, so those should agree. This module always follows
the eager semantics: its output is the same on every device and equals the reference run on CPU.

Public API: :func:`global_scale`, :func:`quantize_weight`, :func:`dequantize_weight`.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.utils import generate_gparam

from streamer.quant.codecs import encode, pack_fp6, pack_int32, pack_nibbles
from streamer.quant.quality import ErrorSums, chunk_sums, code_dequant
from streamer.quant.spec import (
    FP4_FORMATS,
    MXFP4_PACK_QUANTIZED,
    MXFP6_PACK_QUANTIZED,
    MXFP8_QUANTIZED,
    NVFP4_PACK_QUANTIZED,
    PACK_QUANTIZED,
    UNPACKED_FORMATS,
    WEIGHT_DTYPES,
    WeightSpec,
    compression_format,
    output_layout,
    param_dtype,
    scale_shape,
    weight_spec,
)
from streamer.quant.workers import Scratch, chunk_rows, row_chunks, run_chunks

__all__ = ["global_scale", "quantize_weight", "dequantize_weight"]


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------

_INT_VIEW = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}



def _abs_max(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
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
    step = chunk_rows(rows, cols, w.device, align=bh)
    chunks = list(enumerate(row_chunks(rows, step)))
    out = torch.empty(scale_shape(spec, (rows, cols)) if s != "tensor" else (len(chunks),),
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

    run_chunks(one, chunks, w.device)
    if s == "tensor":
        out = torch.amax(out).reshape(1)
    return out.view(w.dtype)


def _min_max(w: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
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

    maxes = run_chunks(one, row_chunks(rows, chunk_rows(rows, cols, w.device)), w.device)
    return torch.amax(torch.stack(maxes)).view(w.dtype)


def _gparam(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' generate_gparam(-amax, amax) (NVFP4: 448 · 6 / amax), fp32 (1,)."""
    amax = amax.reshape(1)
    return generate_gparam(-amax, amax)


def global_scale(weights: Sequence[torch.Tensor], scheme: QuantizationScheme) -> torch.Tensor:
    """The fp32 (1,) global scale shared by a fused set (q/k/v, gate/up, ...).

    weights: the set's dense weights (float dtypes, any devices); scheme: their TENSOR_GROUP
    scheme. As the reference's observer: the max |w| over every member (in the weights' dtype,
    promoted like torch.max when members differ), then compressed-tensors' generate_gparam
    (448 · 6 / amax in that dtype, zero → 1.0), stored as float32.
    """
    if not weights:
        raise ValueError("global_scale needs at least one weight")
    amax = None
    for w in weights:
        if w.dtype not in WEIGHT_DTYPES:
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
    spec: WeightSpec,
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


def _is_mx(spec: WeightSpec) -> bool:
    """compressed-tensors' should_generate_mx_scales."""
    a = spec.args
    return spec.is_float and spec.num_bits in (4, 6, 8) and a.group_size == 32 and a.scale_dtype == torch.uint8


def _qparams(
    spec: WeightSpec, w: torch.Tensor, gscale: torch.Tensor | None
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
    scale = scale.to(param_dtype(w.dtype))
    if zp is not None:
        zp = zp.to(spec.args.zp_dtype)
    return scale, zp, gscale, amax


# ----------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------


class _Chunk:
    """One row slice of the weight with its scale / zero point broadcast to it."""

    __slots__ = ("r0", "r1", "x", "s", "z")

    def __init__(self, r0, r1, x, s, z):
        self.r0, self.r1, self.x, self.s, self.z = r0, r1, x, s, z


def _chunks(w: torch.Tensor, spec: WeightSpec, scale: torch.Tensor, zp: torch.Tensor | None) -> Iterator[_Chunk]:
    """Row chunks of w viewed so that ``x / s`` broadcasts like compressed-tensors' quantize."""
    rows, cols = w.shape
    s = spec.strategy
    if s == "block":
        bh, bw = spec.block
        # scale (nbr, nbc) -> (nbr, cols): each block's scale repeated over its columns
        sc = scale.repeat_interleave(bw, dim=1)[:, :cols]
        zc = zp.repeat_interleave(bw, dim=1)[:, :cols] if zp is not None else None
        step = chunk_rows(rows, cols, w.device, align=bh)
        for r0, r1 in row_chunks(rows, step):
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
    step = chunk_rows(rows, cols, w.device)
    for r0, r1 in row_chunks(rows, step):
        x = w[r0:r1]
        if s in ("group", "tensor_group"):
            gs = spec.group_size
            x = x.view(r1 - r0, cols // gs, gs)
            yield _Chunk(r0, r1, x, scale[r0:r1].unsqueeze(-1), zp[r0:r1].unsqueeze(-1) if zp is not None else None)
        elif s == "channel":
            yield _Chunk(r0, r1, x, scale[r0:r1], zp[r0:r1] if zp is not None else None)
        else:  # tensor
            yield _Chunk(r0, r1, x, scale, zp)



def _scaled(
    c: _Chunk, gscale: torch.Tensor | None, scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x / scale (+ zp), the scale divided by, x upcast to that dtype or None) in the promoted
    dtype, as compressed-tensors' eager _quantize.

    A mixed-dtype division (bf16 weight, fp32 scale: TENSOR_GROUP) is written as an explicit
    upcast of x followed by the division: the same values, without the slow casting loop (the
    upcast copy is handed back: the error measurement reuses it).
    """
    s = c.s
    if gscale is not None:
        s = s / gscale
    x, up = c.x, None
    dt = torch.promote_types(x.dtype, s.dtype)
    if x.dtype != dt:
        x = up = scratch.get("x_up", dt, x.shape, x.device).copy_(x)
    if s.dtype != dt:
        s = s.to(dt)
    v = scratch.get("v", dt, torch.broadcast_shapes(x.shape, s.shape), x.device)
    torch.div(x, s, out=v)
    if c.z is not None:
        v += c.z.to(c.x.dtype)
    return v, s, up


def _q_range(spec: WeightSpec) -> tuple[float, float]:
    if spec.is_float:
        return {8: (-448.0, 448.0), 6: (-7.5, 7.5), 4: (-6.0, 6.0)}[spec.num_bits]
    half = 2.0 ** spec.num_bits / 2
    return -half, half - 1


def _fp8_clamp_is_noop(spec: WeightSpec, amax: torch.Tensor | None, scale: torch.Tensor) -> bool:
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


def _int_dequant(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """(v - z) · s in place: the integers V (in the dtype divided in) dequantized as
    compressed-tensors does, in that dtype."""
    if z is not None:
        v.sub_(z.to(v.dtype))
    return v.mul_(s)


def _scale_bound(scale: torch.Tensor, gscale: torch.Tensor | None) -> float:
    """max |scale / gscale| (gscale: the global scale divided by, or None), from above."""
    m = float(scale.abs().max().float())
    if gscale is not None:
        g = float(gscale.abs().min())
        m = m / g * (1 + 2**-20) if g > 0 else math.inf
    return m


def _x_f32(up: torch.Tensor | None) -> torch.Tensor | None:
    """The quantizer's float32 copy of the chunk when it made one (the error sums may reuse it)."""
    return up if up is not None and up.dtype == torch.float32 else None


def quantize_weight(
    weight: torch.Tensor,
    scheme: QuantizationScheme,
    global_scale: torch.Tensor | None = None,
    errors: ErrorSums | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize and compress one 2-D Linear weight -> suffix -> tensor (on weight's device).

    Suffixes replace ``weight`` in ``<module>.weight``; see :func:`output_layout`. For
    TENSOR_GROUP schemes pass the fused set's :func:`global_scale` (None: this weight alone).
    ERRORS, when given, receives ||W||², ||W - deq(Q(W))||² and Σ|W| (see
    :mod:`streamer.quant.quality`), computed chunk by chunk from the values the quantizer has in hand.
    """
    spec = weight_spec(scheme)
    if weight.dtype not in WEIGHT_DTYPES:
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
    # a bound on the scales the quantizer divides by (checked once here, not per chunk)
    smax = _scale_bound(scale, q_gscale) if errors is not None and spec.is_float else None
    if spec.fmt in UNPACKED_FORMATS:
        q = torch.empty((rows, cols), dtype=spec.args.pytorch_dtype(), device=dev)
        clamp = not (spec.is_float and _fp8_clamp_is_noop(spec, amax, scale))

        def one(c: _Chunk, scratch: Scratch):
            v, s, up = _scaled(c, q_gscale, scratch)
            if clamp:
                v.clamp_(qmin, qmax)
            if not spec.is_float:
                v.round_()
            qc = q[c.r0 : c.r1].view(v.shape)
            qc.copy_(v)
            if errors is not None:  # v is free now: the integers dequantize in place
                if spec.is_float:  # from the FP8 bytes the cast chose (the cast back is slow)
                    d = code_dequant(qc.view(torch.uint8), "fp8", s, v.shape, scratch, smax)
                else:
                    d = _int_dequant(v, s, c.z)
                return chunk_sums(c.x, d, scratch, x_f32=_x_f32(up))

        out["weight"] = q
    elif spec.fmt == PACK_QUANTIZED:
        bits = spec.num_bits
        q = torch.empty((rows, -(-cols * bits // 32)), dtype=torch.int32, device=dev)

        def one(c: _Chunk, scratch: Scratch):
            v, s, up = _scaled(c, q_gscale, scratch)
            v.clamp_(qmin, qmax).round_()
            i8 = scratch.get("i8", torch.int8, (c.r1 - c.r0, cols), dev)
            i8.view(v.shape).copy_(v)
            q[c.r0 : c.r1] = pack_int32(i8, bits)
            if errors is not None:
                return chunk_sums(c.x, _int_dequant(v, s, c.z), scratch, x_f32=_x_f32(up))

        out["weight_packed"] = q
    elif spec.fmt in FP4_FORMATS:
        q = torch.empty((rows, cols // 2), dtype=torch.uint8, device=dev)
        # compressed-tensors decompresses NVFP4 in bfloat16 whatever the weight's dtype
        deq_dtype = torch.bfloat16 if spec.fmt == NVFP4_PACK_QUANTIZED else None

        def one(c: _Chunk, scratch: Scratch):
            v, s, up = _scaled(c, q_gscale, scratch)  # clamping to ±6 is part of the code table
            codes = encode(v, "fp4", scratch)
            q[c.r0 : c.r1] = pack_nibbles(codes.view(c.r1 - c.r0, cols))
            if errors is not None:
                d = code_dequant(codes, "fp4", s, v.shape, scratch, smax)
                return chunk_sums(c.x, d, scratch, deq_dtype, x_f32=_x_f32(up))

        out["weight_packed"] = q
    else:  # MXFP6
        q = torch.empty((rows, cols * 3 // 4), dtype=torch.uint8, device=dev)

        def one(c: _Chunk, scratch: Scratch):
            v, s, up = _scaled(c, q_gscale, scratch)  # clamping to ±7.5 is part of the code table
            codes = encode(v, "fp6", scratch)
            q[c.r0 : c.r1] = pack_fp6(codes.view(c.r1 - c.r0, cols))
            if errors is not None:
                d = code_dequant(codes, "fp6", s, v.shape, scratch, smax)
                return chunk_sums(c.x, d, scratch, x_f32=_x_f32(up))

        out["weight_packed"] = q
    sums = run_chunks(one, _chunks(w, spec, scale, zp), dev)
    if errors is not None and sums:  # one device sync for the whole weight
        w_sq, e_sq, w_abs = torch.stack([torch.stack(s) for s in sums]).double().sum(0).tolist()
        errors.add(w_sq, e_sq, w_abs, w.numel())

    args = spec.args
    if spec.fmt == NVFP4_PACK_QUANTIZED:
        out["weight_scale"] = scale.to(args.scale_dtype or torch.float8_e4m3fn)
    elif spec.fmt in (MXFP4_PACK_QUANTIZED, MXFP6_PACK_QUANTIZED, MXFP8_QUANTIZED):
        # compress_mx_scale: the E8M0 exponent, 127 + floor(log2(scale))
        exp = 127 + torch.floor(torch.log2(scale)).to(torch.int32)
        out["weight_scale"] = exp.to(args.scale_dtype or torch.uint8)
    else:
        out["weight_scale"] = scale
    if zp is not None:
        if spec.fmt == PACK_QUANTIZED and spec.strategy in ("group", "channel"):
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

            out["weight_zero_point"] = pack_to_int32(zp, spec.num_bits, packed_dim=0).contiguous()
        else:
            out["weight_zero_point"] = zp
    if spec.tensor_group:
        out["weight_global_scale"] = gscale
    if spec.fmt == PACK_QUANTIZED:
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
