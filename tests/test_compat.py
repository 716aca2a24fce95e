"""`from streamer import model_free_ptq`: the reference's call, the CLI's output."""

from __future__ import annotations

import pytest

from streamer import model_free_ptq
from streamer.cli import main as cli
from streamer.errors import StreamerError
from test_hub import ALICE, SOURCE, hub  # noqa: F401  (the localhub fixture)

EXAMPLE = dict(
    scheme="FP8_BLOCK",
    ignore=["re:.*gate$", "lm_head", "model.embed_tokens"],
    max_workers=15,
    device="cpu",
    converter=None,
)
CLI_ARGS = ["--scheme", "FP8_BLOCK", "--ignore", "re:.*gate$", "--ignore", "lm_head",
            "--ignore", "model.embed_tokens", "--workers", "15", "--device", "cpu", "-q"]  # fmt: skip


def test_local_output_is_byte_identical_to_the_cli(llama_ckpt, tmp_path):
    model_free_ptq(model_stub=str(llama_ckpt), save_directory=str(tmp_path / "api-out"), **EXAMPLE)
    assert cli.main([str(llama_ckpt), str(tmp_path / "cli-out"), *CLI_ARGS]) == 0
    api_files = sorted(p.name for p in (tmp_path / "api-out").iterdir())
    assert api_files == sorted(p.name for p in (tmp_path / "cli-out").iterdir())
    for name in api_files:
        a, b = (tmp_path / "api-out" / name).read_bytes(), (tmp_path / "cli-out" / name).read_bytes()
        if name == "README.md":  # the card names its own folder
            a, b = a.replace(b"api-out", b"X"), b.replace(b"cli-out", b"X")
        assert a == b, name


def test_hub_output_is_byte_identical_to_the_cli(hub):  # noqa: F811
    model_free_ptq(model_stub=SOURCE, save_directory="hub://alice/api-copy", **EXAMPLE)
    assert cli.main([SOURCE, "alice/cli-copy", *CLI_ARGS]) == 0
    api_files, cli_files = hub.files("alice/api-copy"), hub.files("alice/cli-copy")
    assert api_files.keys() == cli_files.keys()
    for name in api_files:
        a, b = hub.read_file("alice/api-copy", name), hub.read_file("alice/cli-copy", name)
        if name == "README.md":
            a, b = a.replace(b"api-copy", b"X"), b.replace(b"cli-copy", b"X")
        assert a == b, name


def test_plain_org_name_save_directory_is_a_folder(llama_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_free_ptq(str(llama_ckpt), "org/Model-FP8", scheme="FP8_DYNAMIC", device="cpu")
    assert (tmp_path / "org" / "Model-FP8" / "config.json").exists()


def test_unsupported_converter_and_both_scheme_and_config(llama_ckpt, tmp_path):
    with pytest.raises(StreamerError, match="converter"):
        model_free_ptq(str(llama_ckpt), str(tmp_path / "x"), scheme="FP8_DYNAMIC", converter=object())
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    config = QuantizationConfig(config_groups={"g": preset_name_to_scheme("W8A16", ["Linear"])})
    with pytest.raises(StreamerError, match="not both"):
        model_free_ptq(str(llama_ckpt), str(tmp_path / "x"), scheme="FP8_DYNAMIC", config=config)
    result = model_free_ptq(str(llama_ckpt), str(tmp_path / "y"), config=config, ignore=["lm_head"], device="cpu")
    assert result.plan.recipe.ignore == ["lm_head"]
    assert not (tmp_path / "x").exists()
