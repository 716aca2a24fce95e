"""Bit-identical to llm-compressor's model_free_ptq where the reference is right.

Every scheme that compressed-tensors (this venv) offers without calibration is run through both
tools on the same sharded Llama, whose q/k/v and gate/up straddle shards. Tensors must match
byte for byte, file by file, and the index and quantization config must say the same thing.
"""

from __future__ import annotations

import json

import pytest
from compressed_tensors.quantization import QuantizationConfig

from reference import compare_checkpoints
from streamer import model_free_ptq
from streamer.quant.schemes import accepted_presets

# Presets that compressed-tensors 0.19 (pinned by llm-compressor 0.14.0.1) does not define yet:
# the reference refuses them by name, so they are checked against compressed-tensors' own
# functions in test_kernels.py instead.
NOT_IN_REFERENCE = {"MXFP4XFP8", "MXFP6A16", "MXFP6A8"}
SCHEMES = [s for s in accepted_presets() if s not in NOT_IN_REFERENCE]


@pytest.fixture(scope="module")
def reference_outputs(llama_ckpt, reference_runs):
    results = reference_runs.many([(llama_ckpt, s) for s in SCHEMES])
    return dict(zip(SCHEMES, results))


def _config_groups(folder):
    raw = json.loads((folder / "config.json").read_text())["quantization_config"]
    raw = {k: v for k, v in raw.items() if k not in ("version", "quant_method", "transform_config")}
    # Parse with the library, so fields one version writes and another infers (zp_dtype) compare
    # equal: repr shows every field, inferred ones included.
    cfg = QuantizationConfig.model_validate(raw)
    return cfg.format, sorted(cfg.ignore or []), {k: repr(g) for k, g in cfg.config_groups.items()}


@pytest.mark.reference
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bit_identical_to_model_free_ptq(llama_ckpt, reference_outputs, tmp_path, scheme):
    ref = reference_outputs[scheme]
    assert ref.ok, f"the reference failed on {scheme}: {ref.error}"
    ours = tmp_path / "ours"
    model_free_ptq(str(llama_ckpt), str(ours), scheme=scheme, device="cpu")  # the drop-in: the reference's semantics
    diffs = compare_checkpoints(ref.dst, ours, qconfig_keys=("quant_method",))
    assert diffs == [], "\n".join(diffs)
    assert _config_groups(ours) == _config_groups(ref.dst)


@pytest.mark.reference
def test_reference_refuses_what_streamer_handles(odd_ckpt, reference_runs):
    """Where the reference crashes, streamer converts (see test_engine for the intended output)."""
    (res,) = reference_runs.many([(odd_ckpt, "FP8_BLOCK")])
    assert not res.ok
