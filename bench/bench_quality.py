"""The quality report's cost: the quantize stage with and without the error measurement.

`streamer.quant.kernels.quantize_weight(..., errors=ErrorSums())` accumulates ||W||², ||W - D||²
and Σ|W| inside its chunk loop (streamer.quant.quality); this times the same weights with and
without it, alternating the two (best of REPS each: shared machines are noisy), and prints the
overhead per scheme against the 5% target of issue 18.

    python bench/bench_quality.py [--schemes FP8_DYNAMIC,W4A16] [--shapes 4096x4096] [--device cpu] [--reps 5]

Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402

from streamer.quant.kernels import quantize_weight  # noqa: E402
from streamer.quant.quality import ErrorSums  # noqa: E402

DEFAULT_SCHEMES = ["FP8_DYNAMIC", "FP8_BLOCK", "W4A16", "W8A16", "NVFP4A16", "MXFP4A16"]
DEFAULT_SHAPES = [(4096, 4096), (14336, 4096)]
TARGET = 5.0  # percent of the quantize stage


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _stage_seconds(weights, scheme, dev, measure: bool) -> float:
    """Wall seconds to quantize WEIGHTS with SCHEME, measuring the error when MEASURE."""
    _sync(dev)
    t = time.perf_counter()
    for w in weights:
        quantize_weight(w, scheme, None, errors=ErrorSums() if measure else None)
    _sync(dev)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in DEFAULT_SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16).to(dev) for s in shapes]
    mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
    print(f"device {dev} ({torch.get_num_threads()} threads), weights {args.shapes} bf16 ({mb:.0f} MB), best of {args.reps}")
    print(f"{'scheme':<12} {'without':>10} {'with':>10} {'overhead':>9}  target <= {TARGET:g}%")
    for name in args.schemes.split(","):
        scheme = preset_name_to_scheme(name, ["Linear"])
        _stage_seconds(weights, scheme, dev, True)  # warm-up: tables, scratch buffers, worker pool
        off, on = [], []
        for _ in range(args.reps):
            off.append(_stage_seconds(weights, scheme, dev, False))
            on.append(_stage_seconds(weights, scheme, dev, True))
        a, b = min(off), min(on)
        pct = 100 * (b - a) / a
        print(f"{name:<12} {a * 1e3:8.0f}ms {b * 1e3:8.0f}ms {pct:8.1f}%  {'ok' if pct <= TARGET else 'over'}")


if __name__ == "__main__":
    main()
