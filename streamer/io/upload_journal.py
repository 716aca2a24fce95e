"""The resume record of a Hub upload: which output shards an interrupted run already uploaded.

A run to the Hub uploads each shard's content as soon as the shard is complete, and commits them
all at the end. If it dies in between, the content is on the Hub but referenced by no commit; a
rerun of the same plan to the same branch finds the shards named here, asks the Hub whether it
still holds their content, and skips converting them again. The record is a small JSON file under
HF_HOME (name, sha256, size and the 512-byte sample LFS wants, per shard): the shards themselves
never touch the local disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub.lfs import UploadInfo


class UploadJournal:
    """The resume record kept at PATH (see `for_plan` for where a run keeps its own).

    Several runs of the same plan may write it at once (two identical commands): each write
    replaces the whole file, so a reader sees one run's complete record, never a mix."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    @classmethod
    def for_plan(cls, endpoint: str, repo_id: str, revision: str, fingerprint: str) -> UploadJournal:
        """The record of the plan FINGERPRINT uploaded to branch REVISION of REPO_ID on ENDPOINT."""
        key = hashlib.sha256(f"{endpoint}|{repo_id}|{revision}|{fingerprint}".encode()).hexdigest()
        return cls(Path(hf_constants.HF_HOME) / "streamer" / "uploads" / f"{key[:32]}.json")

    def _load(self) -> dict:
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def recorded(self, names: list[str]) -> dict[str, UploadInfo]:
        """The shards among NAMES that the record holds, with what the Hub knows their content by.

        A record that cannot be read counts as empty: those shards are converted again."""
        infos = {}
        for name, r in self._load().items():
            if name not in names:
                continue
            try:
                infos[name] = UploadInfo(sha256=bytes.fromhex(r["sha256"]), size=r["size"], sample=base64.b64decode(r["sample"]))
            except (KeyError, TypeError, ValueError):
                return {}
        return infos

    def notes(self, name: str) -> dict:
        """The notes recorded with shard NAME (empty when there are none)."""
        notes = self._load().get(name, {}).get("notes")
        return notes if isinstance(notes, dict) else {}

    def add(self, name: str, info: UploadInfo, notes: dict | None = None) -> None:
        """Record that the content INFO of shard NAME is on the Hub, with the run's NOTES on it."""
        with self._lock:
            record = self._load()
            record[name] = {"sha256": info.sha256.hex(), "size": info.size, "sample": base64.b64encode(info.sample).decode()}
            if notes:
                record[name]["notes"] = notes
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A temp name of its own: two identical runs at once share the record's path, and a
            # shared ".tmp" let one rename the other's file away. The last replace wins whole.
            fd, tmp = tempfile.mkstemp(prefix=self.path.stem + ".", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(record))
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def forget(self) -> None:
        """Delete the record: the upload was committed, or the repo it was for is gone.

        It names the tensors of a possibly private model, on what may be a shared machine."""
        self.path.unlink(missing_ok=True)
