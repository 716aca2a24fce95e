"""compressed-tensors' own module path for one weight: the oracle streamer's kernels are checked
against (tests/test_kernels.py) and timed against (bench/bench_kernels.py).

`initialize_module_for_quantization`, min/max observation of the flattened weight as
llm-compressor's observers do it, `calculate_qparams` and `compress_module`.
"""

from __future__ import annotations

import copy

import torch
from compressed_tensors.compressors import compress_module
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    initialize_module_for_quantization,
)
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    generate_gparam,
    maybe_pad_tensor_for_block_quant,
)


def _flatten_for_calibration(value: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """llm-compressor's observers.helpers._flatten_weight."""
    s = args.strategy
    if s == QuantizationStrategy.TENSOR:
        return value.reshape((1, 1, -1))
    if s == QuantizationStrategy.CHANNEL:
        return value.unsqueeze(-2).unsqueeze(0)
    if s in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        return value.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    if s == QuantizationStrategy.BLOCK:
        bh, bw = args.block_structure
        value = maybe_pad_tensor_for_block_quant(value, args.block_structure)
        rows, cols = value.shape
        return value.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2).flatten(-2, -1).unsqueeze(0)
    raise ValueError(s)


def _observe(w, args):
    f = _flatten_for_calibration(w, args)
    return torch.amin(f, dim=(0, -1)), torch.amax(f, dim=(0, -1))


@torch.no_grad()
def ct_module_path(w: torch.Tensor, scheme: QuantizationScheme, fused=None) -> dict:
    scheme = copy.deepcopy(scheme)
    o, i = w.shape
    m = torch.nn.Linear(i, o, bias=False, dtype=w.dtype, device=w.device)
    m.weight.data.copy_(w)
    initialize_module_for_quantization(m, scheme, force_zero_point=False)
    args = scheme.weights
    mn, mx = _observe(w, args)
    gs = None
    if args.strategy == QuantizationStrategy.TENSOR_GROUP:
        # Observer.get_global_scale over the fused observers' statistics
        stats = [_observe(x, args) for x in (fused or [w])]
        g = stats[0][1].max()
        for a, b in stats:
            g = torch.max(g, -a.min())
            g = torch.max(g, b.max())
        gs = generate_gparam(-g.reshape(1), g.reshape(1))
        m.weight_global_scale.copy_(gs)
    scale, zp = calculate_qparams(mn, mx, args, global_scale=gs)
    m.weight_scale.copy_(scale)
    if hasattr(m, "weight_zero_point"):
        m.weight_zero_point.copy_(zp)
    compress_module(m)
    sd = dict(m.state_dict())
    return {k: v for k, v in sd.items() if k.startswith("weight")}
