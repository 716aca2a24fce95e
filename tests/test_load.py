"""transformers loads every scheme's output through its compressed-tensors integration, and the
logits stay close to the bf16 model's.

The fixture is a tiny random Llama, which is harder on quantization than a trained model: the
thresholds are per bit width, a little under what a correct quantizer reaches here, and far above
what a broken one does (see the last test).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import load_logits
from streamer.api import convert
from streamer.schemes import accepted_presets

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
