"""What a quantization scheme asks of one weight, before any math: the compressed-tensors
format it is written in, its checked settings (:class:`WeightSpec`), and the names, dtypes and
shapes of the tensors it produces (:func:`output_layout`).

Everything here is decided from the scheme and the weight's shape and dtype alone, so the plan
can refuse a weight (:class:`ShapeError`) before any byte of it is read.

Public API: :func:`compression_format`, :func:`weight_spec`, :class:`WeightSpec`,
:func:`needs_global_scale`, :func:`scale_shape`, :func:`param_dtype`, :func:`output_layout`,
:class:`ShapeError`, and the format names this package writes (``*_QUANTIZED``, ``*_FORMATS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)

from streamer.errors import Hint, StreamerError
from streamer.formats import FLOAT_DTYPES, torch_dtype

__all__ = [
    "ShapeError",
    "WeightSpec",
    "compression_format",
    "weight_spec",
    "needs_global_scale",
    "scale_shape",
    "param_dtype",
    "output_layout",
]


class ShapeError(StreamerError, ValueError):
    """A weight's shape (or dtype) cannot be quantized with a scheme (raised before any byte is
    read). Its message says why, in no front end's words; its hint is to keep the module
    unquantized (the plan names the module)."""

    def __init__(self, message: str):
        """message: why the weight cannot be quantized, in no front end's words."""
        super().__init__(message, hints=(Hint("ignore"),))


# formats this module writes, by compressed-tensors' CompressionFormat value
_NAIVE = CompressionFormat.naive_quantized.value  # "naive-quantized"
_INT = CompressionFormat.int_quantized.value  # "int-quantized"
_FLOAT = CompressionFormat.float_quantized.value  # "float-quantized"
PACK_QUANTIZED = CompressionFormat.pack_quantized.value  # "pack-quantized"
NVFP4_PACK_QUANTIZED = CompressionFormat.nvfp4_pack_quantized.value  # "nvfp4-pack-quantized"
MXFP4_PACK_QUANTIZED = CompressionFormat.mxfp4_pack_quantized.value  # "mxfp4-pack-quantized"
MXFP8_QUANTIZED = CompressionFormat.mxfp8_quantized.value  # "mxfp8-quantized"
MXFP6_PACK_QUANTIZED = getattr(CompressionFormat, "mxfp6_pack_quantized", None)
MXFP6_PACK_QUANTIZED = MXFP6_PACK_QUANTIZED.value if MXFP6_PACK_QUANTIZED is not None else "mxfp6-pack-quantized"

UNPACKED_FORMATS = (_NAIVE, _INT, _FLOAT, MXFP8_QUANTIZED)  # "weight" in the quantized dtype
FP4_FORMATS = (NVFP4_PACK_QUANTIZED, MXFP4_PACK_QUANTIZED)
SUPPORTED_FORMATS = (*UNPACKED_FORMATS, PACK_QUANTIZED, *FP4_FORMATS, MXFP6_PACK_QUANTIZED)

# The weight dtypes that can be quantized: the float dtypes a scheme quantizes from, and float64
# (compressed-tensors keeps a scale in any of these; its tests feed float64 weights)
WEIGHT_DTYPES = tuple(torch_dtype(name) for name in sorted(FLOAT_DTYPES | {"F64"}))
_MINMAX_OBSERVERS = (None, "minmax", "static_minmax", "memoryless_minmax")


def compression_format(scheme: QuantizationScheme) -> str:
    """The CompressionFormat value compress_module uses for an nn.Linear with SCHEME (its own
    `format` when set, else the one compressed-tensors infers)."""
    if scheme.format is not None:
        return CompressionFormat(scheme.format).value
    from compressed_tensors.compressors.format import infer_module_format

    return CompressionFormat(infer_module_format(torch.nn.Linear, scheme)).value


@dataclass(frozen=True)
class WeightSpec:
    """A scheme's weight quantization in the terms the kernels use (see weight_spec)."""

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
        """Whether quantizing divides by the global scale too (NVFP4 / MXFP4 formats do)."""
        return self.tensor_group and self.fmt in FP4_FORMATS


def weight_spec(scheme: QuantizationScheme) -> WeightSpec:
    """SCHEME's weight quantization, checked: ValueError naming the setting streamer cannot
    apply data-free (dynamic weights, other observers, unsupported format / bits / strategy)."""
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
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"compression format {fmt!r} is not supported (expected one of {SUPPORTED_FORMATS})")
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
    if fmt == PACK_QUANTIZED and is_float:
        raise ValueError("pack-quantized format holds integer weights only")
    if fmt in FP4_FORMATS and not (is_float and bits == 4):
        raise ValueError(f"{fmt} holds FP4 weights only")
    if fmt == MXFP6_PACK_QUANTIZED and not (is_float and bits == 6):
        raise ValueError(f"{fmt} holds FP6 weights only")
    if fmt in UNPACKED_FORMATS and is_float and bits != 8:
        raise ValueError(f"{fmt} cannot hold FP{bits} weights (use a packed format)")
    if fmt == MXFP8_QUANTIZED and not (is_float and bits == 8):
        raise ValueError(f"{fmt} holds FP8 weights only")
    block = tuple(int(v) for v in args.block_structure) if args.block_structure is not None else None
    if strategy == QuantizationStrategy.BLOCK.value and (block is None or len(block) != 2):
        raise ValueError("block strategy needs a block_structure [rows, cols]")
    gs = int(args.group_size) if args.group_size is not None else None
    if strategy in (QuantizationStrategy.GROUP.value, QuantizationStrategy.TENSOR_GROUP.value):
        if gs is None or gs <= 0:
            raise ValueError(f"{strategy} strategy needs a positive group_size")
    return WeightSpec(
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
    """Whether SCHEME uses the TENSOR_GROUP strategy (NVFP4 style): a fp32 global scale shared
    by fused weights."""
    w = scheme.weights
    return w is not None and QuantizationStrategy(w.strategy) == QuantizationStrategy.TENSOR_GROUP


def _scheme_label(spec: WeightSpec) -> str:
    if spec.strategy in ("group", "tensor_group"):
        return f"{spec.strategy} quantization with group_size {spec.group_size}"
    if spec.strategy == "block":
        return f"block quantization with block_structure {list(spec.block)}"
    return f"{spec.strategy} quantization"


def scale_shape(spec: WeightSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of weight_scale for a weight of SHAPE quantized as SPEC; ShapeError when SPEC
    cannot quantize that shape."""
    if len(shape) != 2:
        raise ShapeError(
            f"weight of shape {list(shape)} is not 2-D; only Linear weights (out, in) can be "
            "quantized"
        )
    rows, cols = shape
    if rows <= 0 or cols <= 0:
        raise ShapeError(f"weight of shape {list(shape)} is empty")
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
                f"group_size {gs} ({_scheme_label(spec)}); a scheme whose group size divides "
                f"{cols} can quantize it"
            )
        return (rows, cols // gs)
    if s == "block":
        bh, bw = spec.block
        return (-(-rows // bh), -(-cols // bw))
    raise ValueError(f"unsupported strategy {s!r}")


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are kept in for a weight of DTYPE: its own when it is a float dtype,
    else float16 (compressed-tensors' initialize_qparams)."""
    return dtype if dtype in WEIGHT_DTYPES else torch.float16


def output_layout(
    shape: Sequence[int], dtype: torch.dtype, scheme: QuantizationScheme
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of what quantize_weight returns, computing nothing.

    shape, dtype: the weight's; scheme: the compressed-tensors scheme it is quantized with.
    Raises :class:`ShapeError` when a weight of this shape cannot be quantized by the scheme.
    """
    spec = weight_spec(scheme)
    shape = tuple(int(v) for v in shape)
    if dtype not in WEIGHT_DTYPES:
        raise ShapeError(
            f"weight of shape {list(shape)} is {dtype}, not a float dtype; only float weights can "
            "be quantized"
        )
    sshape = scale_shape(spec, shape)
    rows, cols = shape
    pdt = param_dtype(dtype)
    args = spec.args
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    if spec.fmt in UNPACKED_FORMATS:
        out["weight"] = (args.pytorch_dtype(), shape)
    elif spec.fmt == PACK_QUANTIZED:
        out["weight_packed"] = (torch.int32, (rows, -(-cols * spec.num_bits // 32)))
    elif spec.fmt in FP4_FORMATS:
        if cols % 2:
            raise ShapeError(
                f"weight of shape {list(shape)}: in_features {cols} must be even to pack FP4 "
                "values two per byte"
            )
        out["weight_packed"] = (torch.uint8, (rows, cols // 2))
    elif spec.fmt == MXFP6_PACK_QUANTIZED:
        if cols % 4:
            raise ShapeError(
                f"weight of shape {list(shape)}: in_features {cols} must be a multiple of 4 to "
                "pack FP6 values"
            )
        out["weight_packed"] = (torch.uint8, (rows, cols * 3 // 4))

    if spec.fmt == NVFP4_PACK_QUANTIZED:
        out["weight_scale"] = (args.scale_dtype or torch.float8_e4m3fn, sshape)
    elif spec.fmt in (MXFP4_PACK_QUANTIZED, MXFP6_PACK_QUANTIZED, MXFP8_QUANTIZED):
        out["weight_scale"] = (args.scale_dtype or torch.uint8, sshape)
    else:
        out["weight_scale"] = (pdt, sshape)

    if not spec.symmetric:
        if spec.fmt == PACK_QUANTIZED and spec.strategy in ("group", "channel"):
            out["weight_zero_point"] = (torch.int32, (-(-rows * spec.num_bits // 32), sshape[1]))
        else:
            out["weight_zero_point"] = (args.zp_dtype, sshape)
    if spec.tensor_group:
        out["weight_global_scale"] = (torch.float32, (1,))
    if spec.fmt == PACK_QUANTIZED:
        out["weight_shape"] = (torch.int64, (2,))
    return out

