"""A Hugging Face Hub-compatible HTTP server on loopback, for tests and benchmarks.

The real `huggingface_hub` client talks to it unmodified: point `endpoint=`/`HF_ENDPOINT` at
`LocalHub.url`. Uploads take whichever path the client picks, Xet (hf_xet installed, see xet.py)
or LFS. See hub.py for the Python API and `python -m streamer.localhub --help` for the command line.
"""

from .hub import CommitRecord, LocalHub
from .transport import RequestRecord

__all__ = ["CommitRecord", "LocalHub", "RequestRecord"]
