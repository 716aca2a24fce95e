"""How much quantization changed one weight: relative Frobenius error, SNR, robust error.

For a weight W of N values and its dequantized value D = deq(Q(W)) (in W's dtype, as a loader
gets it):

* relative error  ||W - D||_F / ||W||_F
* SNR in dB       10 · log10(||W||² / ||W - D||²)
* robust error    rms(W - D) / (mean|W| · sqrt(π/2)): the error against the weight's typical
  magnitude. For Gaussian-like weights mean|W| · sqrt(π/2) = rms(W), so it equals the relative
  error; when a few huge values dominate ||W|| (and ruin the scales of the small ones), the
  relative error stays small (their own energy is in its denominator) while this one grows.
  Outliers are judged on it.

The two sums of squares are accumulated chunk by chunk inside the quantizer's own loop
(:func:`streamer.quant.kernels.quantize_weight` with ``errors=``), from the chunk of W and the
quantized values it has just computed: no second read of the source and no full-size temporary.
Each chunk's sums are float32 dot products (exact differences of two values of W's dtype, BLAS
accumulation), added up over chunks in float64.

The cost, and why it is not smaller: D must be rounded to W's dtype as a loader rounds it (an
error taken in the scaled domain, scale · (W/scale - q), or from an unrounded q · scale, misses
by 0.3-8% for bf16 FP8 / INT8 weights), so a chunk costs the dequantization (one multiply; FP8 /
FP4 / FP6 codes are first decoded by moving their bits into the float's fields, three integer
passes where a table lookup costs ten), two float32 copies, a subtraction, two dot products and
Σ|W|: about six elementwise passes in eager torch, against the quantizer's ten to twenty.
Fewer needs one fused kernel per scheme family (not written: on CPU that means a compiled
extension; ``torch.compile``'s CPU kernel for it took 7-22 s to build per variant, kept D's
rounding only with ``emulate_precision_casts``, and ran no faster than these passes).

Public API: :class:`ErrorSums`, :func:`relative_error`, :func:`snr_db`, :func:`robust_error`,
:func:`chunk_sums`, :func:`code_dequant`, :func:`code_values`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from streamer.quant.workers import Scratch

__all__ = ["ErrorSums", "relative_error", "snr_db", "robust_error", "chunk_sums", "code_dequant", "code_values"]


def relative_error(weight_sq: float, error_sq: float) -> float:
    """||W - D|| / ||W|| from the two sums of squares (0 for an all-zero weight quantized exactly,
    inf for an all-zero weight that was not)."""
    if weight_sq > 0:
        return math.sqrt(error_sq / weight_sq)
    return 0.0 if error_sq == 0 else math.inf


def snr_db(weight_sq: float, error_sq: float) -> float:
    """10 · log10(||W||² / ||W - D||²) in dB; inf when the weight came back exactly."""
    if error_sq == 0:
        return math.inf
    if weight_sq == 0:
        return -math.inf
    return 10.0 * math.log10(weight_sq / error_sq)


def robust_error(count: int, weight_abs: float, error_sq: float) -> float:
    """rms(W - D) / (mean|W| · sqrt(π/2)) from COUNT values, WEIGHT_ABS = Σ|W| and ERROR_SQ."""
    if weight_abs > 0:
        return math.sqrt(error_sq * count) / (weight_abs * math.sqrt(math.pi / 2))
    return 0.0 if error_sq == 0 else math.inf


class ErrorMeasures:
    """The error figures of anything holding a weight's sums (weight_sq, error_sq, weight_abs, count)."""

    weight_sq: float
    error_sq: float
    weight_abs: float
    count: int

    @property
    def relative_error(self) -> float:
        return relative_error(self.weight_sq, self.error_sq)

    @property
    def snr_db(self) -> float:
        return snr_db(self.weight_sq, self.error_sq)

    @property
    def robust_error(self) -> float:
        return robust_error(self.count, self.weight_abs, self.error_sq)


@dataclass
class ErrorSums(ErrorMeasures):
    """The running sums of one weight (float64): ||W||², ||W - D||², Σ|W|, and the values counted."""

    weight_sq: float = 0.0
    error_sq: float = 0.0
    weight_abs: float = 0.0
    count: int = 0

    def add(self, weight_sq: float, error_sq: float, weight_abs: float, count: int) -> None:
        """Add one chunk's sums: WEIGHT_SQ = ||W_c||², ERROR_SQ = ||W_c - D_c||², WEIGHT_ABS = Σ|W_c|
        over its COUNT values."""
        self.weight_sq += weight_sq
        self.error_sq += error_sq
        self.weight_abs += weight_abs
        self.count += count


# The value of each FP8 (E4M3), FP4 (E2M1) and FP6 (E2M3) code, as compressed-tensors decodes them
_FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_E2M3 = [m / 8 for m in range(8)] + [(1 + m / 8) * 2**e for e in range(3) for m in range(8)]
_TABLES: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}


def code_values(kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The value of every code of KIND ("fp8": the 256 E4M3 bytes, "fp4": the 16 nibbles, sign
    bit 3; "fp6": the 64 codes, sign bit 5) in DTYPE on DEVICE: a table to index with the codes."""
    key = (kind, dtype, str(device))
    t = _TABLES.get(key)
    if t is None:
        if kind == "fp8":
            vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
        else:
            mags = _FP4 if kind == "fp4" else _E2M3
            vals = torch.tensor(mags + [-m for m in mags], dtype=torch.float32)
        t = _TABLES[key] = vals.to(device=device, dtype=dtype)
    return t


# The codes' layout: (sign bit, mantissa bits, exponent bias) of E4M3, E2M1, E2M3
_CODES = {"fp8": (7, 3, 7), "fp4": (3, 1, 1), "fp6": (5, 3, 1)}
# The float dtypes a code is rewritten into: (integer of the same width, mantissa bits, exponent bias)
_FLOATS = {
    torch.bfloat16: (torch.int16, 7, 127),
    torch.float16: (torch.int16, 10, 15),
    torch.float32: (torch.int32, 23, 127),
}


def _code_bits(codes: torch.Tensor, kind: str, dtype: torch.dtype, scratch: Scratch) -> torch.Tensor:
    """The codes rewritten as DTYPE numbers equal to their value times 2^-(bias(DTYPE) - bias(KIND)),
    flat: the code's exponent and mantissa fields moved into DTYPE's, its sign into DTYPE's.

    A few integer passes instead of a table lookup (``index_select`` costs about ten elementwise
    passes on CPU). The code's subnormals land on DTYPE's subnormals, which the power-of-two
    factor brings back exactly (IEEE arithmetic with gradual underflow, torch's default).
    """
    sign, mant, _ = _CODES[kind]
    ity, dmant, _ = _FLOATS[dtype]
    n = codes.numel()
    c8 = codes.reshape(-1)
    if sign < 7:  # the code's sign bit to bit 7, so that widening as int8 sign-extends it
        c8 = torch.bitwise_left_shift(c8, 7 - sign, out=scratch.get("code_u8", torch.uint8, (n,), codes.device))
    bits = scratch.get("code_bits", ity, (n,), codes.device)
    bits.copy_(c8.view(torch.int8))
    width = 16 if ity == torch.int16 else 32
    shift = dmant - mant  # where the code's mantissa starts in DTYPE
    bits.mul_(1 << (shift - (7 - sign)))
    mask = (1 << (width - 1)) | (((1 << sign) - 1) << shift)  # sign | exponent and mantissa
    return bits.bitwise_and_(mask - (1 << width)).view(dtype)


def code_dequant(
    codes: torch.Tensor,
    kind: str,
    scale: torch.Tensor,
    shape,
    scratch: Scratch,
    scale_max: float | None = None,
) -> torch.Tensor:
    """value(CODES) · SCALE in SCALE's dtype, shaped SHAPE: what compressed-tensors' dequantizer
    computes before rounding to the output dtype (one rounding of the exact product).

    codes: the FP8 bytes / FP4 nibbles / FP6 codes (uint8, any shape with SHAPE's count) of
    KIND; scale: the per-value scale, broadcastable to SHAPE; scratch: the worker's buffers
    (the result lives in one of them); scale_max: a bound on |SCALE| known to the caller (one
    check per weight instead of one per chunk), or None to check SCALE itself.
    """
    dtype = scale.dtype
    if dtype in _FLOATS:
        # value · scale = (value · 2^-k) · (scale · 2^k): the same exact product, rounded once,
        # as long as scale · 2^k stays finite
        k = _FLOATS[dtype][2] - _CODES[kind][2]
        if scale_max is not None:
            fits = scale_max * 2.0 ** (k + 1) < torch.finfo(dtype).max  # a factor 2 to spare
        else:
            fits = bool(torch.isfinite(scale * 2.0**k).all())
        if fits:
            return _code_bits(codes, kind, dtype, scratch).view(shape).mul_(scale * 2.0**k)
    idx = scratch.get("code_idx", torch.int32, (codes.numel(),), codes.device)
    idx.copy_(codes.reshape(-1))
    out = scratch.get("code_val", dtype, (codes.numel(),), codes.device)
    torch.index_select(code_values(kind, dtype, codes.device), 0, idx, out=out)
    return out.view(shape).mul_(scale)


def chunk_sums(
    x: torch.Tensor,
    deq: torch.Tensor,
    scratch: Scratch,
    dtype: torch.dtype | None = None,
    x_f32: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||x||², ||x - D||², Σ|x|) of one chunk as float32 0-dim tensors (not yet synchronized).

    x: the chunk of the source weight; deq: its dequantized values as compressed-tensors
    computes them (``(q - zero_point) · scale`` in the dtype the quantizer divided in), in a
    buffer this may overwrite; D is deq rounded to DTYPE (default: x's, as a loader holds it;
    NVFP4's decompressor works in bfloat16 whatever the weight's dtype); x_f32: x already
    upcast to float32 in a buffer this may overwrite (saves a copy), or None; scratch: the
    worker's buffers (reused across chunks).

    Float32 dot products of exact differences (two values of a 16-bit float differ by a float32
    exactly) with BLAS accumulation; the caller adds the chunks up in float64.
    """
    dev, n = x.device, x.numel()
    dtype = dtype or x.dtype
    if x_f32 is not None:
        xf, own = x_f32.reshape(-1), True
    elif x.dtype == torch.float32:
        xf, own = x.reshape(-1), False
    else:
        xf, own = scratch.get("err_x", torch.float32, (n,), dev).copy_(x.reshape(-1)), True
    if deq.dtype != dtype:  # the loader's rounding
        deq = scratch.get("err_r", dtype, deq.shape, dev).copy_(deq)
    if deq.dtype == torch.float32 and deq.is_contiguous():
        df = deq.view(-1)
    else:
        df = scratch.get("err_d", torch.float32, (n,), dev).copy_(deq.reshape(-1))
    w_sq = torch.dot(xf, xf)
    df.sub_(xf)
    e_sq = torch.dot(df, df)
    a = xf.abs_() if own else torch.abs(xf, out=scratch.get("err_a", torch.float32, (n,), dev))
    return w_sq, e_sq, a.sum()
