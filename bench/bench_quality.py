"""The quality report's cost: the quantize stage with and without the error measurement.

`streamer.quant.kernels.quantize_weight(..., errors=ErrorSums())` accumulates ||W||², ||W - D||²
and Σ|W| inside its chunk loop (streamer.quant.quality); this times the same weights with and
without it and prints, per scheme, the median stage time of each and the overhead against the 5%
target of issue 18.

Fairness on a shared machine: both variants are warmed up (tables, scratch buffers, worker
pool), then measured in pairs whose order alternates (off-on, on-off, ...) so that a drift in
the machine's load hits both alike; each figure is the median over REPS. Two clocks: wall time,
and the process's CPU time (all worker threads together), which other processes' load disturbs
much less (the work is CPU-bound, so on an idle machine the two tell the same story). The load
average is printed before and after.

    python bench/bench_quality.py [--schemes FP8_DYNAMIC,W4A16] [--shapes 4096x4096] [--device cpu]
                                  [--reps 7] [--threads N]

Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def _stage(weights, scheme, dev, measure: bool) -> tuple[float, float]:
    """(wall, CPU) seconds to quantize WEIGHTS with SCHEME, measuring the error when MEASURE."""
    _sync(dev)
    t, c = time.perf_counter(), time.process_time()
    for w in weights:
        quantize_weight(w, scheme, None, errors=ErrorSums() if measure else None)
    _sync(dev)
    return time.perf_counter() - t, time.process_time() - c


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in DEFAULT_SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16).to(dev) for s in shapes]
    mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
    print(f"device {dev} ({torch.get_num_threads()} threads), weights {args.shapes} bf16 ({mb:.0f} MB), "
          f"median of {args.reps} alternating pairs; load average {_load()}")
    print(f"{'':<12} {'wall time':^28}  {'CPU time (all threads)':^28}")
    print(f"{'scheme':<12} {'without':>8} {'with':>8} {'overhead':>9}   {'without':>8} {'with':>8} {'overhead':>9}"
          f"  target <= {TARGET:g}%")
    for name in args.schemes.split(","):
        scheme = preset_name_to_scheme(name, ["Linear"])
        for measure in (False, True):  # warm-up: tables, scratch buffers, worker pool
            _stage(weights, scheme, dev, measure)
        off, on = [], []
        for i in range(args.reps):
            for measure in ((False, True) if i % 2 == 0 else (True, False)):
                (on if measure else off).append(_stage(weights, scheme, dev, measure))
        row = []
        for k in (0, 1):  # wall, CPU
            a, b = statistics.median(t[k] for t in off), statistics.median(t[k] for t in on)
            row.append((a, b, 100 * (b - a) / a))
        (wa, wb, wp), (ca, cb, cp) = row
        print(f"{name:<12} {wa * 1e3:6.0f}ms {wb * 1e3:6.0f}ms {wp:8.1f}%   {ca * 1e3:6.0f}ms {cb * 1e3:6.0f}ms "
              f"{cp:8.1f}%  {'ok' if cp <= TARGET else 'over'}")
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
