"""transformers loads every scheme's output through its compressed-tensors integration, and the
logits stay close to the bf16 model's.

The fixtures are tiny random models, which are harder on quantization than trained ones: the
thresholds are per bit width, a little under what a correct quantizer reaches here, and far above
what a broken one does (see the negative controls). The matrix runs with streamer's defaults
only (no ignore list) on eight architectures: what a new user gets.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import PROMPT_IDS, load_logits
from streamer.engine.convert import convert
from streamer.quant.schemes import accepted_presets

THRESHOLDS = {  # minimum cosine similarity of the logits with the bf16 model's
    8: 0.99,
    7: 0.99,
    6: 0.98,
    5: 0.97,
    4: 0.88,
    3: 0.6,
    2: 0.15,
}


def _bits(scheme: str) -> int:
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(scheme, ["Linear"]).weights.num_bits


@pytest.fixture(scope="module")
def dense_logits(llama_ckpt):
    return load_logits(llama_ckpt)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


@pytest.mark.parametrize("scheme", accepted_presets())
def test_transformers_loads_output_and_logits_stay_close(llama_ckpt, dense_logits, tmp_path, scheme):
    out = tmp_path / scheme
    convert(str(llama_ckpt), str(out), scheme=scheme, device="cpu")
    cos = _cos(dense_logits, load_logits(out))
    assert cos > THRESHOLDS[_bits(scheme)], f"{scheme}: cosine {cos:.4f}"


def test_moe_output_loads(moe_ckpt, tmp_path):
    out = tmp_path / "moe"
    convert(str(moe_ckpt), str(out), scheme="NVFP4A16", ignore=["re:.*mlp\\.gate$"], device="cpu")
    assert _cos(load_logits(moe_ckpt), load_logits(out)) > THRESHOLDS[4]


def test_a_broken_quantizer_fails_the_threshold(llama_ckpt, dense_logits, tmp_path):
    """Scramble the packing of a correct W4A16 output: the same check must now fail."""
    out = tmp_path / "broken"
    convert(str(llama_ckpt), str(out), scheme="W4A16", device="cpu")
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith("weight_packed"):
                tensors[name] = t.flip(1).contiguous()  # nibbles land in the wrong columns
        save_file(tensors, shard, metadata={"format": "pt"})
    cos = _cos(dense_logits, load_logits(out))
    assert cos < THRESHOLDS[4], cos
    shutil.rmtree(out)


# --- defaults only: eight architectures, the schemes users pick ----------------------------------

_COMMON = dict(vocab_size=1024, max_position_embeddings=512, initializer_range=0.05, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)  # fmt: skip
_LAYERS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _extra_model(arch: str):
    """(config, auto class, dtype) of the architectures tests/fixtures.py does not build."""
    import transformers as tf

    if arch == "qwen2_tied_fp16":
        return tf.Qwen2Config(**_COMMON, **_LAYERS, tie_word_embeddings=True), tf.AutoModelForCausalLM, torch.float16
    if arch == "gemma3":  # tied embeddings, scaled embedding lookup, sliding + full attention
        cfg = tf.Gemma3TextConfig(**_COMMON, **_LAYERS, head_dim=64, sliding_window=64,
                                  layer_types=["sliding_attention", "full_attention"])  # fmt: skip
        return cfg, tf.AutoModelForCausalLM, torch.bfloat16
    if arch == "glm4_moe":  # routers with e_score_correction_bias, a shared expert, a dense first layer
        cfg = tf.Glm4MoeConfig(**_COMMON, **_LAYERS, head_dim=64, moe_intermediate_size=128, first_k_dense_replace=1,
                               n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                               tie_word_embeddings=False)  # fmt: skip
        return cfg, tf.AutoModelForCausalLM, torch.bfloat16
    if arch == "qwen2_5_vl":  # a vision tower and its merger (projector); mrope needs head_dim 128
        text = dict(_COMMON, **_LAYERS, tie_word_embeddings=False) | dict(num_attention_heads=2, num_key_value_heads=2)
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=256, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56)  # fmt: skip
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=1024, image_token_id=1000,
                                  video_token_id=1001, vision_start_token_id=1002)  # fmt: skip
        return cfg, tf.AutoModelForImageTextToText, torch.bfloat16
    raise ValueError(arch)


def _build_extra(arch: str, dst: Path) -> Path:
    from transformers.utils import logging as hf_logging

    config, auto, dtype = _extra_model(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto.from_config(config, dtype=dtype)
        with torch.no_grad():  # norms and biases are exact 1s and 0s otherwise
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape).to(p.dtype) * 0.05)
    hf_logging.disable_progress_bar()
    model.save_pretrained(dst)
    return dst


FIXTURE_ARCHS = {"llama": "llama", "qwen3_moe": "qwen3_moe", "mixtral": "mixtral", "deepseek_v3": "deepseek_v3"}
DENSE = ("llama", "qwen2_tied_fp16", "gemma3", "qwen2_5_vl")
MOE = ("qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3")
# Not in the matrix, because transformers itself cannot load them (the reference's output fails
# the same way): NVFP4/MXFP4 MoE experts. transformers 5.24 ignores the experts'
# weight_global_scale (NVFP4: logits cosine ~0.16, no error), so these are checked by
# dequantizing with compressed-tensors instead (test_moe_output_loads above).
MATRIX = [(a, s) for a in (*DENSE, *MOE) for s in ("FP8_DYNAMIC", "W4A16", "W8A16")]
MATRIX += [(a, s) for a in DENSE for s in ("NVFP4A16", "MXFP4A16")]


@pytest.fixture(scope="module")
def sources(checkpoint, tmp_path_factory):
    """arch -> (path, auto class, source logits), built on first use."""
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            if arch in FIXTURE_ARCHS:
                path, auto = checkpoint(FIXTURE_ARCHS[arch]), AutoModelForCausalLM
            else:
                path, auto = _build_extra(arch, tmp_path_factory.mktemp(arch)), _extra_model(arch)[1]
            cache[arch] = (path, auto, _logits(path, auto))
        return cache[arch]

    return get


def _load(path: Path, auto, dequantize: bool):
    from transformers import CompressedTensorsConfig
    from transformers.utils import logging as hf_logging

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantization_config.*")
        return auto.from_pretrained(path, dtype=torch.float32, device_map="cpu", output_loading_info=True, **kwargs)


def _logits(path: Path, auto, dequantize: bool = False) -> torch.Tensor:
    model, _ = _load(path, auto, dequantize)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([PROMPT_IDS])).logits[0].float()


def _key_problems(path: Path, auto) -> dict:
    """Missing / unexpected / mismatched keys of a plain from_pretrained: what a user runs."""
    _, info = _load(path, auto, dequantize=False)
    return {k: sorted(v) for k, v in info.items() if v}


@pytest.mark.parametrize("arch, scheme", MATRIX)
def test_defaults_load_cleanly_and_logits_stay_close(sources, tmp_path, arch, scheme):
    path, auto, reference = sources(arch)
    out = tmp_path / "out"
    convert(str(path), str(out), scheme=scheme, device="cpu")  # no ignore list: the defaults alone
    assert _key_problems(out, auto) == {}
    # decompressed on load: the forward pass transformers runs on CPU for every scheme
    logits = _logits(out, auto, dequantize=True)
    assert torch.isfinite(logits).all()
    cos = _cos(reference, logits)
    assert cos > THRESHOLDS[_bits(scheme)], f"{arch} {scheme}: cosine {cos:.4f}"


def test_without_the_defaults_the_key_check_fails(sources, tmp_path):
    """The negative control of the matrix: the reference's behaviour on an MoE model."""
    path, auto, _ = sources("qwen3_moe")
    out = tmp_path / "out"
    convert(str(path), str(out), scheme="FP8_DYNAMIC", device="cpu", default_ignore=False)
    problems = _key_problems(out, auto)
    assert "model.embed_tokens.weight_scale" in problems["unexpected_keys"]
    assert "model.layers.0.mlp.gate.weight_scale" in problems["unexpected_keys"]


def test_towers_are_quantized_on_request_and_still_load(sources, tmp_path):
    path, auto, reference = sources("qwen2_5_vl")
    out = tmp_path / "out"
    result = convert(str(path), str(out), scheme="W8A16", device="cpu", quantize_towers=True)
    quantized = {q.module for j in result.plan.jobs for q in j.quantize}
    assert {"visual.blocks.0.attn.qkv", "visual.merger.mlp.0"} <= quantized
    assert result.plan.config_ignore == ["lm_head", "re:.*embed_tokens$"]  # nothing visual left unquantized
    assert "--quantize-towers" in (out / "README.md").read_text()  # it changed the output: reproduce says so
    assert _key_problems(out, auto) == {}
    assert _cos(reference, _logits(out, auto, dequantize=True)) > THRESHOLDS[8]
