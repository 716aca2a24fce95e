"""The README's offline quickstart: `python -m streamer demo` converts Hub→Hub on localhub."""

from __future__ import annotations

import huggingface_hub.constants as hf

from streamer.cli import demo


def test_demo_converts_hub_to_hub(monkeypatch, capsys, tmp_path):
    # the demo points the process at its localhub; let monkeypatch put everything back
    for name in ("HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.setenv(name, "")
    for name in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE"):
        monkeypatch.setattr(hf, name, getattr(hf, name))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert demo.main(["--scheme", "FP8_DYNAMIC", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model-00001-of-00003.safetensors" in out and "config.json" in out
    assert "all ranged: True" in out
    # the commits are named: the repo's creation, then streamer's single conversion commit
    commits = out.split("commits on demo/tiny-llama-FP8_DYNAMIC, oldest first:\n", 1)[1].split("\n\n", 1)[0]
    lines = commits.splitlines()
    assert len(lines) == 2, commits
    assert lines[0].endswith("adds .gitattributes")
    assert "Quantize demo-org/tiny-llama with FP8_DYNAMIC (streamer): adds 7 files" in lines[1]
    assert "base_model: demo-org/tiny-llama" in out and "vllm serve demo/tiny-llama-FP8_DYNAMIC" in out
