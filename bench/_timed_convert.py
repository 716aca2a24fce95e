"""Run streamer.engine.convert.convert once and print how long the call took (imports excluded).

    python bench/_timed_convert.py SRC DST SCHEME [--device cpu] [--max-memory BYTES] [--workers N]

Prints one line `@@RESULT {"seconds": <convert() wall time>, "cpu_seconds": <process CPU time of it>, "import_seconds": ..., "summary": {...}}`.
The timed span is the same as the reference script's: the library call only, from opening the
source to the last file written (plan, pipeline, small files, commit).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

t_import = time.perf_counter()
import torch  # noqa: E402

from streamer.engine.convert import convert  # noqa: E402

t_import = time.perf_counter() - t_import


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("scheme")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-memory", type=int)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--ignore", default="[]", help="JSON list")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        torch.zeros(1, device=args.device)  # CUDA context outside the timed span, as for the reference's imports
    c0, t0 = time.process_time(), time.perf_counter()
    result = convert(args.src, args.dst, scheme=args.scheme, device=args.device, max_memory=args.max_memory,
                     workers=args.workers, ignore=json.loads(args.ignore))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print("@@RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu, "import_seconds": t_import, "summary": result.summary(),
                                    "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
