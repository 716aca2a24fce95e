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

Public API: :class:`ErrorSums`, :func:`relative_error`, :func:`snr_db`, :func:`robust_error`,
:func:`chunk_sums`, :func:`code_values`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from streamer.quant.workers import Scratch

__all__ = ["ErrorSums", "relative_error", "snr_db", "robust_error", "chunk_sums", "code_values"]


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


def chunk_sums(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    scratch: Scratch,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||x||², ||x - deq||², Σ|x|) of one chunk as float32 0-dim tensors (not yet synchronized).

    x: the chunk of the source weight; q: its quantized values (the integers or the FP8 / FP4 /
    FP6 grid values, not yet scaled) in the dtype the quantizer divided in; scale, zero_point:
    broadcastable to q, in that dtype. deq = (q - zero_point) · scale, in that dtype as
    compressed-tensors dequantizes, then rounded to DTYPE (default: x's, as a loader holds it;
    NVFP4's decompressor works in bfloat16 whatever the weight's dtype); scratch: the worker's
    buffers (reused across chunks).
    """
    dev = x.device
    deq = scratch.get("deq", q.dtype, q.shape, dev)
    if zero_point is not None:
        torch.sub(q, zero_point.to(q.dtype), out=deq)
        deq.mul_(scale)
    else:
        torch.mul(q, scale, out=deq)
    n = x.numel()
    xf = scratch.get("err_x", torch.float32, (n,), dev)
    df = scratch.get("err_d", torch.float32, (n,), dev)
    xf.copy_(x.reshape(-1))
    dtype = dtype or x.dtype
    if deq.dtype != dtype:
        df.copy_(deq.reshape(-1).to(dtype))
    else:
        df.copy_(deq.reshape(-1))
    w_sq = torch.dot(xf, xf)
    df.sub_(xf)
    return w_sq, torch.dot(df, df), xf.abs_().sum()
