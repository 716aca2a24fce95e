"""The reference implementation: llm-compressor 0.14.0.1 ``model_free_ptq``, in its own venv.

llm-compressor pins compressed-tensors 0.19 and transformers <= 5.17, which cannot share a venv
with streamer's test environment, so it lives in ``$STREAMER_REF_VENV`` (default
``<repo>/.venv-ref``, created by ``.ci/setup_reference.sh``) and runs in a subprocess.

API
---
``reference_python()``        the ref venv's python, or None when it is absent / lacks llmcompressor
``require_reference()``       that python; pytest.fail when $CI is set and it is absent, else skip
``run_reference(src, dst, scheme, ignore=(), max_workers=1)``   -> dst (ReferenceFailed on error)
``run_reference_many(jobs)``  several runs in one subprocess -> [ReferenceResult]
``compare_checkpoints(a, b)`` -> list of human-readable differences ([] = identical where it counts)
``tensor_records(path)``      name -> TensorRecord(file, dtype, shape, raw bytes) of a checkpoint
"""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[1]
REF_SCRIPT = Path(__file__).resolve().parent / "refscripts" / "model_free_ptq.py"

__all__ = [
    "REPO",
    "ReferenceFailed",
    "reference_venv",
    "reference_python",
    "require_reference",
    "run_reference",
    "run_reference_many",
    "ReferenceResult",
    "compare_checkpoints",
    "tensor_records",
    "TensorRecord",
    "QCONFIG_KEYS",
]


class ReferenceFailed(RuntimeError):
    """model_free_ptq exited non-zero; ``.stderr`` holds its captured stderr."""

    def __init__(self, message: str, stderr: str = "", stdout: str = "", returncode: int = 1):
        super().__init__(message)
        self.stderr = stderr
        self.stdout = stdout
        self.returncode = returncode


def reference_venv() -> Path:
    return Path(os.environ.get("STREAMER_REF_VENV") or (REPO / ".venv-ref"))


@functools.lru_cache(maxsize=None)
def _probe(python: str) -> bool:
    """Cheap check: does this python have llmcompressor installed (no import of it)."""
    try:
        r = subprocess.run(
            [python, "-c", "import importlib.util as u, sys; "
                           "sys.exit(0 if u.find_spec('llmcompressor') and "
                           "u.find_spec('compressed_tensors') else 1)"],
            capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def reference_python() -> Path | None:
    """Python of the reference venv, or None when it is missing or lacks llmcompressor."""
    venv = reference_venv()
    for cand in (venv / "bin" / "python", venv / "Scripts" / "python.exe"):
        if cand.exists() and _probe(str(cand)):
            return cand
    return None


def require_reference() -> Path:
    """For tests: the reference python.  Missing venv -> pytest.fail under CI (env ``CI`` set and
    not "0"/"false"), pytest.skip locally."""
    import pytest

    py = reference_python()
    if py is not None:
        return py
    msg = (f"reference venv {reference_venv()} is missing or lacks llmcompressor; "
           f"run .ci/setup_reference.sh (or set STREAMER_REF_VENV)")
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 4)))
    return env


def _python_or_raise(python: Path | None) -> Path:
    py = python or reference_python()
    if py is None:
        raise FileNotFoundError(f"no reference venv at {reference_venv()} "
                                f"(run .ci/setup_reference.sh)")
    return Path(py)


def run_reference(src: Path, dst: Path, scheme: str, ignore: Iterable[str] = (),
                  max_workers: int = 1, *, timeout: float = 900,
                  python: Path | None = None) -> Path:
    """Run llm-compressor ``model_free_ptq(src -> dst, scheme, ignore, max_workers, device="cpu")``
    in the reference venv (one subprocess; ~8 s of it is interpreter start-up and imports).
    Returns ``dst``; raises ReferenceFailed (message ends with the tail of the captured stderr)
    when it fails, FileNotFoundError when there is no reference venv.

    ``run_reference.last_seconds``: duration of the model_free_ptq call itself;
    ``run_reference.last_wall``: of the whole subprocess.
    """
    py = _python_or_raise(python)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    cmd = [str(py), str(REF_SCRIPT), str(src), str(dst), scheme,
           "--ignore", json.dumps(list(ignore)), "--max-workers", str(max_workers),
           "--device", "cpu"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(),
                       cwd=str(REF_SCRIPT.parent))
    run_reference.last_wall = time.perf_counter() - t0
    run_reference.last_stderr = r.stderr
    run_reference.last_seconds = None
    if r.returncode != 0:
        raise ReferenceFailed(
            f"model_free_ptq({scheme}, ignore={list(ignore)}) on {src} failed "
            f"(exit {r.returncode}):\n{r.stderr[-6000:]}", stderr=r.stderr, stdout=r.stdout,
            returncode=r.returncode)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{") and '"seconds"' in line:
            run_reference.last_seconds = json.loads(line)["seconds"]
            break
    return dst


run_reference.last_seconds = None
run_reference.last_wall = None
run_reference.last_stderr = ""


@dataclass
class ReferenceResult:
    src: Path
    dst: Path
    scheme: str
    ignore: list
    ok: bool
    seconds: float
    error: str = ""          # "ExceptionType: message" when not ok
    traceback: str = ""


def run_reference_many(jobs: Iterable[dict], *, timeout: float = 1800,
                       python: Path | None = None) -> list[ReferenceResult]:
    """Run several model_free_ptq jobs in ONE reference subprocess (start-up paid once).

    jobs: dicts with src, dst, scheme and optional ignore (list), max_workers (int).
    Failures of single jobs do not raise: see ``ReferenceResult.ok/error/traceback``.
    Raises ReferenceFailed only when the subprocess itself dies.
    """
    import tempfile

    py = _python_or_raise(python)
    norm = [{"src": str(Path(j["src"]).resolve()), "dst": str(Path(j["dst"]).resolve()),
             "scheme": j["scheme"], "ignore": list(j.get("ignore") or []),
             "max_workers": int(j.get("max_workers", 1)), "device": "cpu"} for j in jobs]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(norm, f)
        jobs_file = f.name
    try:
        r = subprocess.run([str(py), str(REF_SCRIPT), "--jobs", jobs_file], capture_output=True,
                           text=True, timeout=timeout, env=_env(), cwd=str(REF_SCRIPT.parent))
    finally:
        os.unlink(jobs_file)
    results = [json.loads(line[len("@@RESULT "):]) for line in r.stdout.splitlines()
               if line.startswith("@@RESULT ")]
    if r.returncode != 0 or len(results) != len(norm):
        raise ReferenceFailed(f"reference subprocess failed (exit {r.returncode}) after "
                              f"{len(results)}/{len(norm)} jobs:\n{r.stderr[-6000:]}",
                              stderr=r.stderr, stdout=r.stdout, returncode=r.returncode)
    return [ReferenceResult(Path(j["src"]), Path(j["dst"]), j["scheme"], j["ignore"], res["ok"],
                            res["seconds"], res.get("error", ""), res.get("traceback", ""))
            for j, res in zip(norm, results)]


# --------------------------------------------------------------------------------------------
# comparing two checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRecord:
    file: str
    dtype: str
    shape: tuple
    data: bytes

    def __repr__(self) -> str:  # keep diffs readable
        return f"TensorRecord({self.file}, {self.dtype}, {list(self.shape)}, {len(self.data)} B)"


def _records_of_file(path: Path) -> dict[str, TensorRecord]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = TensorRecord(path.name, info["dtype"], tuple(info["shape"]),
                                 raw[base + b: base + e])
    return out


def tensor_records(path: Path) -> dict[str, TensorRecord]:
    """name -> TensorRecord for every tensor in every ``*.safetensors`` of a folder.  A name
    present in several files is recorded as ``name@file`` for the extra ones."""
    out: dict[str, TensorRecord] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        for name, rec in _records_of_file(f).items():
            out[name if name not in out else f"{name}@{f.name}"] = rec
    return out


QCONFIG_KEYS = ("config_groups", "format", "ignore", "quant_method")


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _count_diff(a: bytes, b: bytes) -> tuple[int, int]:
    """(number of differing bytes, index of the first) of two equally long byte strings."""
    try:
        import numpy as np

        d = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
        return int(d.size), int(d[0]) if d.size else -1
    except ImportError:  # pragma: no cover
        idx = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return len(idx), idx[0] if idx else -1


def _json_diffs(a, b, where: str, out: list[str], limit: int = 40) -> None:
    if len(out) >= limit:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{where}.{k}: only in b = {json.dumps(b[k])[:200]}")
            elif k not in b:
                out.append(f"{where}.{k}: only in a = {json.dumps(a[k])[:200]}")
            else:
                _json_diffs(a[k], b[k], f"{where}.{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _json_diffs(x, y, f"{where}[{i}]", out, limit)
    elif a != b:
        out.append(f"{where}: a = {json.dumps(a)[:200]} != b = {json.dumps(b)[:200]}")


def compare_checkpoints(a: Path, b: Path, *, qconfig_keys: Iterable[str] = QCONFIG_KEYS,
                        compare_index: bool = True, compare_other_config: bool = True,
                        ignore_ignore_order: bool = False) -> list[str]:
    """Differences between checkpoint folders ``a`` and ``b`` that matter, as readable lines.

    Compared: the set of ``*.safetensors`` file names; every tensor's file, dtype, shape and raw
    data bytes (straight from the safetensors headers and data sections, no float compare);
    the index's ``weight_map`` and ``metadata.total_size``; ``config.json``'s
    ``quantization_config`` keys in ``qconfig_keys`` (default: config_groups, format, ignore,
    quant_method; never ``version``) and, with ``compare_other_config``, every other
    ``config.json`` key.  Not compared: safetensors ``__metadata__``, tensor order inside a file,
    JSON formatting, small non-weight files.
    """
    a, b = Path(a), Path(b)
    out: list[str] = []

    fa = {p.name for p in a.glob("*.safetensors")}
    fb = {p.name for p in b.glob("*.safetensors")}
    if fa != fb:
        out.append(f"safetensors files differ: only in a {sorted(fa - fb)}, "
                   f"only in b {sorted(fb - fa)}")

    ra, rb = tensor_records(a), tensor_records(b)
    only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
    if only_a:
        out.append(f"{len(only_a)} tensors only in a: {only_a[:20]}")
    if only_b:
        out.append(f"{len(only_b)} tensors only in b: {only_b[:20]}")
    for name in sorted(set(ra) & set(rb)):
        x, y = ra[name], rb[name]
        if x.file != y.file:
            out.append(f"{name}: file {x.file} != {y.file}")
        if x.dtype != y.dtype:
            out.append(f"{name}: dtype {x.dtype} != {y.dtype}")
        if x.shape != y.shape:
            out.append(f"{name}: shape {list(x.shape)} != {list(y.shape)}")
        if x.data != y.data:
            if len(x.data) != len(y.data):
                out.append(f"{name}: {len(x.data)} bytes != {len(y.data)} bytes")
            else:
                nd, first = _count_diff(x.data, y.data)
                out.append(f"{name}: data differs in {nd}/{len(x.data)} bytes "
                           f"(first at byte {first})")

    if compare_index:
        ia = _json(a / "model.safetensors.index.json")
        ib = _json(b / "model.safetensors.index.json")
        if (ia is None) != (ib is None):
            out.append(f"index: present in {'a' if ia is not None else 'b'} only")
        elif ia is not None:
            wa, wb = ia.get("weight_map", {}), ib.get("weight_map", {})
            if wa != wb:
                ka, kb = set(wa), set(wb)
                moved = sorted(k for k in ka & kb if wa[k] != wb[k])
                out.append(f"index weight_map differs: {len(ka - kb)} only in a "
                           f"{sorted(ka - kb)[:10]}, {len(kb - ka)} only in b "
                           f"{sorted(kb - ka)[:10]}, {len(moved)} in other files "
                           f"{[(k, wa[k], wb[k]) for k in moved[:5]]}")
            ta = ia.get("metadata", {}).get("total_size")
            tb = ib.get("metadata", {}).get("total_size")
            if ta != tb:
                out.append(f"index total_size {ta} != {tb}")

    ca, cb = _json(a / "config.json"), _json(b / "config.json")
    if (ca is None) != (cb is None):
        out.append(f"config.json present in {'a' if ca is not None else 'b'} only")
    elif ca is not None:
        qa, qb = ca.get("quantization_config"), cb.get("quantization_config")
        if (qa is None) != (qb is None):
            out.append(f"quantization_config present in {'a' if qa is not None else 'b'} only")
        elif qa is not None:
            for k in qconfig_keys:
                if k == "version":
                    continue
                va, vb = qa.get(k), qb.get(k)
                if ignore_ignore_order and k == "ignore" and va and vb:
                    va, vb = sorted(va), sorted(vb)
                _json_diffs(va, vb, f"quantization_config.{k}", qdiffs := [])
                out.extend(qdiffs)
        if compare_other_config:
            rest_a = {k: v for k, v in ca.items() if k != "quantization_config"}
            rest_b = {k: v for k, v in cb.items() if k != "quantization_config"}
            _json_diffs(rest_a, rest_b, "config", cdiffs := [])
            out.extend(cdiffs)
    return out


if __name__ == "__main__":  # python tests/reference.py A B   -> prints differences
    diffs = compare_checkpoints(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(diffs) if diffs else "identical")
    sys.exit(1 if diffs else 0)
