"""Run llm-compressor's model_free_ptq once (executed by the reference venv's python).

    <ref-venv>/bin/python bench/_ref_timed.py SRC DST SCHEME [--max-workers N] [--device cpu] [--ignore JSON]

The same call as tests/refscripts/model_free_ptq.py; prints one line
`@@RESULT {"seconds": wall of the call, "cpu_seconds": process CPU time of the call (all threads)}`.
Imports happen before the timed span.
"""

import argparse
import json
import time

import compressed_tensors  # noqa: F401
from llmcompressor import model_free_ptq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("scheme")
    ap.add_argument("--ignore", default="[]")
    ap.add_argument("--max-workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    c0, t0 = time.process_time(), time.perf_counter()
    model_free_ptq(model_stub=args.src, save_directory=args.dst, scheme=args.scheme,
                   ignore=json.loads(args.ignore), max_workers=args.max_workers, device=args.device)
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print("@@RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu}), flush=True)


if __name__ == "__main__":
    main()
