"""Publish this project as a Gradio Space, in one commit.

    python space/deploy.py you/streamer                 # create (if needed) and upload
    python space/deploy.py you/streamer --private
    python space/deploy.py --stage /tmp/space           # only assemble the Space's files
    python space/deploy.py you/streamer --gpu           # for GPU hardware (CUDA torch, l4x1)

The Space repo holds: README.md (space/README.md, with the Space's front matter),
requirements.txt (space/requirements.txt), app.py and the streamer/ package, without what a
Space never runs (streamer.localhub, the demo, the webhook listener). The token is HF_TOKEN or the `hf auth login` one; HF_ENDPOINT is honoured.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "space"
# The Space imports streamer.engine.convert and mirroring's skip check (streamer/mirror/check.py
# and jobs.py); the loopback Hub, the demo and the webhook listener are only imported lazily by the
# CLI and `mirror --serve`.
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "localhub", "demo.py", "webhook.py")
CPU_TORCH = "--extra-index-url https://download.pytorch.org/whl/cpu"
GPU_HARDWARE = "l4x1"


def stage(dst: Path, *, gpu: bool = False) -> Path:
    """Copy the Space's files into DST (created; must not exist or be empty); returns DST.

    GPU: for GPU hardware, the CUDA build of torch (PyPI's) instead of the CPU one, and
    suggested_hardware set to a GPU."""
    dst.mkdir(parents=True, exist_ok=True)
    if any(dst.iterdir()):
        raise SystemExit(f"{dst} is not empty")
    readme = (SPACE / "README.md").read_text()
    reqs = (SPACE / "requirements.txt").read_text()
    if gpu:
        readme = re.sub(r"(?m)^suggested_hardware: .*$", f"suggested_hardware: {GPU_HARDWARE}", readme)
        reqs = "".join(line for line in reqs.splitlines(keepends=True) if line.strip() != CPU_TORCH)
    (dst / "README.md").write_text(readme)
    (dst / "requirements.txt").write_text(reqs)
    shutil.copy(ROOT / "app.py", dst / "app.py")
    shutil.copytree(ROOT / "streamer", dst / "streamer", ignore=SKIP)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space_id", nargs="?", help="owner/name of the Space")
    p.add_argument("--private", action="store_true", help="create the Space private")
    p.add_argument("--stage", type=Path, metavar="DIR", help="only write the Space's files to DIR")
    p.add_argument("--gpu", action="store_true", help="for GPU hardware: CUDA torch, suggested_hardware l4x1")
    p.add_argument("--token", help="default: HF_TOKEN, then the login cache")
    args = p.parse_args(argv)
    if args.stage:
        print(f"staged the Space in {stage(args.stage, gpu=args.gpu)}")
        return 0
    if not args.space_id:
        p.error("give the Space id (owner/name), or --stage DIR")

    from huggingface_hub import HfApi

    api = HfApi(token=args.token)
    api.create_repo(args.space_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage(Path(tmp) / "space", gpu=args.gpu)
        info = api.upload_folder(
            repo_id=args.space_id, repo_type="space", folder_path=folder,
            commit_message="Deploy streamer", delete_patterns=["streamer/**", "*.py"],
        )  # fmt: skip
    print(f"deployed: {info.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
