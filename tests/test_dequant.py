"""Quantized sources (FP8 block / DeepSeek layout, compressed-tensors) are dequantized on the fly.

The claim checked everywhere: converting a quantized source gives exactly (bit for bit) what
converting the dense model it dequantizes to gives, and that dense model is the one the reference
dequantizers (compressed-tensors' FP8BlockDequantizer, the library's own decompressors) produce.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import dequantize_checkpoint
from reference import _env, compare_checkpoints, require_reference, tensor_records
from streamer.engine.convert import convert, prepare
from streamer.cli.main import main as cli_main
from streamer.errors import Hint, PlanError, SchemeError

FP8_QCONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
               "weight_block_size": [128, 128]}
# what DeepSeek-V3 leaves in bf16 besides norms: embeddings, lm_head, the MoE router
DEEPSEEK_DENSE = ("embed_tokens", "lm_head", "mlp.gate")


# --------------------------------------------------------------------------------------------
# building sources
# --------------------------------------------------------------------------------------------


def _copy_small_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                "config.json", "model.safetensors.index.json", "README.md"):
            shutil.copyfile(f, dst / f.name)


def _write_index(src: Path, dst: Path, wmap: dict[str, str]) -> None:
    if (src / "model.safetensors.index.json").exists():
        total = sum((dst / f).stat().st_size for f in set(wmap.values()))
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))


def to_deepseek_fp8(src: Path, dst: Path, block=(128, 128), keep=DEEPSEEK_DENSE) -> Path:
    """Quantize a dense checkpoint the way DeepSeek-V3 ships: every 2-D Linear weight (except
    norms and KEEP) as F8_E4M3 + weight_scale_inv F32 (⌈out/bh⌉, ⌈in/bw⌉), scale = block
    amax / 448, in the weight's own shard; config.json gets DeepSeek's quantization_config."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    _copy_small_files(src, dst)
    bh, bw = block
    wmap = {}
    for f in sorted(src.glob("*.safetensors")):
        out = {}
        for name, t in load_file(f).items():
            module = name.rpartition(".")[0]
            if name.endswith(".weight") and t.dim() == 2 and not module.endswith("norm") \
                    and not module.endswith(keep):
                rows, cols = t.shape
                nbr, nbc = -(-rows // bh), -(-cols // bw)
                pad = torch.zeros(nbr * bh, nbc * bw)
                pad[:rows, :cols] = t.float()
                blocks = pad.view(nbr, bh, nbc, bw)
                scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
                q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
                out[name] = q.view(nbr * bh, nbc * bw)[:rows, :cols].contiguous()
                out[module + ".weight_scale_inv"] = scale.contiguous()
            else:
                out[name] = t
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        wmap.update({k: f.name for k in out})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = dict(FP8_QCONFIG, weight_block_size=list(block))
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_index(src, dst, wmap)
    return dst


def fp8_to_dense(src: Path, dst: Path, dtype=torch.bfloat16) -> Path:
    """The dense checkpoint a DeepSeek FP8 checkpoint stands for, computed independently of
    streamer: fp32(weight) * fp32(scale of its block), cast to DTYPE; same shards."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    _copy_small_files(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    bh, bw = cfg.pop("quantization_config")["weight_block_size"]
    wmap = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(f)
        out = {}
        for name, t in tensors.items():
            if name.endswith(".weight_scale_inv"):
                continue
            s = tensors.get(name + "_scale_inv")
            if s is not None:
                rows, cols = t.shape
                sx = s.repeat_interleave(bh, 0)[:rows].repeat_interleave(bw, 1)[:, :cols]
                t = (t.float() * sx.float()).to(dtype)
            out[name] = t
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        wmap.update({k: f.name for k in out})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_index(src, dst, wmap)
    return dst


def synthetic(dst: Path, shapes: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """A single-file checkpoint of random bf16 Linear weights (plus a norm) and a config.json."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16) for name, shape in shapes.items()}
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                 "dtype": "bfloat16"}))
    return dst


ODD_SHAPES = {  # out / in not multiples of 128: partial edge blocks in both directions
    "model.layers.0.mlp.down_proj.weight": (200, 300),
    "model.layers.0.mlp.up_proj.weight": (130, 260),
    "model.layers.0.self_attn.o_proj.weight": (64, 1000),
    "model.layers.0.self_attn.q_proj.weight": (256, 384),
}


def _weight_only(name: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(name, ["Linear"])
    scheme.input_activations = None
    return scheme


def _convert(src, dst, scheme, **kw):
    return convert(str(src), str(dst), scheme=scheme, device="cpu", **kw)


def _no_source_scales(out: Path, source_scale="weight_scale_inv") -> None:
    names = set(tensor_records(out))
    assert not [n for n in names if n.endswith(source_scale)]


# --------------------------------------------------------------------------------------------
# fixtures (module-scoped: built once, read-only)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dequant")


@pytest.fixture(scope="module")
def ds_fp8(deepseek_ckpt, work) -> Path:
    return to_deepseek_fp8(deepseek_ckpt, work / "ds-fp8")


@pytest.fixture(scope="module")
def ds_fp8_dense(ds_fp8, work) -> Path:
    return fp8_to_dense(ds_fp8, work / "ds-fp8-dense")


@pytest.fixture(scope="module")
def odd_fp8(work) -> Path:
    return to_deepseek_fp8(synthetic(work / "odd", ODD_SHAPES), work / "odd-fp8", keep=())


@pytest.fixture(scope="module")
def ds_w4a16(deepseek_ckpt, work) -> Path:
    """A compressed-tensors pack-quantized checkpoint, made by streamer itself (CLI)."""
    w4 = work / "ds-w4a16"
    assert cli_main([str(deepseek_ckpt), str(w4), "--scheme", "W4A16", "-q"]) == 0
    return w4


@pytest.fixture(scope="module")
def streamer_dense(ds_fp8, odd_fp8, ds_w4a16, work) -> dict[str, Path]:
    """What streamer's dequantizer makes of the quantized sources: convert with every module
    ignored and stacking off (expand everything, as the reference with a converter), so each
    dequantized weight is written dense (the pipeline's pass-through path)."""
    out = {}
    for key, src in (("ds", ds_fp8), ("odd", odd_fp8), ("w4", ds_w4a16)):
        out[key] = work / f"{key}-streamer-dense"
        _convert(src, out[key], "FP8_DYNAMIC", ignore=["re:.*"], stack=False)
    return out


# --------------------------------------------------------------------------------------------
# FP8 block (DeepSeek layout)
# --------------------------------------------------------------------------------------------


def test_fp8_source_to_nvfp4_equals_dense_source(ds_fp8, ds_fp8_dense, work):
    a, b = work / "nvfp4-from-fp8", work / "nvfp4-from-dense"
    res = _convert(ds_fp8, a, "NVFP4A16")
    _convert(ds_fp8_dense, b, "NVFP4A16")
    assert compare_checkpoints(a, b) == []
    _no_source_scales(a)
    # the old quantization_config is gone, the new one is the recipe's; dtype still declared
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["quantization_config"]["format"] == "nvfp4-pack-quantized"
    assert "weight_block_size" not in json.dumps(cfg["quantization_config"])
    assert cfg["dtype"] == "bfloat16"
    # only the stored bytes were read: fp8 weights and scales, never a dense copy
    src_bytes = sum(f.stat().st_size for f in ds_fp8.glob("*.safetensors"))
    assert res.stats.bytes_read <= src_bytes
    assert "fp8 (e4m3) block 128x128" in (a / "README.md").read_text()


def test_odd_shapes_edge_blocks_equal_dense_source(odd_fp8, work):
    dense = fp8_to_dense(odd_fp8, work / "odd-fp8-dense")
    a, b = work / "fp8dyn-from-odd-fp8", work / "fp8dyn-from-odd-dense"
    _convert(odd_fp8, a, "FP8_DYNAMIC")
    _convert(dense, b, "FP8_DYNAMIC")
    assert compare_checkpoints(a, b) == []
    _no_source_scales(a)


def test_dequantized_weights_equal_independent_math(streamer_dense, ds_fp8_dense, odd_fp8, work):
    odd_dense = work / "odd-fp8-dense"
    if not odd_dense.exists():
        fp8_to_dense(odd_fp8, odd_dense)
    for key, expected in (("ds", ds_fp8_dense), ("odd", odd_dense)):
        got, want = tensor_records(streamer_dense[key]), tensor_records(expected)
        assert set(got) == set(want)
        for name in want:
            assert (got[name].dtype, got[name].shape, got[name].data) == \
                (want[name].dtype, want[name].shape, want[name].data), name


REF_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer)
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import (
        FP8BlockDequantizer)
    for job in json.loads(sys.argv[1]):
        src, dst = Path(job["src"]), Path(job["dst"])
        dst.mkdir(parents=True, exist_ok=True)
        if job["kind"] == "fp8":
            conv = FP8BlockDequantizer(ignore=job["ignore"], weight_block_size=(128, 128),
                                       dtype=torch.bfloat16)
        else:
            conv = CompressedTensorsDequantizer(str(src), dtype=torch.bfloat16)
        for f in sorted(src.glob("*.safetensors")):
            tensors = conv.validate(load_file(f))
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / f.name))
    print("ok")
""")


@pytest.mark.reference
def test_dequantization_matches_reference(streamer_dense, ds_fp8, odd_fp8, ds_w4a16, work):
    """compressed-tensors' FP8BlockDequantizer and CompressedTensorsDequantizer (in the
    llm-compressor reference venv) give the same dense bytes as streamer, edge blocks included."""
    py = require_reference()
    jobs = [
        {"kind": "fp8", "src": str(ds_fp8), "dst": str(work / "ref-ds"),
         "ignore": ["re:.*embed_tokens$", "lm_head", "re:.*mlp\\.gate$"]},
        {"kind": "fp8", "src": str(odd_fp8), "dst": str(work / "ref-odd"), "ignore": []},
        {"kind": "ct", "src": str(ds_w4a16), "dst": str(work / "ref-w4")},
    ]
    r = subprocess.run([str(py), "-c", REF_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    for key in ("ds", "odd", "w4"):
        got, want = tensor_records(streamer_dense[key]), tensor_records(work / f"ref-{key}")
        assert set(got) == set(want)
        diff = [n for n in want if (got[n].dtype, got[n].shape, got[n].data) !=
                (want[n].dtype, want[n].shape, want[n].data)]
        assert diff == [], diff[:5]


def test_dry_run_shows_dequantization(ds_fp8, capsys):
    assert cli_main([str(ds_fp8), "--scheme", "NVFP4A16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dequantize: fp8 (e4m3) block 128x128" in out
    assert "-> bfloat16" in out
    assert ".weight_scale_inv" not in out  # consumed, neither quantized nor passed through


def test_plan_consumes_scales_and_passes_dense_tensors(ds_fp8):
    source, plan = prepare(str(ds_fp8), scheme="NVFP4A16", ignore=["lm_head"])
    source.close()
    dq = plan.dequantizer
    outputs = {o.name: o for j in plan.jobs for o in j.outputs}
    assert not [n for n in outputs if n.endswith("weight_scale_inv")]
    # bf16 tensors the source left unquantized are read and written as they are
    assert outputs["lm_head.weight"].dtype == "BF16" and not dq.transforms("lm_head.weight")
    assert dq.transforms("model.layers.0.self_attn.q_a_proj.weight")
    inputs = {t.name for j in plan.jobs for t in j.inputs}
    assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in inputs
    assert dq.dtype_name == "bfloat16"


def test_same_scheme_refused_unless_forced(ds_fp8, work):
    with pytest.raises(SchemeError, match="already quantized with fp8 block 128x128") as e:
        prepare(str(ds_fp8), scheme="FP8_BLOCK")
    assert Hint("force") in e.value.hints
    assert cli_main([str(ds_fp8), str(work / "refused"), "--scheme", "FP8_BLOCK", "-q"]) == 2
    assert not (work / "refused").exists() or not any((work / "refused").iterdir())
    out = work / "fp8block-forced"
    _convert(ds_fp8, out, "FP8_BLOCK", force=True)
    _no_source_scales(out)
    rec = tensor_records(out)
    assert rec["model.layers.0.self_attn.q_a_proj.weight"].dtype == "F8_E4M3"
    assert rec["model.layers.0.self_attn.q_a_proj.weight_scale"].dtype == "BF16"


def test_dequant_dtype_float16(odd_fp8, work):
    out = work / "odd-f16"
    _convert(odd_fp8, out, "FP8_DYNAMIC", dequant_dtype="float16",
             ignore=["model.layers.0.mlp.down_proj"])
    rec = tensor_records(out)
    assert rec["model.layers.0.mlp.down_proj.weight"].dtype == "F16"  # dequantized, not requantized
    assert rec["model.layers.0.mlp.up_proj.weight_scale"].dtype == "F16"
    assert rec["model.norm.weight"].dtype == "BF16"  # untouched
    ref = load_file(str(work / "odd-fp8" / "model.safetensors"))
    w = ref["model.layers.0.mlp.down_proj.weight"].float()
    s = ref["model.layers.0.mlp.down_proj.weight_scale_inv"].repeat_interleave(128, 0)[:200]
    expect = (w * s.repeat_interleave(128, 1)[:, :300]).to(torch.float16)
    got = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(got.view(torch.int16), expect.view(torch.int16))


def test_malformed_fp8_sources(odd_fp8, work):
    bad = work / "bad-fp8"
    shutil.copytree(odd_fp8, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(1, 1)  # wrong block grid
    del tensors["model.layers.0.mlp.down_proj.weight_scale_inv"]  # fp8 weight without scale
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(PlanError) as e:
        prepare(str(bad), scheme="NVFP4A16")
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight_scale_inv: shape [1, 1]" in msg
    assert "model.layers.0.mlp.down_proj.weight: F8_E4M3 weight without" in msg


def test_unsupported_source_formats_are_named(odd_fp8, work):
    src = work / "gptq"
    shutil.copytree(odd_fp8, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SchemeError, match="quant_method 'gptq'"):
        prepare(str(src), scheme="NVFP4A16")
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SchemeError, match="without weight_block_size"):
        prepare(str(src), scheme="NVFP4A16")


# --------------------------------------------------------------------------------------------
# compressed-tensors sources
# --------------------------------------------------------------------------------------------


def test_w4a16_source_to_fp8_dynamic_equals_dense(ds_w4a16, work):
    w4 = ds_w4a16
    dense = dequantize_checkpoint(w4, work / "ds-w4a16-dense")  # compressed-tensors' decompressors
    a, b = work / "fp8dyn-from-w4", work / "fp8dyn-from-w4-dense"
    res = _convert(w4, a, "FP8_DYNAMIC")
    assert res.plan.dequant.startswith("compressed-tensors pack-quantized int4 group 128")
    _convert(dense, b, "FP8_DYNAMIC")
    assert compare_checkpoints(a, b) == []
    names = set(tensor_records(a))
    assert not [n for n in names if n.endswith(("weight_packed", "weight_shape"))]
    assert json.loads((a / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"
    with pytest.raises(SchemeError, match="already quantized"):
        prepare(str(w4), scheme="W4A16")


@pytest.mark.parametrize("scheme", ["W4A16_ASYM", "NVFP4A16", "FP8_BLOCK", "W8A16"])
def test_compressed_tensors_sources_equal_dense(scheme, work):
    shapes = {k: v for k, v in ODD_SHAPES.items() if v[1] % 128 == 0 or scheme == "FP8_BLOCK"}
    shapes["model.layers.0.mlp.gate_proj.weight"] = (256, 512)
    src = synthetic(work / f"syn-{scheme}", shapes, seed=1)
    q = work / f"syn-{scheme}-q"
    # FP8_BLOCK's activations come in groups of 128 along the input, so streamer refuses in_features
    # that are not multiples of 128; weight-only 128x128 blocks keep the edge blocks in both directions
    _convert(src, q, _weight_only(scheme) if scheme == "FP8_BLOCK" else scheme)
    dense = dequantize_checkpoint(q, work / f"syn-{scheme}-dense")
    a, b = work / f"syn-{scheme}-a", work / f"syn-{scheme}-b"
    target = "FP8_DYNAMIC" if scheme != "FP8_DYNAMIC" else "W4A16"
    _convert(q, a, target)
    _convert(dense, b, target)
    assert compare_checkpoints(a, b) == []


def test_kimi_style_int4_group32_honours_source_ignore(work):
    """Kimi-K2-Thinking style: INT4 pack-quantized, group 32, attention ignored (left bf16)."""
    shapes = {"model.layers.0.mlp.down_proj.weight": (200, 320),
              "model.layers.0.mlp.up_proj.weight": (130, 256),
              "model.layers.0.self_attn.o_proj.weight": (64, 1024),
              "model.layers.0.self_attn.q_proj.weight": (256, 384)}
    src = synthetic(work / "syn-kimi", shapes, seed=2)
    scheme_file = work / "kimi.json"
    scheme_file.write_text(json.dumps({
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "group_size": 32, "strategy": "group"}}},
        "ignore": ["lm_head", "re:.*self_attn.*"]}))
    q = work / "syn-kimi-q"
    assert cli_main([str(src), str(q), "--scheme-file", str(scheme_file), "-q"]) == 0
    source, plan = prepare(str(q), scheme="NVFP4A16")
    source.close()
    dq = plan.dequantizer
    assert plan.dequant == "compressed-tensors pack-quantized int4 group 32, 2 weights -> bfloat16"
    assert dq.transforms("model.layers.0.mlp.down_proj.weight")
    assert not dq.transforms("model.layers.0.self_attn.q_proj.weight")  # the source left it bf16
    dense = dequantize_checkpoint(q, work / "syn-kimi-dense")
    a, b = work / "syn-kimi-a", work / "syn-kimi-b"
    _convert(q, a, "NVFP4A16")
    _convert(dense, b, "NVFP4A16")
    assert compare_checkpoints(a, b) == []
