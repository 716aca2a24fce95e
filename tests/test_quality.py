"""The quality report: the errors it states are those of the checkpoint written, outliers flagged.

The oracle reads the output safetensors back, decompresses every quantized module with
compressed-tensors' own decompressor for the format the config names, and compares with the
source weights in float64.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from safetensors.torch import load_file, save_file

from streamer.cli.main import main as cli_main
from streamer.engine.convert import convert
from streamer.engine.quality import build_report, module_kind
from streamer.quant.kernels import dequantize_weight, quantize_weight
from streamer.quant.quality import ErrorSums, code_dequant, code_values
from streamer.quant.workers import Scratch

# one scheme per family: FP8 per channel, FP8 block, INT groups (4 and 8 bits), NVFP4, MXFP4
SCHEMES = ["FP8_DYNAMIC", "FP8_BLOCK", "W4A16", "W8A16", "NVFP4A16", "MXFP4"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _errors_from_checkpoint(src: Path, dst: Path) -> dict[str, tuple[float, float]]:
    """weight name -> (relative error, SNR dB), from DST's files and SRC's weights alone."""
    raw = json.loads((dst / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k != "transform_config"})
    (scheme,) = cfg.config_groups.values()
    fmt = scheme.format or cfg.format
    compressor = BaseCompressor.get_value_from_registry(fmt)
    source, output = _tensors(src), _tensors(dst)
    modules = {k.rsplit(".", 1)[0] for k in output if k.endswith((".weight_packed", ".weight_scale"))}
    found = {}
    for m in modules:
        state = {k[len(m) + 1 :]: v for k, v in output.items() if k.startswith(m + ".") and k[len(m) + 1 :].startswith("weight")}
        with torch.no_grad():
            deq = compressor.decompress(state, scheme)["weight"].double()
        w = source[m + ".weight"].double()
        err = (w - deq).pow(2).sum().item()
        found[m + ".weight"] = (math.sqrt(err / w.pow(2).sum().item()), 10 * math.log10(w.pow(2).sum().item() / err))
    return found


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reported_error_is_the_written_checkpoints(llama_ckpt, tmp_path, scheme):
    result = convert(str(llama_ckpt), str(tmp_path / "out"), scheme=scheme, device="cpu")
    expected = _errors_from_checkpoint(llama_ckpt, tmp_path / "out")
    reported = {t["name"]: t for t in result.summary()["quality"]["tensors"]}
    assert set(reported) == set(expected) and len(expected) == result.plan.n_quantized
    for name, (rel, snr) in expected.items():
        assert reported[name]["relative_error"] == pytest.approx(rel, rel=1e-4), name
        assert reported[name]["snr_db"] == pytest.approx(snr, abs=1e-2), name
    # the aggregates are those of the tensors: overall = sqrt(Σ error² / Σ weight²)
    r = result.quality
    assert r.overall.tensors == len(expected)
    assert r.overall.relative_error == pytest.approx(
        math.sqrt(sum(t.error_sq for t in r.tensors) / sum(t.weight_sq for t in r.tensors))
    )
    assert set(r.by_kind) == {"attention", "dense MLP"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Quantization error" in card and "No outliers" in card


@pytest.fixture(scope="module")
def bad_ckpt(llama_ckpt, tmp_path_factory) -> Path:
    """The llama fixture with 16 huge values (1000x the weight's std) in one down_proj."""
    dst = tmp_path_factory.mktemp("bad") / "llama-bad"
    shutil.copytree(llama_ckpt, dst)
    name = "model.layers.1.mlp.down_proj.weight"
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        if name in tensors:
            w = tensors[name].float()
            g = torch.Generator().manual_seed(0)
            idx = torch.randperm(w.numel(), generator=g)[:16]
            w.view(-1)[idx] = 1000 * w.std()
            tensors[name] = w.to(tensors[name].dtype)
            save_file(tensors, f, metadata={"format": "pt"})
            return dst
    raise AssertionError(f"{name} not in the fixture")


def test_a_tensor_with_huge_outliers_is_flagged(bad_ckpt, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert cli_main([str(bad_ckpt), str(out), "--scheme", "W8A16", "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    q = summary["quality"]
    assert q["outliers"] == ["model.layers.1.mlp.down_proj.weight"]
    assert q["suggested_ignore"] == ["model.layers.1.mlp.down_proj"]
    card = (out / "README.md").read_text()
    assert "--ignore model.layers.1.mlp.down_proj" in card
    # the one line the CLI logs after a run (above the bars, on stderr) names the entry to use
    caplog.clear()
    assert cli_main([str(bad_ckpt), str(tmp_path / "again"), "--scheme", "W8A16", "--device", "cpu"]) == 0
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quality:")]
    assert len(line) == 1 and line[0].endswith("1 outlier: --ignore model.layers.1.mlp.down_proj"), line


def test_quality_can_be_switched_off(llama_ckpt, tmp_path):
    result = convert(str(llama_ckpt), str(tmp_path / "out"), scheme="FP8_DYNAMIC", device="cpu", quality=False)
    assert result.quality is None and "quality" not in result.summary()
    assert "## Quantization error" not in (tmp_path / "out" / "README.md").read_text()


def test_moe_experts_are_aggregated_per_layer(moe_ckpt, tmp_path):
    result = convert(str(moe_ckpt), str(tmp_path / "out"), scheme="W4A16", device="cpu")
    r = result.quality
    assert "experts" in r.by_kind
    experts = [t for t in r.tensors if t.kind == "experts"]
    assert sorted(r.experts_by_layer) == sorted({t.layer for t in experts})
    for layer, agg in r.experts_by_layer.items():
        mine = [t for t in experts if t.layer == layer]
        assert agg.tensors == len(mine)
        assert agg.relative_error == pytest.approx(
            math.sqrt(sum(t.error_sq for t in mine) / sum(t.weight_sq for t in mine))
        )
    assert "Experts per layer" in (tmp_path / "out" / "README.md").read_text()


def test_module_kinds_and_outlier_rule():
    assert module_kind("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert module_kind("model.layers.0.mlp.down_proj.weight") == "dense MLP"
    assert module_kind("model.layers.0.mlp.experts.3.up_proj.weight") == "experts"
    assert module_kind("model.layers.0.mlp.shared_expert.up_proj.weight") == "shared experts"
    assert module_kind("model.layers.0.mlp.shared_experts.up_proj.weight") == "shared experts"

    def sums(rel, n=1000):  # a Gaussian-like weight: robust error == relative error
        return ErrorSums(weight_sq=float(n), error_sq=rel**2 * n, weight_abs=n / math.sqrt(math.pi / 2), count=n)

    errors = {f"model.layers.{i}.mlp.down_proj.weight": sums(0.01) for i in range(5)}
    errors["model.layers.5.mlp.down_proj.weight"] = sums(0.039)  # under 4x the median
    errors["model.layers.6.mlp.down_proj.weight"] = sums(0.05)  # over
    errors["model.layers.0.self_attn.o_proj.weight"] = sums(0.5)  # alone in its kind: no median to judge by
    r = build_report(errors, "W4A16")
    assert [t.name for t in r.outliers] == ["model.layers.6.mlp.down_proj.weight"]
    assert r.worst[0].name == "model.layers.0.self_attn.o_proj.weight"
    assert len(r.worst) == len(errors)


def test_the_space_shows_the_report_and_a_chart(bad_ckpt, tmp_path):
    from streamer.web.quality import quality_html

    result = convert(str(bad_ckpt), str(tmp_path / "out"), scheme="W8A16", device="cpu")
    page = quality_html(result.quality)
    assert "<svg" in page and "layer 1, dense MLP" in page and "layer 0, attention" in page
    assert "add “model.layers.1.mlp.down_proj” to the ignore list" in page


# every preset compressed-tensors names (the kernel-level check below), in the three weight dtypes
PRESETS = [n for n in PRESET_SCHEMES if n != "UNQUANTIZED"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", PRESETS)
def test_kernel_error_sums_equal_the_decompressed_tensors(name, dtype):
    """The sums quantize_weight accumulates equal those of compressed-tensors' decompression of
    its own output, for every preset and weight dtype: a weight with tiny values (FP8 / FP4
    subnormal codes, zeros), a few large ones and a partial chunk / block row."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 256, generator=g) * 0.02
    w[:, :32] *= 1e-4
    w[5, 7], w[17, 100], w[200, 3] = 0.9, -0.7, 0.0
    w = w.to(dtype)
    scheme = preset_name_to_scheme(name, ["Linear"])
    sums = ErrorSums()
    out = quantize_weight(w, scheme, None, errors=sums)
    ref, deq = w.double(), dequantize_weight(out, scheme, torch.float64)
    assert sums.count == w.numel()
    assert sums.weight_sq == pytest.approx(ref.pow(2).sum().item(), rel=1e-5)
    assert sums.weight_abs == pytest.approx(ref.abs().sum().item(), rel=1e-5)
    assert sums.error_sq == pytest.approx((ref - deq).pow(2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind,codes", [("fp8", 256), ("fp4", 16), ("fp6", 64)])
def test_code_dequant_is_the_table_times_the_scale(kind, codes, dtype):
    """Every code times scales from tiny to huge (where the power-of-two shortcut would overflow
    and the table takes over), bit for bit, whether the caller bounds the scale or not."""
    c = torch.arange(codes, dtype=torch.int32).to(torch.uint8)
    if kind == "fp8":  # 0x7F / 0xFF are E4M3's NaNs: not a code a finite weight gets
        c = c[(c & 0x7F) != 0x7F]
    top = torch.finfo(dtype).max
    for s in (1.0, 3e-3, 2.0**-20, 7.0, 300.0, top / 1000):
        scale = torch.tensor([s], dtype=dtype).expand(len(c)).contiguous()
        want = code_values(kind, dtype, c.device)[c.long()] * scale
        for bound in (None, float(scale.max())):
            got = code_dequant(c, kind, scale, c.shape, Scratch(), bound)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (s, bound)
