"""The engine, local folder to local folder: plan up front, exact output, refusals, atomicity."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures import CORRUPTION_WORDS, CORRUPTIONS, corrupt_checkpoint, weight_map
from streamer.cli import main as cli
from streamer.engine.convert import convert, prepare
from streamer.errors import InputError, PlanError, SchemeError, StreamerError, TargetError
from streamer.io.source import LocalSource


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class CountingSource(LocalSource):
    """A local source that records every byte range it is asked for."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: list[tuple[str, int, int]] = []

    def read_into(self, path, span, out):
        self.reads.append((path, span.start, span.end))
        super().read_into(path, span, out)


# --- planning ------------------------------------------------------------------------------


def test_dry_run_reads_only_headers_and_writes_nothing(llama_ckpt, tmp_path, capsys):
    src = CountingSource(llama_ckpt)
    dst = tmp_path / "out"
    result = convert(src, str(dst), scheme="NVFP4A16", dry_run=True)
    assert not dst.exists()
    safetensors_reads = [r for r in src.reads if r[0].endswith(".safetensors")]
    header_bytes = sum(e - s for _, s, e in safetensors_reads)
    assert header_bytes == result.plan.catalog.header_bytes
    assert header_bytes < result.plan.bytes_in / 10

    assert cli.main([str(llama_ckpt), "--scheme", "NVFP4A16", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "fused sets sharing a global scale" in text
    assert "q_proj+k_proj+v_proj under model.layers.{0..1}.self_attn" in text
    assert "also reads from" in text  # fused partners straddle shards in this fixture
    for shard in {f for f in weight_map(llama_ckpt).values()}:
        assert shard in text


def test_plan_error_names_tensors_before_reading(odd_ckpt, tmp_path):
    src = CountingSource(odd_ckpt)
    with pytest.raises(PlanError) as err:
        convert(src, str(tmp_path / "out"), scheme="W4A16")
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj.weight" in message
    assert "128" in message
    assert all(e - s <= 8 or s == 8 for p, s, e in src.reads if p.endswith(".safetensors"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", ["FP8", "NVFP4", "UNQUANTIZED", "NOPE"])
def test_refused_schemes_list_accepted_names(scheme):
    with pytest.raises(SchemeError) as err:
        prepare("/nonexistent", scheme=scheme)
    assert "FP8_DYNAMIC" in str(err.value) and "NVFP4A16" in str(err.value)


@pytest.mark.parametrize("scheme,alike", [("NVFP4", "NVFP4A16"), ("FP8", "FP8_DYNAMIC"), ("UNQUANTIZED", None)])
def test_a_scheme_needing_calibration_points_to_its_data_free_twin(scheme, alike):
    with pytest.raises(SchemeError) as e:
        prepare("/nonexistent", scheme=scheme)
    assert [h.value for h in e.value.hints if h.setting == "scheme"] == ([alike] if alike else [])


def test_a_mistyped_scheme_is_named_with_the_preset_meant(llama_ckpt, tmp_path, capsys):
    assert cli.main([str(llama_ckpt), str(tmp_path / "out"), "--scheme", "FP8_DYNAMC", "-q"]) == 2
    err = capsys.readouterr().err
    assert "unknown scheme 'FP8_DYNAMC' (did you mean FP8_DYNAMIC?). Accepted" in err and "use --scheme FP8_DYNAMIC or use --scheme-file" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SchemeError) as e:  # nothing close: only the way to a custom scheme
        prepare(str(llama_ckpt), scheme="NOPE")
    assert [h.setting for h in e.value.hints] == ["scheme_file"]


def test_scheme_file_mixed_groups(llama_ckpt, tmp_path):
    spec = {
        "config_groups": {
            "attn": {
                "targets": ["re:.*self_attn\\.(q|k|v|o)_proj$"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            },
            "mlp": {
                "targets": ["re:.*mlp\\..*_proj$"],
                "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": True},
            },
        },
        "ignore": ["lm_head"],
    }
    path = tmp_path / "scheme.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    result = convert(str(llama_ckpt), str(tmp_path / "out"), scheme_file=str(path), device="cpu")
    out = tensors_of(tmp_path / "out")
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32
    assert out["model.layers.0.mlp.up_proj.weight_scale"].shape[1] == 256 // 64
    assert out["lm_head.weight"].dtype == torch.bfloat16
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert set(qc["config_groups"]) == {"attn", "mlp"}
    assert qc["format"] == "mixed-precision"
    assert result.plan.n_quantized == 14


def test_ignore_syntax(llama_ckpt, tmp_path):
    _, plan = prepare(
        str(llama_ckpt),
        scheme="FP8_DYNAMIC",
        ignore=["lm_head", "re:.*mlp\\.down_proj", "self_attn.o_proj"],  # last: exact, matches nothing
        default_ignore=False,  # the ignore list alone decides (the reference's semantics)
    )
    quantized = {q.tensor for j in plan.jobs for q in j.quantize}
    assert "lm_head.weight" not in quantized
    assert not any("down_proj" in n for n in quantized)
    assert "model.layers.0.self_attn.o_proj.weight" in quantized  # a plain name must equal the module
    assert "model.embed_tokens.weight" in quantized  # without the default policy, embeddings are quantized
    assert not any("norm" in n for n in quantized)
    assert any("'self_attn.o_proj' matches no module" in w for w in plan.warnings)


# --- exactness -----------------------------------------------------------------------------


def test_passthrough_is_byte_identical_and_index_is_right(llama_ckpt, tmp_path):
    dst = tmp_path / "out"
    convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", ignore=["lm_head"], device="cpu")
    src_t, out_t = tensors_of(llama_ckpt), tensors_of(dst)
    for name in ["lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"]:
        assert raw_bytes(src_t[name]) == raw_bytes(out_t[name])
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out_t.values())
    for name, shard in index["weight_map"].items():
        with safe_open(dst / shard, "pt") as h:
            assert name in h.keys()
    assert set(index["weight_map"]) == set(out_t)
    # small files are copied; the card is ours
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]:
        assert (dst / f).read_bytes() == (llama_ckpt / f).read_bytes()
    assert "compressed-tensors" in (dst / "README.md").read_text()


def test_single_file_checkpoint(single_file_ckpt, tmp_path):
    dst = tmp_path / "out"
    convert(str(single_file_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    assert (dst / "model.safetensors").exists()
    assert not (dst / "model.safetensors.index.json").exists()
    assert tensors_of(dst)["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn


def test_tied_embeddings(tied_ckpt, tmp_path):
    dst = tmp_path / "out"
    convert(str(tied_ckpt), str(dst), scheme="W8A16", ignore=["model.embed_tokens"], device="cpu")
    out = tensors_of(dst)
    assert "lm_head.weight" not in out  # tied: the checkpoint has no separate lm_head
    assert out["model.embed_tokens.weight"].dtype == torch.bfloat16


# --- fused sets beyond the reference -------------------------------------------------------


def _global_scales(folder: Path) -> dict[str, float]:
    return {
        k[: -len(".weight_global_scale")]: float(v.float().item())
        for k, v in tensors_of(folder).items()
        if k.endswith("weight_global_scale")
    }


def _same_shard(folder: Path, modules: list[str]) -> bool:
    wmap = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return len({wmap[m + ".weight_packed"] for m in modules}) == 1


@pytest.mark.parametrize(
    "arch,sets",
    [
        ("qwen3_moe", [["model.layers.1.mlp.experts.{e}.gate_proj", "model.layers.1.mlp.experts.{e}.up_proj"]]),
        ("mixtral", [["model.layers.1.block_sparse_moe.experts.{e}.w1", "model.layers.1.block_sparse_moe.experts.{e}.w3"]]),
        (
            "deepseek_v3",
            [
                ["model.layers.1.mlp.experts.{e}.gate_proj", "model.layers.1.mlp.experts.{e}.up_proj"],
                ["model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.up_proj"],
                ["model.layers.{e}.self_attn.q_a_proj", "model.layers.{e}.self_attn.kv_a_proj_with_mqa"],
                ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
            ],
        ),
    ],
)
def test_nvfp4_fused_sets_share_global_scale(checkpoint, tmp_path, arch, sets):
    src = checkpoint(arch)
    dst = tmp_path / "out"
    convert(str(src), str(dst), scheme="NVFP4A16", ignore=["lm_head", "re:.*mlp\\.gate$", "re:.*\\.gate$"], device="cpu")
    scales = _global_scales(dst)
    weights = tensors_of(src)
    checked = 0
    for template in sets:
        for e in range(2):
            members = [m.format(e=e) for m in template]
            if not all(m + ".weight" in weights for m in members):
                continue
            values = {scales[m] for m in members}
            assert len(values) == 1, f"{members} do not share a global scale: {values}"
            # the shared scale is the one computed over the whole set (largest amax wins)
            amax = max(weights[m + ".weight"].abs().max().float().item() for m in members)
            assert abs(values.pop() - 448 * 6 / amax) / (448 * 6 / amax) < 1e-2
            assert _same_shard(dst, members)
            checked += 1
    assert checked >= len(sets)


def test_fused_partner_ignored_or_missing_is_handled(llama_ckpt, tmp_path):
    # an ignored partner: the rest of the set still shares one scale, and the plan says why
    _, plan = prepare(str(llama_ckpt), scheme="NVFP4A16", ignore=["re:.*k_proj"])
    assert any("k_proj (not quantized with this group)" in w for w in plan.warnings)
    assert all(fs.family == "q_proj+v_proj" for fs in plan.fused_sets if "self_attn" in fs.parent)
    # a missing partner (removed from the checkpoint) is not a crash either
    broken = tmp_path / "src"
    shutil.copytree(llama_ckpt, broken)
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = "model.layers.0.self_attn.v_proj.weight"
    shard = broken / index["weight_map"].pop(victim)
    with safe_open(shard, "pt") as h:
        kept = {k: h.get_tensor(k) for k in h.keys() if k != victim}
        meta = h.metadata()
    save_file(kept, shard, metadata=meta)
    index_path.write_text(json.dumps(index))
    convert(str(broken), str(tmp_path / "out"), scheme="NVFP4A16", device="cpu")
    scales = _global_scales(tmp_path / "out")
    assert scales["model.layers.0.self_attn.q_proj"] == scales["model.layers.0.self_attn.k_proj"]


def test_3d_fused_experts_are_split_like_per_expert(moe_ckpt, tmp_path):
    """A checkpoint storing experts as 3-D gate_up_proj/down_proj converts to the same tensors as
    the per-expert layout."""
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in moe_ckpt.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, fused / f.name)
    weights = tensors_of(moe_ckpt)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in weights.items():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            prefix = ".".join(parts[: i + 1])
            experts.setdefault(prefix, {}).setdefault(int(parts[i + 1]), {})[parts[i + 2]] = t
        else:
            out[name] = t
    for prefix, by_e in experts.items():
        n = len(by_e)
        out[prefix + ".gate_up_proj"] = torch.stack([torch.cat([by_e[e]["gate_proj"], by_e[e]["up_proj"]]) for e in range(n)])
        out[prefix + ".down_proj"] = torch.stack([by_e[e]["down_proj"] for e in range(n)])
    save_file(out, fused / "model.safetensors", metadata={"format": "pt"})

    for scheme in ["NVFP4A16", "FP8_DYNAMIC"]:
        a, b = tmp_path / f"a-{scheme}", tmp_path / f"b-{scheme}"
        convert(str(moe_ckpt), str(a), scheme=scheme, ignore=["re:.*mlp\\.gate$"], device="cpu")
        convert(str(fused), str(b), scheme=scheme, ignore=["re:.*mlp\\.gate$"], device="cpu")
        ta, tb = tensors_of(a), tensors_of(b)
        assert set(ta) == set(tb)
        for k in ta:
            assert raw_bytes(ta[k]) == raw_bytes(tb[k]), k


def test_fp8_block_handles_out_features_not_multiple_of_128(checkpoint, tmp_path):
    """out_features need not divide by 128 (ceil-shaped scales, edge blocks by their own amax);
    in_features must (activation groups): down_proj (in 320) is kept unquantized on request."""
    src = checkpoint("llama", intermediate_size=320)
    dst = tmp_path / "out"
    convert(str(src), str(dst), scheme="FP8_BLOCK", device="cpu", skip_incompatible=True)
    out = tensors_of(dst)
    w = tensors_of(src)["model.layers.0.mlp.gate_proj.weight"]  # (320, 256)
    scale = out["model.layers.0.mlp.gate_proj.weight_scale"]
    assert tuple(scale.shape) == (3, 2)
    q = out["model.layers.0.mlp.gate_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == tuple(w.shape)
    # every block, edge blocks included, is scaled by its own amax
    for bi in range(3):
        for bj in range(2):
            block = w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128].float()
            expected = block.abs().max() / 448
            assert torch.isclose(scale[bi, bj].float(), expected, rtol=1e-2)
    deq = q.float() * scale.float().repeat_interleave(128, 0)[:320].repeat_interleave(128, 1)[:, :256]
    assert torch.nn.functional.cosine_similarity(deq.flatten(), w.float().flatten(), dim=0) > 0.999
    assert out["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16  # in 320: kept


def test_router_gate_warning(checkpoint):
    _, plan = prepare(str(checkpoint("qwen3_moe")), scheme="FP8_DYNAMIC")
    assert [r.modules for r in plan.kept_by_policy if r.rule == "MoE routers"] == [
        ("model.layers.0.mlp.gate", "model.layers.1.mlp.gate")
    ]
    _, plan = prepare(str(checkpoint("qwen3_moe")), scheme="FP8_DYNAMIC", default_ignore=False)
    assert any("MoE routers (2: model.layers.{0..1}.mlp.gate)" in w for w in plan.warnings)


# --- files the index does not reference ----------------------------------------------------


def test_unreferenced_and_bin_files_are_skipped(llama_ckpt, tmp_path, caplog):
    src = tmp_path / "src"
    shutil.copytree(llama_ckpt, src)
    shutil.copy(next(src.glob("model-00001*.safetensors")), src / "consolidated.safetensors")
    (src / "pytorch_model.bin").write_bytes(b"\0" * 64)
    (src / "original").mkdir()
    (src / "original" / "params.json").write_text("{}")
    _, plan = prepare(str(src), scheme="FP8_DYNAMIC")
    assert any("consolidated.safetensors" in w and "not referenced" in w for w in plan.warnings)
    assert any("pytorch_model.bin" in w for w in plan.warnings)
    dst = tmp_path / "out"
    convert(str(src), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    assert not (dst / "consolidated.safetensors").exists()
    assert not (dst / "pytorch_model.bin").exists()
    assert (dst / "original" / "params.json").exists()


# --- bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_malformed_checkpoints_fail_cleanly(llama_ckpt, tmp_path, kind, capsys):
    bad = corrupt_checkpoint(kind, llama_ckpt, tmp_path / "bad")
    dst = tmp_path / "out"
    code = cli.main([str(bad), str(dst), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, err
    assert not dst.exists()
    assert not list(tmp_path.glob(".out.streamer-*"))
    expected_word = CORRUPTION_WORDS[kind]
    assert expected_word in err, err


def test_cli_exit_code_in_a_real_process(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "streamer", str(tmp_path / "missing"), str(tmp_path / "out"), "--scheme", "FP8_DYNAMIC"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_index_names_that_escape_are_refused(llama_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(llama_ckpt, src)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../escape.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match="escape"):
        prepare(str(src), scheme="FP8_DYNAMIC")


# --- the destination is written atomically --------------------------------------------------


def test_failed_run_leaves_no_destination_and_keeps_existing(llama_ckpt, tmp_path, monkeypatch):
    import streamer.engine.pipeline as pipeline

    calls = {"n": 0}
    real = pipeline.quantize_weight

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_weight", flaky)
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == []

    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(TargetError, match="not empty"):
        convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu", overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_budget_smaller_than_a_shard_still_converts(llama_ckpt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert(str(llama_ckpt), str(a), scheme="NVFP4A16", device="cpu")
    budget = 4_000_000
    result = convert(str(llama_ckpt), str(b), scheme="NVFP4A16", device="cpu", max_memory=budget)
    ta, tb = tensors_of(a), tensors_of(b)
    assert {k: raw_bytes(v) for k, v in ta.items()} == {k: raw_bytes(v) for k, v in tb.items()}
    assert result.stats.pieces > len(result.plan.jobs)  # jobs were cut into pieces
    assert result.stats.peak_budget <= budget


def test_tensor_larger_than_budget_is_an_error(llama_ckpt, tmp_path):
    with pytest.raises(StreamerError, match="max_memory=") as e:  # the Python API's words
        convert(str(llama_ckpt), str(tmp_path / "out"), scheme="FP8_DYNAMIC", device="cpu", max_memory=10_000)
    assert [h.setting for h in e.value.hints] == ["max_memory"]
    assert not (tmp_path / "out").exists()


def test_the_budget_takes_a_size_as_the_command_line_does(llama_ckpt, tmp_path):
    """max_memory="4MB" is the API's --max-memory 4MB; a size that is no size says so."""
    result = convert(str(llama_ckpt), str(tmp_path / "a"), scheme="NVFP4A16", device="cpu", max_memory="4MB")
    assert result.stats.peak_budget <= 4_000_000
    with pytest.raises(StreamerError, match="max_memory=") as e:
        convert(str(llama_ckpt), str(tmp_path / "b"), scheme="FP8_DYNAMIC", device="cpu", max_memory="10kB")
    assert "too small" in e.value.message
    with pytest.raises(StreamerError, match="too small"):  # a dry run says what the run would
        convert(str(llama_ckpt), None, scheme="FP8_DYNAMIC", device="cpu", max_memory="10kB", dry_run=True)
    from streamer.engine.convert import convert_many

    with pytest.raises(StreamerError, match="too small for 2 targets"):  # a fan-out's dry run too
        convert_many(str(llama_ckpt), [(str(tmp_path / "d"), "FP8_DYNAMIC"), (str(tmp_path / "e"), "W4A16")],
                     device="cpu", max_memory="10kB", dry_run=True)  # fmt: skip
    with pytest.raises(StreamerError, match="'lots' is not a size"):
        convert(str(llama_ckpt), str(tmp_path / "c"), scheme="FP8_DYNAMIC", device="cpu", max_memory="lots")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_the_command_line_says_what_is_missing_before_any_work(llama_ckpt, tmp_path, capsys):
    """A command that cannot make sense is refused at once, with one sentence; with --json,
    stdout answers too (a script never reads an empty answer), argparse's own refusals included."""
    out = str(tmp_path / "out")
    cases = [
        ([str(llama_ckpt), out], "give a scheme with --scheme"),
        ([str(llama_ckpt), out, "--to", str(tmp_path / "o2"), "W4A16"], "give a scheme for DST with --scheme"),
        ([str(llama_ckpt), out, "--scheme", "FP8_DYNAMIC", "--scheme-file", "x.yaml"], "either --scheme or --scheme-file"),
        ([str(llama_ckpt), out, "--scheme", "FP8_DYNAMIC", "--private"], "--private applies only to a Hub repo destination"),
        ([str(llama_ckpt), out, "--scheme", "FP8_DYNAMIC", "--create-pr"], "a pull request applies only to a Hub repo"),
        ([str(llama_ckpt), out, "--scheme", "FP8_DYNAMIC", "--revision", "dev"], "a branch (dev) applies only to a Hub repo"),
        ([str(llama_ckpt), out, "--scheme", "FP8_DYNAMIC", "-q", "-v"], "not allowed with argument"),
    ]
    for args, expect in cases:
        try:
            code = cli.main([*args, "--json"])
        except SystemExit as refused:  # argparse's own refusal
            code = refused.code
        captured = capsys.readouterr()
        assert code == 2 and expect in captured.err, (args, captured.err)
        answer = json.loads(captured.out)
        assert answer["status"] == "failed" and answer["exit"] == 2 and expect in answer["error"]
    assert not (tmp_path / "out").exists()


def test_bad_device_is_a_clear_error(llama_ckpt, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(StreamerError, match="no CUDA GPU") as e:
        convert(str(llama_ckpt), str(tmp_path / "out"), scheme="FP8_DYNAMIC", device="cuda")
    assert e.value.hints[0].setting == "device" and e.value.hints[0].value == "cpu"


def test_header_parser_rejects_trailing_garbage_lengths():
    from streamer.io.catalog import parse_header

    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    raw = struct.pack("<Q", len(header)) + header + b"\0" * 8
    _, tensors, _ = parse_header("x.safetensors", raw, len(raw))
    assert tensors[0].span.start == 8 + len(header)
    with pytest.raises(InputError, match="shape"):
        bad = json.dumps({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}).encode()
        parse_header("x.safetensors", struct.pack("<Q", len(bad)) + bad + b"\0" * 8, 16 + len(bad))


# --- what is copied, and names in messages ----------------------------------------------------


def test_only_the_files_a_loader_reads_are_copied(llama_ckpt, tmp_path, monkeypatch, capsys):
    """Hidden files (a .env, an ssh key), weights in formats streamer does not convert and files
    too large for a config or tokenizer stay out of the output; the plan names what is copied
    and what is not."""
    import streamer.io.catalog as catalog

    src = tmp_path / "src"
    shutil.copytree(llama_ckpt, src)
    (src / ".env").write_text("HF_TOKEN=hf_not_for_publishing\n")
    (src / ".ssh").mkdir()
    (src / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (src / "model.tflite").write_bytes(b"\0" * 64)
    (src / "rust_model.ot").write_bytes(b"\0" * 64)
    small = max(p.stat().st_size for p in src.iterdir() if p.is_file() and not p.name.endswith(".safetensors"))
    monkeypatch.setattr(catalog, "MAX_COPY_BYTES", small)  # every file the fixture has is small
    (src / "huge.json").write_text("[" + "0," * small + "0]")

    assert cli.main([str(src), "--scheme", "FP8_DYNAMIC", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    copied = next(line for line in plan.splitlines() if "copied as they are" in line)
    assert "tokenizer.json" in copied and "config.json" in copied
    for name in (".env", "id_rsa", "tflite", ".ot", "huge.json"):
        assert name not in copied
    assert ".env: hidden file; not copied" in plan and ".ssh/id_rsa: hidden file; not copied" in plan
    assert "model.tflite: tflite weights are not converted; skipped" in plan
    assert "huge.json: " in plan and "more than a config or tokenizer file takes" in plan

    dst = tmp_path / "out"
    convert(str(src), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    written = {p.relative_to(dst).as_posix() for p in dst.rglob("*")}
    assert "tokenizer.json" in written and "generation_config.json" in written
    assert not {".env", ".ssh", ".ssh/id_rsa", "model.tflite", "rust_model.ot", "huge.json"} & written


def test_names_with_braces_are_listed_as_they_are():
    from streamer.formats import collapse_names

    names = [f"model.layers.{i}.mlp.up{{x}}.weight" for i in range(3)] + ["model.norm.weight"]
    assert collapse_names(names) == ["model.layers.{0..2}.mlp.up{x}.weight  (3)", "model.norm.weight"]


def test_a_source_cards_nested_front_matter_is_not_carried():
    """A YAML alias bomb (a few hundred bytes that unfold to gigabytes once walked) in the source
    card's tags or datasets is dropped; plain values are carried."""
    from streamer.engine.card import card_metadata
    from streamer.io.provenance import Provenance

    lines = ["---", "a0: &a0 [" + ",".join(['"lol"'] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    lines += ["tags: [*a8, chat]", "datasets: *a8", "license: apache-2.0", "language: [en, fr]", "---", ""]
    prov = Provenance(source="org/x", source_commit=None, scheme="FP8_DYNAMIC", ignore=(), dequant_dtype=None, policy=())
    meta = card_metadata(prov, "FP8_DYNAMIC", "\n".join(lines))
    assert meta["tags"] == ["compressed-tensors", "fp8_dynamic", "quantized", "streamer"]
    assert "datasets" not in meta and meta["license"] == "apache-2.0" and meta["language"] == ["en", "fr"]


def test_the_source_is_never_the_destination(llama_ckpt, tmp_path, capsys):
    """Not the same Hub repo (ids compared without case, as the Hub does), and not the same local
    folder, a folder inside it, or one that holds it, even with --overwrite: replacing the
    destination would delete the source."""
    from streamer.engine.convert import check_target
    from streamer.engine.progress import Progress

    class Named:
        folder = None

        def __init__(self, repo_id):
            self.repo_id = repo_id

    with pytest.raises(StreamerError, match="the target repo is the source repo"):
        check_target(Named("ORG/Model"), Named("org/model"), Progress())

    src = tmp_path / "m"
    shutil.copytree(llama_ckpt, src)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    cases = [
        (src, "is the source folder", "replacing it would delete the source"),
        (src / "inner", "is inside the source folder", "the output would land among the source's own files"),
        (tmp_path, "holds the source folder", "replacing it would delete the source"),
    ]
    for dst, where, why in cases:
        capsys.readouterr()
        assert cli.main([str(src), str(dst), "--scheme", "FP8_DYNAMIC", "--overwrite", "--device", "cpu", "-q"]) == 2
        assert f"destination {dst} {where} {src}: {why}: choose another destination" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
