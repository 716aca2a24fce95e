"""Throughput of streamer.quant.kernels.quantize_weight vs the compressed-tensors module path.

The module path is what llm-compressor's model_free_ptq does per weight: build an nn.Linear,
``initialize_module_for_quantization``, min/max observation of the flattened weight,
``calculate_qparams`` and ``compress_module`` (minus llm-compressor's observer bookkeeping, so
the real reference is a little slower still). Both sides run on the same device; the outputs are
checked to be byte-identical before timing.

    python bench/bench_kernels.py [--schemes FP8_DYNAMIC,NVFP4A16] [--shapes 4096x4096] [--device cpu]

Prints input MB/s (bf16 weight bytes / wall time) per scheme and shape. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the compressed-tensors oracle

from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402

from ct_oracle import ct_module_path as module_path  # noqa: E402
from streamer.quant.kernels import global_scale, quantize_weight  # noqa: E402

DEFAULT_SCHEMES = [
    "FP8_DYNAMIC",
    "FP8_BLOCK",
    "W8A8",
    "W4A16",
    "W4A16_ASYM",
    "W8A16",
    "NVFP4A16",
    "MXFP4A16",
    "MXFP8A16",
    "MXFP6A16",
]
DEFAULT_SHAPES = [(4096, 4096), (14336, 4096)]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev, reps: int, clock=time.perf_counter) -> float:
    fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t = clock()
        fn()
        _sync(dev)
        ts.append(clock() - t)
    return min(ts)  # min: the least disturbed run (shared machines are noisy)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in DEFAULT_SHAPES))
    ap.add_argument("--device", action="append", help="cpu / cuda (default: cpu, and cuda if available)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-module-path", action="store_true", help="time streamer only")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="measure process CPU time instead of wall time (with --threads 1 this is "
                         "the work done, unaffected by other processes on a shared machine)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.cpu_time else time.perf_counter
    devices = a.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CPU' if a.cpu_time else 'wall'} time, best of {a.reps}")
    print(f"{'device':6} {'scheme':12} {'shape':>11} {'streamer MB/s':>14} {'module MB/s':>12} {'speedup':>8}")
    for dname in devices:
        dev = torch.device(dname)
        for o, i in shapes:
            g = torch.Generator().manual_seed(0)
            w = (torch.randn(o, i, generator=g) * 0.02).to(torch.bfloat16).to(dev)
            mb = w.numel() * w.element_size() / 1e6
            for name in a.schemes.split(","):
                scheme = preset_name_to_scheme(name, ["Linear"])
                gs = global_scale([w], scheme) if scheme.weights.strategy == "tensor_group" else None
                t_s = _time(lambda: quantize_weight(w, scheme, gs), dev, a.reps, clock)
                line = f"{dname:6} {name:12} {f'{o}x{i}':>11} {mb / t_s:14.0f}"
                if not a.no_module_path:
                    ref = module_path(w, scheme)
                    mine = quantize_weight(w, scheme, gs)
                    same = all(
                        torch.equal(mine[k].contiguous().view(-1).view(torch.uint8), v.contiguous().view(-1).view(torch.uint8))
                        for k, v in ref.items()
                    )
                    t_m = _time(lambda: module_path(w, scheme), dev, max(1, a.reps - 1), clock)
                    line += f" {mb / t_m:12.0f} {t_m / t_s:7.1f}x" + ("" if same else "  OUTPUT DIFFERS")
                print(line, flush=True)


if __name__ == "__main__":
    main()
