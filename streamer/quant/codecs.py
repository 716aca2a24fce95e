"""How quantized values are stored: the FP4 / FP6 code tables and the bit packings of
compressed-tensors' formats (two FP4 nibbles per byte, four FP6 codes per three bytes, integers
densely in int32 words).

FP4 / FP6 values are encoded with a 65536-entry table indexed by the 16-bit pattern of the scaled
value (bf16 or fp16; an fp32 value is first narrowed to bf16 with round-to-odd, which keeps the
later nearest-even rounding exact). Each function gives the library's bytes exactly.
"""

from __future__ import annotations

import sys

import torch

from streamer.quant.workers import Scratch

__all__ = ["encode", "pack_nibbles", "pack_fp6", "pack_int32"]


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


def _key16(v: torch.Tensor, scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.dtype]:
    """A non-negative int32 16-bit key of each value (flat) and the dtype those 16 bits encode.

    bf16 / fp16 values are their own bit pattern; fp32 values are narrowed to bf16 with
    round-to-odd (truncate, then set the last bit if anything nonzero was dropped). bf16 keeps
    8 bits of precision and FP4/FP6 need at most 4, so nearest-even rounding of the narrowed
    value lands where rounding of the fp32 value does (the classic round-to-odd argument), the
    sign survives, and a nonzero value never becomes zero.
    """
    scratch = scratch or Scratch()
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


def encode(v: torch.Tensor, kind: str, scratch: Scratch | None = None) -> torch.Tensor:
    """The FP4 nibble or FP6 code (uint8) of each value of V, flat, as compressed-tensors casts.

    v: scaled values of any shape (bf16, fp16, fp32 or fp64; not yet clamped: the tables clamp);
    kind: "fp4" or "fp6"; scratch: buffers to reuse (the returned codes live in it).
    """
    if v.dtype == torch.float64:
        return (_fp4_nibbles(v) if kind == "fp4" else _fp6_codes(v)).reshape(-1)
    scratch = scratch or Scratch()
    key, kdt = _key16(v.contiguous(), scratch)
    codes = scratch.get("codes", torch.uint8, (key.numel(),), v.device)
    return torch.index_select(_lut(kind, kdt, v.device), 0, key, out=codes)


def pack_nibbles(n: torch.Tensor) -> torch.Tensor:
    """N, (rows, 2k) uint8 values < 16 -> (rows, k) bytes, even column in the low nibble."""
    rows, cols = n.shape
    if sys.byteorder == "little":
        w = n.contiguous().view(torch.int16)
        return torch.bitwise_or(w, torch.bitwise_right_shift(w, 4)).to(torch.uint8).view(rows, cols // 2)
    p = n.view(rows, cols // 2, 2)
    return p[..., 0] | (p[..., 1] << 4)


def pack_fp6(c: torch.Tensor) -> torch.Tensor:
    """C, (rows, 4k) 6-bit codes -> (rows, 3k) bytes, four codes little-endian in three bytes."""
    rows, cols = c.shape
    c = c.view(rows, cols // 4, 4).to(torch.int32)
    word = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)
    packed = torch.stack([word, word >> 8, word >> 16], dim=-1) & 0xFF
    return packed.to(torch.uint8).reshape(rows, cols * 3 // 4)


# ----------------------------------------------------------------------------------------------
# integer packing (compressed-tensors' pack_to_int32 layout: element i at bit i·bits, dense)
# ----------------------------------------------------------------------------------------------


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32(Q, BITS) for a (rows, cols) int8 tensor of values in
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

