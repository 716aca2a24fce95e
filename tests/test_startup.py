"""Fast start (issue 15): help, and a mirroring run whose jobs are all up to date, never import
torch or compressed-tensors (seconds of imports for nothing to convert). Each case runs in a
fresh interpreter and reads `sys.modules` at its end; how long it takes is bench/bench_startup.py's
business, not a test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import constants

from streamer.localhub import LocalHub

HEAVY = ("torch", "compressed_tensors")
TOKEN = "hf_alice_token"
REPO_ROOT = Path(__file__).resolve().parents[1]

# `python -m streamer ARGS`, run as -m runs it, then the heavy modules it imported, on the last
# line of stdout.
ENTRY = textwrap.dedent(
    """
    import json, runpy, sys
    sys.argv = ["streamer", *sys.argv[1:]]
    try:
        runpy.run_module("streamer", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    print(json.dumps({"rc": code, "heavy": [m for m in %r if m in sys.modules]}))
    """
    % (HEAVY,)
)


def run_streamer(args: list[str], env: dict | None = None) -> tuple[dict, str, str]:
    """`python -m streamer ARGS` in a fresh interpreter: ({rc, heavy}, the rest of stdout, stderr)."""
    env = {**(env or os.environ), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO_ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    *out, last = proc.stdout.rstrip("\n").split("\n")
    return json.loads(last), "\n".join(out), proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["mirror", "--help"]], ids=["help", "mirror-help"])
def test_help_imports_neither_torch_nor_compressed_tensors(args):
    end, out, err = run_streamer(args)
    assert end == {"rc": 0, "heavy": []}, err[-2000:]
    assert "usage: python -m streamer" in out


JOBS = """
[defaults]
scheme = "fp8_dynamic"
device = "cpu"

[[job]]
name = "a-fp8"
source = "org/llama-a"
target = "acme/llama-a-FP8"

[[job]]
name = "a-w8"
source = "org/llama-a@main"
target = "acme/llama-a-W8A16"
scheme = "W8A16"
ignore = ["lm_head", "re:.*embed_tokens$"]
"""


def test_an_up_to_date_mirroring_run_imports_neither(tmp_path, monkeypatch, llama_ckpt):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    with LocalHub(tmp_path / "hub") as hub:
        hub.add_user("alice", TOKEN, orgs=["acme", "org"])
        hub.seed_repo("org/llama-a", llama_ckpt)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf_home")}
        env.pop("HF_HUB_OFFLINE", None)

        # the first run publishes both targets (torch and all)
        end, out, err = run_streamer(["mirror", str(jobs), "--json"], env)
        assert end["rc"] == 0, err[-3000:]
        assert [j["status"] for j in json.loads(out)["jobs"]] == ["converted", "converted"], out

        # the second finds both up to date from the targets' cards: nothing heavy is imported
        end, out, err = run_streamer(["mirror", str(jobs), "--json"], env)
        assert end["rc"] == 0, err[-3000:]
        assert [j["status"] for j in json.loads(out)["jobs"]] == ["skipped", "skipped"], out
        assert end["heavy"] == [], f"an up-to-date run imported {end['heavy']}"


def test_the_schemes_known_without_compressed_tensors_are_its_data_free_presets():
    """The jobs file is checked without compressed-tensors for the schemes formats knows; the
    list must be exactly the presets compressed-tensors applies without calibration data."""
    from streamer.formats import DATA_FREE_SCHEMES
    from streamer.quant.schemes import accepted_presets

    assert DATA_FREE_SCHEMES == frozenset(accepted_presets())
