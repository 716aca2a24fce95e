"""Run llm-compressor's model_free_ptq (the reference) -- executed by the reference venv's python.

One run:   python model_free_ptq.py SRC DST SCHEME [--ignore JSON_LIST] [--max-workers N]
           prints one JSON line {"ok": true, "seconds": ...} at the end; exits 1 on failure.
Many runs: python model_free_ptq.py --jobs JOBS.json
           JOBS.json = [{"src", "dst", "scheme", "ignore": [...], "max_workers": 1}, ...]
           runs them all in this one process (imports are paid once), prints one JSON line per
           job {"ok", "seconds", "error", "traceback"} prefixed with "@@RESULT ", exits 0.
"""

import argparse
import json
import sys
import time
import traceback


def _run(job: dict) -> dict:
    from llmcompressor import model_free_ptq

    t0 = time.perf_counter()
    try:
        model_free_ptq(
            model_stub=job["src"],
            save_directory=job["dst"],
            scheme=job["scheme"],
            ignore=list(job.get("ignore") or []),
            max_workers=int(job.get("max_workers", 1)),
            device=job.get("device", "cpu"),
        )
    except BaseException as exc:  # noqa: BLE001 - report everything
        return {"ok": False, "seconds": time.perf_counter() - t0,
                "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    return {"ok": True, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="?")
    ap.add_argument("dst", nargs="?")
    ap.add_argument("scheme", nargs="?")
    ap.add_argument("--ignore", default="[]", help="JSON list of module names / re: patterns")
    ap.add_argument("--max-workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", help="JSON file with a list of jobs")
    args = ap.parse_args()

    import compressed_tensors
    import llmcompressor

    versions = {"llmcompressor": llmcompressor.__version__,
                "compressed_tensors": compressed_tensors.__version__}
    if args.jobs:
        with open(args.jobs) as f:
            jobs = json.load(f)
        for job in jobs:
            res = _run(job)
            if not res["ok"]:
                sys.stderr.write(res["traceback"])
            print("@@RESULT " + json.dumps({**res, **versions}), flush=True)
        return

    if not (args.src and args.dst and args.scheme):
        ap.error("SRC DST SCHEME (or --jobs) required")
    res = _run({"src": args.src, "dst": args.dst, "scheme": args.scheme,
                "ignore": json.loads(args.ignore), "max_workers": args.max_workers,
                "device": args.device})
    if not res["ok"]:
        sys.stderr.write(res["traceback"])
        sys.exit(1)
    print(json.dumps({**res, **versions}))


if __name__ == "__main__":
    main()
