"""The path users take today, for bench_hub.py: download the whole repo, quantize locally, upload the folder.

    HF_ENDPOINT=... HF_TOKEN=... python bench/_baseline_hub.py SRC_REPO DST_REPO WORKDIR SCHEME

1. `huggingface_hub.snapshot_download(SRC_REPO, local_dir=WORKDIR/snapshot)` (the whole repo)
2. quantize WORKDIR/snapshot -> WORKDIR/quantized with streamer's local engine (`streamer.engine.convert.convert`)
3. `HfApi.upload_folder(WORKDIR/quantized -> DST_REPO)` (one commit)

Prints `@@RESULT {"download": s, "quantize": s, "upload": s, "total": s, "disk_bytes": ...}`, where
disk_bytes is the local disk the run held at its peak (full copy + quantized output, allocated
blocks). The folders are left for the caller to time other quantizers on and then delete.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import tree_bytes  # noqa: E402


def main() -> None:
    src_repo, dst_repo, work, scheme = sys.argv[1:5]
    work = Path(work)
    snap, out = work / "snapshot", work / "quantized"
    from huggingface_hub import HfApi, snapshot_download

    from streamer.engine.convert import convert  # imported before the clock starts, like the phases it times

    t0 = time.perf_counter()
    snapshot_download(src_repo, local_dir=snap)
    t1 = time.perf_counter()
    convert(str(snap), str(out), scheme=scheme, device="cpu")
    t2 = time.perf_counter()
    disk = tree_bytes(snap) + tree_bytes(out)
    api = HfApi()
    api.create_repo(dst_repo, exist_ok=True)
    api.upload_folder(repo_id=dst_repo, folder_path=out, commit_message=f"Quantize {src_repo} with {scheme}")
    t3 = time.perf_counter()
    print("@@RESULT " + json.dumps({"download": t1 - t0, "quantize": t2 - t1, "upload": t3 - t2, "total": t3 - t0,
                                    "disk_bytes": disk, "snapshot_bytes": tree_bytes(snap),
                                    "output_bytes": tree_bytes(out)}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    main()
