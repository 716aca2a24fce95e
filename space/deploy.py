"""Publish this project as a Gradio Space, in one commit.

    python space/deploy.py you/streamer                 # create (if needed) and upload
    python space/deploy.py you/streamer --private
    python space/deploy.py --stage /tmp/space           # only assemble the Space's files

The Space repo holds: README.md (space/README.md, with the Space's front matter),
requirements.txt (space/requirements.txt), app.py and the streamer/ package. The token is HF_TOKEN or the `hf auth login` one; HF_ENDPOINT is honoured.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "space"
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def stage(dst: Path) -> Path:
    """Copy the Space's files into DST (created; must not exist or be empty); returns DST."""
    dst.mkdir(parents=True, exist_ok=True)
    if any(dst.iterdir()):
        raise SystemExit(f"{dst} is not empty")
    shutil.copy(SPACE / "README.md", dst / "README.md")
    shutil.copy(SPACE / "requirements.txt", dst / "requirements.txt")
    shutil.copy(ROOT / "app.py", dst / "app.py")
    shutil.copytree(ROOT / "streamer", dst / "streamer", ignore=SKIP)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space_id", nargs="?", help="owner/name of the Space")
    p.add_argument("--private", action="store_true", help="create the Space private")
    p.add_argument("--stage", type=Path, metavar="DIR", help="only write the Space's files to DIR")
    p.add_argument("--token", help="default: HF_TOKEN, then the login cache")
    args = p.parse_args(argv)
    if args.stage:
        print(f"staged the Space in {stage(args.stage)}")
        return 0
    if not args.space_id:
        p.error("give the Space id (owner/name), or --stage DIR")

    from huggingface_hub import HfApi

    api = HfApi(token=args.token)
    api.create_repo(args.space_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage(Path(tmp) / "space")
        info = api.upload_folder(
            repo_id=args.space_id, repo_type="space", folder_path=folder,
            commit_message="Deploy streamer", delete_patterns=["streamer/**", "*.py"],
        )  # fmt: skip
    print(f"deployed: {info.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
