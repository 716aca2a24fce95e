"""The malformed-input corpus: every bad input a user or an attacker can hand streamer, run
through the command line.

Each case must end with a non-zero exit, exactly one `error:` line that names the problem, no
traceback, and the destination as it was: not created when it did not exist, byte for byte
unchanged when it held an earlier conversion (which a successful run would have replaced).
The corpus grows with every defect found; it never shrinks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from fixtures import (
    BF16_INF, BF16_NAN, BF16_NEG_INF, CORRUPTION_TARGET, CORRUPTION_WORDS, corrupt_checkpoint, read_header,
    set_element, weight_map, write_header,
)
from streamer.cli import main as cli
from streamer.engine.convert import convert

ROOT = Path(__file__).resolve().parent.parent
LAYERNORM = "model.layers.0.input_layernorm.weight"  # 1-D, always passed through


def tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- ways to damage a copy of a checkpoint ----------------------------------------------------


def _json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def config(value) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        _json(src / "config.json", value)
        return []

    return build


def config_raw(text: str) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        (src / "config.json").write_text(text)
        return []

    return build


def config_key(key: str, value) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        cfg = json.loads((src / "config.json").read_text())
        cfg[key] = value
        _json(src / "config.json", cfg)
        return []

    return build


def index(edit: Callable[[dict], object]) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        path = src / "model.safetensors.index.json"
        data = json.loads(path.read_text())
        _json(path, edit(data))
        return []

    return build


def _set(d: dict, key, value) -> dict:
    d[key] = value
    return d


def _first_weight(d: dict, value) -> dict:
    first = next(iter(d["weight_map"]))
    d["weight_map"][first] = value(d["weight_map"][first])
    return d


def header_entry(tensor: str, edit: Callable[[dict], object]) -> Callable:
    """Rewrite one tensor's header entry (keeping the data section)."""

    def build(src: Path, work: Path) -> list[str]:
        shard = src / weight_map(src)[tensor]
        header, _ = read_header(shard)
        header[tensor] = edit(dict(header[tensor]))
        write_header(shard, header)
        return []

    return build


def header_metadata(value) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        shard = src / weight_map(src)[CORRUPTION_TARGET]
        header, _ = read_header(shard)
        header["__metadata__"] = value
        write_header(shard, header)
        return []

    return build


def header_raw(raw: bytes) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        shard = src / weight_map(src)[CORRUPTION_TARGET]
        write_header(shard, None, raw=raw)
        return []

    return build


def corruption(kind: str) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        fresh = corrupt_checkpoint(kind, src, work / "corrupt")
        shutil.rmtree(src)
        shutil.move(fresh, src)
        return []

    return build


def scheme_file(content, suffix: str = ".yaml") -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        path = work / f"scheme{suffix}"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return ["--scheme-file", str(path)]

    return build


def poke(tensor: str, index: int, value: bytes) -> Callable:
    """Overwrite element INDEX of a BF16 tensor with the raw bytes VALUE (NaN, ±Inf)."""

    def build(src: Path, work: Path) -> list[str]:
        set_element(src, tensor, index, value)
        return []

    return build


def link(name: str, target: Callable[[Path, Path], Path], *, replace: bool = False) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        path = src / name
        if replace:
            path.unlink()
        path.symlink_to(target(src, work))
        return []

    return build


def _outside_file(src: Path, work: Path) -> Path:
    secret = work / "hf_token"
    secret.write_text("hf_secret_token")
    return secret


def _outside_folder(src: Path, work: Path) -> Path:
    folder = work / "elsewhere"
    folder.mkdir()
    (folder / "secret.txt").write_text("x")
    return folder


def _moved_shard(src: Path, work: Path) -> Path:
    shard = src / weight_map(src)[CORRUPTION_TARGET]
    moved = work / shard.name
    shutil.move(shard, moved)
    return moved


def fifo(name: str) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        os.mkfifo(src / name)
        return []

    return build


def args(*extra: str) -> Callable:
    def build(src: Path, work: Path) -> list[str]:
        return list(extra)

    return build


W = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}


@dataclass(frozen=True)
class Case:
    build: Callable
    words: tuple[str, ...]  # each must appear in the error line


CASES: dict[str, Case] = {
    # byte-level damage (fixtures.CORRUPTIONS)
    **{
        f"corrupt_{kind}": Case(corruption(kind), (word,))
        for kind, word in CORRUPTION_WORDS.items()
    },
    # config.json of the wrong type (issue 14)
    "config_list": Case(config([1, 2, 3]), ("config.json", "JSON object", "a list")),
    "config_null": Case(config(None), ("config.json", "JSON object", "null")),
    "config_string": Case(config("LlamaForCausalLM"), ("config.json", "a string")),
    "config_number": Case(config(3), ("config.json", "a number")),
    "config_deeply_nested": Case(config_raw("[" * 100_000 + "]" * 100_000), ("config.json", "nested too deeply")),
    "config_architectures_string": Case(config_key("architectures", "LlamaForCausalLM"), ("'architectures'", "list of strings")),
    "config_architectures_numbers": Case(config_key("architectures", [1]), ("'architectures'", "list of strings")),
    "config_quantization_config_list": Case(config_key("quantization_config", [1]), ("'quantization_config'", "an object")),
    "config_model_type_number": Case(config_key("model_type", 7), ("'model_type'", "a string")),
    # the index (issue 14)
    "index_list": Case(index(lambda d: [d]), ("model.safetensors.index.json", "a list")),
    "index_null": Case(index(lambda d: None), ("model.safetensors.index.json", "null")),
    "weight_map_value_list": Case(index(lambda d: _first_weight(d, lambda v: [v])), ("weight_map[", "a list")),
    "weight_map_value_number": Case(index(lambda d: _first_weight(d, lambda v: 1)), ("weight_map[", "a number")),
    "weight_map_is_list": Case(index(lambda d: _set(d, "weight_map", list(d["weight_map"]))), ("weight_map",)),
    "index_metadata_list": Case(index(lambda d: _set(d, "metadata", [1, 2])), ("metadata must be an object", "a list")),
    "index_metadata_string": Case(index(lambda d: _set(d, "metadata", "x")), ("metadata must be an object", "a string")),
    # safetensors header types (issue 14): `true` is a Python int, so it used to pass
    "shape_bool": Case(header_entry(LAYERNORM, lambda e: _set(e, "shape", [True, e["shape"][0]])), (LAYERNORM, "shape", "True")),
    "shape_negative": Case(header_entry(CORRUPTION_TARGET, lambda e: _set(e, "shape", [-256, -256])), ("shape", "non-negative")),
    "shape_float": Case(header_entry(CORRUPTION_TARGET, lambda e: _set(e, "shape", [256.0, 256])), ("shape", "256.0")),
    "shape_string": Case(header_entry(CORRUPTION_TARGET, lambda e: _set(e, "shape", ["256", 256])), ("shape", "'256'")),
    "shape_null": Case(header_entry(CORRUPTION_TARGET, lambda e: _set(e, "shape", None)), ("shape", "None")),
    "dtype_list": Case(header_entry(CORRUPTION_TARGET, lambda e: _set(e, "dtype", ["BF16"])), ("dtype must be a string", "a list")),
    "dtype_number": Case(header_entry(CORRUPTION_TARGET, lambda e: _set(e, "dtype", 2)), ("dtype must be a string", "a number")),
    "dtype_missing": Case(header_entry(CORRUPTION_TARGET, lambda e: {k: v for k, v in e.items() if k != "dtype"}), ("dtype must be a string", "null")),
    "offsets_bool": Case(header_entry(LAYERNORM, lambda e: _set(e, "data_offsets", [e["data_offsets"][0], True])), ("data_offsets", "True")),
    "offsets_float": Case(header_entry(CORRUPTION_TARGET, lambda e: _set(e, "data_offsets", [float(o) for o in e["data_offsets"]])), ("data_offsets",)),
    "offsets_string": Case(header_entry(CORRUPTION_TARGET, lambda e: _set(e, "data_offsets", [str(o) for o in e["data_offsets"]])), ("data_offsets",)),
    "offsets_three": Case(header_entry(CORRUPTION_TARGET, lambda e: _set(e, "data_offsets", e["data_offsets"] + [0])), ("data_offsets", "[begin, end]")),
    "entry_not_object": Case(header_entry(CORRUPTION_TARGET, lambda e: [e]), (CORRUPTION_TARGET, "must be an object")),
    "header_metadata_list": Case(header_metadata(["pt"]), ("__metadata__", "a list")),
    "header_metadata_number_value": Case(header_metadata({"format": 1}), ("__metadata__", "'format'", "a number")),
    "header_deeply_nested": Case(header_raw(b"[" * 50_000 + b"]" * 50_000), ("header", "nested too deeply")),
    # --scheme-file (issue 12): exit 2 with the file and the field, never a ValueError
    "scheme_observer_mse": Case(
        scheme_file({"config_groups": {"g": {"targets": ["Linear"], "weights": {**W, "observer": "mse"}}}}),
        ("scheme file", "config_groups.g.weights", "observer 'mse'"),
    ),
    "scheme_unknown_key": Case(
        scheme_file({"config_groups": {"g": {"targets": ["Linear"], "weights": {**W, "colour": "red"}}}}),
        ("scheme file", "config_groups.g.weights.colour", "unknown key"),
    ),
    "scheme_unknown_top_key": Case(
        scheme_file({"config_groups": {"g": {"weights": W}}, "ignroe": ["lm_head"]}),
        ("scheme file", "ignroe", "unknown key"),
    ),
    "scheme_wrong_type": Case(
        scheme_file({"g": {"weights": {**W, "num_bits": "eight"}}}),
        ("scheme file", "g.weights.num_bits", "'eight'"),
    ),
    "scheme_bool_bits": Case(scheme_file({"g": {"weights": {**W, "num_bits": True}}}), ("g.weights.num_bits", "whole number")),
    "scheme_targets_string": Case(scheme_file({"g": {"targets": "Linear", "weights": W}}), ("g.targets", "valid list")),
    "scheme_static_activations": Case(
        scheme_file({"g": {"weights": W, "input_activations": {**W, "strategy": "tensor", "dynamic": False}}}),
        ("scheme file", "g.input_activations", "calibration"),
    ),
    "scheme_kv_cache": Case(
        scheme_file({"config_groups": {"g": {"weights": W}}, "kv_cache_scheme": {**W, "strategy": "tensor"}}),
        ("scheme file", "kv_cache_scheme", "calibration"),
    ),
    "scheme_bad_regex": Case(scheme_file({"g": {"targets": ["re:(("], "weights": W}}), ("g.targets[0]", "not a valid regex")),
    "scheme_asymmetric_fp8": Case(scheme_file({"g": {"weights": {**W, "symmetric": False}}}), ("g.weights", "asymmetric")),
    "scheme_unknown_format": Case(scheme_file({"g": {"weights": W, "format": "zip"}}), ("g.format", "'zip'")),
    "scheme_not_a_mapping": Case(scheme_file("- 1\n- 2\n"), ("scheme file", "a list")),
    "scheme_empty": Case(scheme_file(""), ("scheme file", "nothing")),
    "scheme_not_json": Case(scheme_file("{", suffix=".json"), ("scheme file", "not valid JSON")),
    # links and special files in a local source (issue 14)
    "link_to_token_outside": Case(link("tokenizer_extra.json", _outside_file), ("tokenizer_extra.json", "outside the folder")),
    "link_to_etc": Case(
        link("generation_config.json", lambda s, w: Path("/etc/hostname") if Path("/etc/hostname").exists() else Path("/etc/passwd"), replace=True),
        ("generation_config.json", "outside the folder"),
    ),
    "link_shard_outside": Case(
        lambda src, work: link(weight_map(src)[CORRUPTION_TARGET], lambda s, w: _moved_shard(src, work))(src, work),
        ("safetensors", "outside the folder"),
    ),
    "link_folder_outside": Case(link("original", _outside_folder), ("original", "outside the source")),
    "link_dangling": Case(link("extra.json", lambda s, w: s / "missing.json"), ("extra.json", "cannot be read")),
    "fifo": Case(fifo("added_tokens.json"), ("added_tokens.json", "named pipe")),
    # NaN / Inf in a weight to quantize (issue 14): refused from the data, naming the tensor
    "nan_weight": Case(poke(CORRUPTION_TARGET, 77, BF16_NAN), (CORRUPTION_TARGET, "1 NaN", "--nonfinite passthrough")),
    "inf_weight": Case(poke(CORRUPTION_TARGET, 5, BF16_INF), (CORRUPTION_TARGET, "1 Inf", "--ignore model.layers.0.self_attn.q_proj")),
    "neg_inf_weight": Case(poke(CORRUPTION_TARGET, 0, BF16_NEG_INF), (CORRUPTION_TARGET, "Inf")),
    # --max-memory (issue 14): 0 or a fraction is refused, not read as "the default"
    "max_memory_zero": Case(args("--max-memory", "0"), ("--max-memory", "less than one byte")),
    "max_memory_half_byte": Case(args("--max-memory", "0.5"), ("--max-memory", "less than one byte")),
    "max_memory_not_a_size": Case(args("--max-memory", "1.2.3GB"), ("--max-memory", "not a size")),
    "max_memory_too_small": Case(args("--max-memory", "10kB"), ("--max-memory", "largest need", "or more")),
}


@pytest.fixture(scope="module")
def earlier_output(llama_ckpt, tmp_path_factory) -> Path:
    """A destination streamer wrote: a successful rerun would replace it, a refused one must not."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    convert(str(llama_ckpt), str(out), scheme="FP8_DYNAMIC", device="cpu")
    return out


def _run(src: Path, dst: Path, extra: list[str], capsys) -> tuple[int, str]:
    scheme = [] if "--scheme-file" in extra else ["--scheme", "FP8_DYNAMIC"]
    try:
        code = cli.main([str(src), str(dst), *scheme, *extra, "--device", "cpu", "-q"])
    except SystemExit as e:  # argparse refuses bad option values by exiting, as in a process
        code = e.code
    return code, capsys.readouterr().err


def _check_refusal(code: int, err: str, words: tuple[str, ...]) -> None:
    assert code != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if re.match(r"^(error: |python -m streamer: error: )", line)]
    assert len(errors) == 1, err
    # argparse prints its usage line first; otherwise the error line is all there is
    others = [line for line in err.splitlines() if line.strip() and line not in errors]
    assert all(line.startswith("usage:") or line.startswith(" ") for line in others), err
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    assert "ValueError" not in errors[0] and "TypeError" not in errors[0] and "--verbose" not in errors[0]


@pytest.mark.parametrize("dst_state", ["absent", "earlier_output"])
@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_is_refused_cleanly(name, dst_state, llama_ckpt, earlier_output, tmp_path, capsys):
    case = CASES[name]
    src = tmp_path / "src"
    shutil.copytree(llama_ckpt, src)
    work = tmp_path / "work"
    work.mkdir()
    extra = case.build(src, work)
    dst = tmp_path / "dst" / "out"
    if dst_state == "earlier_output":
        shutil.copytree(earlier_output, dst)
        before = tree(dst)
    code, err = _run(src, dst, extra, capsys)
    _check_refusal(code, err, case.words)
    if dst_state == "absent":
        assert not dst.parent.exists(), "the run created folders for a destination it never wrote"
    else:
        assert tree(dst) == before
        assert sorted(p.name for p in dst.parent.iterdir()) == ["out"], "staging left behind"


def test_malformed_input_in_a_real_process(llama_ckpt, tmp_path):
    """The same contract through `python -m streamer`: exit code 2 and one line, no traceback."""
    for name in ("config_list", "scheme_observer_mse", "nan_weight", "max_memory_zero"):
        src = tmp_path / name / "src"
        shutil.copytree(llama_ckpt, src)
        extra = CASES[name].build(src, src.parent)
        scheme = [] if "--scheme-file" in extra else ["--scheme", "FP8_DYNAMIC"]
        dst = tmp_path / name / "out"
        proc = subprocess.run(
            [sys.executable, "-m", "streamer", str(src), str(dst), *scheme, *extra, "--device", "cpu", "-q"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 2, (name, proc.stderr)
        _check_refusal(proc.returncode, proc.stderr, CASES[name].words)
        assert not dst.exists()


# --- what the refusals suggest works ----------------------------------------------------------


def test_nonfinite_passthrough_quantizes_with_a_warning(llama_ckpt, tmp_path, capsys, caplog):
    src = tmp_path / "src"
    shutil.copytree(llama_ckpt, src)
    poke(CORRUPTION_TARGET, 77, BF16_NAN)(src, tmp_path)
    poke(LAYERNORM, 3, BF16_NAN)(src, tmp_path)  # passed through byte for byte: no check
    dst = tmp_path / "out"
    code = cli.main([str(src), str(dst), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q", "--nonfinite", "passthrough"])
    err = capsys.readouterr().err
    assert code == 0, err
    # (in a process the warning goes to stderr; under pytest the log records are captured)
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert CORRUPTION_TARGET in warned and "NaN" in warned and LAYERNORM not in warned
    from safetensors import safe_open

    shard = dst / weight_map(dst)[CORRUPTION_TARGET.replace(".weight", ".weight_scale")]
    with safe_open(shard, "pt") as f:
        scale = f.get_tensor(CORRUPTION_TARGET.replace(".weight", ".weight_scale"))
    assert not scale.isfinite().all()  # what the user asked for, and was warned about

    # the policy was for that command only: the next one refuses again
    code = cli.main([str(src), str(tmp_path / "again"), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q"])
    assert code == 2 and "NaN" in capsys.readouterr().err


def test_ignoring_the_nonfinite_module_converts(llama_ckpt, tmp_path):
    """The refusal's other suggestion: --ignore the module keeps it as it is."""
    src = tmp_path / "src"
    shutil.copytree(llama_ckpt, src)
    poke(CORRUPTION_TARGET, 77, BF16_NAN)(src, tmp_path)
    result = convert(str(src), str(tmp_path / "out"), scheme="FP8_DYNAMIC", device="cpu",
                     ignore=["model.layers.0.self_attn.q_proj"])  # fmt: skip
    assert CORRUPTION_TARGET not in {q.tensor for j in result.plan.jobs for q in j.quantize}


def test_memory_refusal_names_the_largest_need_and_its_suggestion_works(llama_ckpt, tmp_path, capsys):
    code = cli.main([str(llama_ckpt), str(tmp_path / "a"), "--scheme", "NVFP4A16", "--device", "cpu", "-q", "--max-memory", "10kB"])
    err = capsys.readouterr().err
    assert code == 2
    suggested = re.search(r"pass --max-memory (\S+) or more", err).group(1)

    import torch

    from streamer.engine.convert import prepare
    from streamer.engine.pipeline import Runner
    from streamer.formats import human_bytes, parse_size
    from streamer.io.sink import LocalSink

    source, plan = prepare(str(llama_ckpt), scheme="NVFP4A16")
    source.close()
    needs = Runner(plan, None, LocalSink(tmp_path / "x"), device=torch.device("cpu"), max_memory=1).memory_needs(plan.jobs)
    largest = max(n for n, _ in needs)
    # the largest need (not the first tensor that does not fit), with its size
    assert any(what in err for n, what in needs if n == largest)
    assert human_bytes(largest) in err
    assert parse_size(suggested) >= largest

    # the suggestion works, and a byte less than the largest need is refused in turn
    assert cli.main([str(llama_ckpt), str(tmp_path / "b"), "--scheme", "NVFP4A16", "--device", "cpu", "-q", "--max-memory", suggested]) == 0
    assert cli.main([str(llama_ckpt), str(tmp_path / "c"), "--scheme", "NVFP4A16", "--device", "cpu", "-q", "--max-memory", str(largest - 1)]) == 2
    assert "or more" in capsys.readouterr().err


def test_memory_suggestion_works_for_a_sink_that_buffers_shards(llama_ckpt, tmp_path):
    """With the Hub sink a shard stays in memory until uploaded: the need is a tensor beside its
    shard, and the suggested budget must finish (a tensor that cannot fit would wait forever)."""
    import threading

    from streamer.errors import StreamerError
    from streamer.formats import parse_size
    from streamer.io.sink import LocalSink

    class Buffering(LocalSink):
        buffers_shards = True

    with pytest.raises(StreamerError) as err:
        convert(str(llama_ckpt), Buffering(tmp_path / "a"), scheme="FP8_DYNAMIC", device="cpu", max_memory=100_000)
    message = str(err.value)
    assert "beside its output shard" in message
    suggested = parse_size(next(h.value for h in err.value.hints if h.setting == "max_memory"))
    done = []
    t = threading.Thread(target=lambda: done.append(convert(
        str(llama_ckpt), Buffering(tmp_path / "b"), scheme="FP8_DYNAMIC", device="cpu", max_memory=suggested)))
    t.daemon = True
    t.start()
    t.join(timeout=120)
    assert done, "the suggested budget deadlocked"
    assert done[0].stats.peak_budget <= suggested
