"""streamer.engine.suggest and .policy: default ignore lists per architecture, repo names, scheme blurbs."""

from __future__ import annotations

import re

import pytest

from streamer.io.catalog import build_catalog
from streamer.engine.plan import expand_inputs
from streamer.quant.schemes import accepted_presets, make_recipe
from streamer.io.source import LocalSource
from streamer.engine.policy import is_moe, is_multimodal
from streamer.engine.suggest import (
    architecture,
    format_ignore,
    parse_ignore,
    scheme_blurb,
    suggest_ignore,
    suggest_repo_name,
)


def _weights(path):
    catalog = build_catalog(LocalSource(path))
    inputs, _ = expand_inputs(catalog)
    return catalog.config, [(t.name[: -len(".weight")], t.shape, t.dtype) for t in inputs if t.name.endswith(".weight")]


def _ignored(ignore, module):
    return make_recipe("FP8_DYNAMIC", ignore=ignore).match(module) is None


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096}
QWEN_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 128}
VLM = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "vision_config": {"depth": 32},
    "text_config": {"hidden_size": 2048},
}


def test_config_only_dense():
    s = suggest_ignore(LLAMA)
    assert s.ignore[0] == "lm_head"
    assert "re:.*embed_tokens$" in s.ignore
    assert not any("gate" in e or "router" in e for e in s.ignore)
    assert not any("vision" in e for e in s.ignore)


def test_config_only_moe_and_vision():
    moe = suggest_ignore(QWEN_MOE).ignore
    assert "re:.*mlp.gate$" in moe and "re:.*router" in moe
    vlm = suggest_ignore(VLM).ignore
    assert "re:.*vision_tower.*" in vlm and "re:.*visual.*" in vlm
    assert is_moe(QWEN_MOE) and not is_moe(LLAMA)
    assert is_multimodal(VLM) and not is_multimodal(LLAMA)
    assert architecture(VLM) == "Qwen2_5_VLForConditionalGeneration"
    assert architecture(None) == "unknown"


def test_unknown_config_suggests_every_generic_pattern():
    s = suggest_ignore(None)
    assert {"lm_head", "re:.*mlp.gate$", "re:.*router", "re:.*vision_tower.*"} <= set(s.ignore)


def test_patterns_match_the_modules_they_mean():
    ignore = suggest_ignore(None).ignore
    for module in ("lm_head", "model.embed_tokens", "model.layers.3.mlp.gate", "model.layers.0.block_sparse_moe.gate",
                   "model.layers.1.mlp.router", "model.visual.blocks.0.attn.qkv", "model.vision_tower.encoder.fc1",
                   "model.layers.2.mlp.shared_expert_gate"):  # fmt: skip
        assert _ignored(ignore, module), module
    for module in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj",
                   "model.layers.0.mlp.experts.3.gate_proj"):  # fmt: skip
        assert not _ignored(ignore, module), module


@pytest.mark.parametrize(
    "arch, router",
    [("llama", None), ("qwen3_moe", "re:.*mlp.gate$"), ("mixtral", "re:.*block_sparse_moe.gate$"),
     ("deepseek_v3", "re:.*mlp.gate$"), ("tied", None)],
)  # fmt: skip
def test_fixture_architectures(checkpoint, arch, router):
    config, weights = _weights(checkpoint(arch))
    s = suggest_ignore(config, weights, "FP8_DYNAMIC")
    assert s.ignore[0] == "lm_head"
    assert "re:.*embed_tokens$" in s.ignore
    if router:
        assert router in s.ignore
        routers = [m for m, _, _ in weights if re.match(router[3:], m)]
        assert routers and all(_ignored(s.ignore, m) for m in routers)
    else:
        assert not any("gate" in e for e in s.ignore)
    # only entries that match something (lm_head is always listed), and nothing the model needs quantized
    assert not any("vision" in e for e in s.ignore)
    assert not _ignored(s.ignore, "model.layers.0.self_attn.q_proj")
    assert s.incompatible == []


def test_every_default_plans(checkpoint):
    """The suggested list for NVFP4A16 makes a plan that quantizes something, for every fixture."""
    from streamer.engine.convert import prepare

    for arch in ("llama", "qwen3_moe", "mixtral", "deepseek_v3", "tied"):
        path = checkpoint(arch)
        config, weights = _weights(path)
        s = suggest_ignore(config, weights, "NVFP4A16")
        source, plan = prepare(str(path), scheme="NVFP4A16", ignore=s.ignore)
        source.close()
        assert plan.n_quantized > 0, arch


def test_shape_problems_are_added_and_compressed():
    weights = [("lm_head", (1000, 4096), "BF16"), ("model.embed_tokens", (1000, 4096), "BF16")]
    for i in range(3):
        weights += [
            (f"model.layers.{i}.self_attn.q_proj", (4096, 4096), "BF16"),
            (f"model.layers.{i}.mlp.down_proj", (4096, 11000), "BF16"),  # 11000 % 128 != 0
        ]
    weights.append(("model.layers.0.input_layernorm", (4096,), "BF16"))
    s = suggest_ignore(LLAMA, weights, "W4A16")
    assert r"re:model\.layers\.\d+\.mlp\.down_proj$" in s.ignore
    assert len(s.incompatible) == 3
    assert any("W4A16" in n and "11000" in n for n in s.notes)
    # the result plans: nothing left that the scheme cannot handle
    recipe = make_recipe("W4A16", ignore=s.ignore)
    assert recipe.match("model.layers.2.mlp.down_proj") is None
    assert recipe.match("model.layers.2.self_attn.q_proj") is not None
    # a scheme without the constraint adds nothing
    assert suggest_ignore(LLAMA, weights, "FP8_DYNAMIC").incompatible == []


def test_one_odd_layer_is_named_not_patterned():
    weights = [(f"model.layers.{i}.mlp.down_proj", (64, 256 if i else 100), "BF16") for i in range(3)]
    s = suggest_ignore(LLAMA, weights, "NVFP4A16")
    assert "model.layers.0.mlp.down_proj" in s.ignore
    assert not any(e.startswith(r"re:model\.layers") for e in s.ignore)


def test_scheme_that_fits_nothing_says_so(checkpoint):
    config, weights = _weights(checkpoint("odd"))
    s = suggest_ignore(config, weights, "W4A16")
    assert s.incompatible  # found …
    assert not any("layers" in e for e in s.ignore)  # … but not ignored: that would convert nothing
    assert any("cannot quantize any weight" in n and "FP8_DYNAMIC" in n for n in s.notes)


def test_repo_names():
    assert suggest_repo_name("meta-llama/Llama-3-8B", "NVFP4A16") == "Llama-3-8B-NVFP4A16"
    assert suggest_repo_name("acme/tiny-llama@v1.0", "fp8_dynamic") == "tiny-llama-FP8_DYNAMIC"
    assert suggest_repo_name("acme/x-W4A16", "W4A16") == "x-W4A16"
    long = suggest_repo_name("a/" + "m" * 120, "NVFP4A16")
    assert len(long) <= 96 and long.endswith("-NVFP4A16")


def test_parse_and_format_ignore():
    text = "lm_head, model.embed_tokens\n\n# a comment\nre:.*mlp.gate$\nre:.*layers\\.\\d{1,2}\\.x$\nlm_head\n"
    assert parse_ignore(text) == ["lm_head", "model.embed_tokens", "re:.*mlp.gate$", r"re:.*layers\.\d{1,2}\.x$"]
    assert parse_ignore(format_ignore(["a", "re:b"])) == ["a", "re:b"]
    assert parse_ignore(None) == [] and parse_ignore(["a", " "]) == ["a"]


def test_every_accepted_scheme_has_a_blurb():
    for name in accepted_presets():
        blurb = scheme_blurb(name)
        assert blurb and "\n" not in blurb, name
    assert "Blackwell" in scheme_blurb("NVFP4A16")
    assert "Hopper" in scheme_blurb("FP8_DYNAMIC")


# --- the default policy: found by role, not by model name ------------------------------------------

from streamer.engine.policy import EMBEDDING, HEAD, ROUTER, TOWER, close_modules, default_kept, ignore_entries  # noqa: E402


def _w(*specs, vocab=1000, hidden=64):
    """(module, shape, dtype) rows: "name" is a (hidden, hidden) Linear, ("name", rows) sets rows."""
    out = []
    for spec in specs:
        name, rows = (spec, hidden) if isinstance(spec, str) else spec
        out.append((name, (vocab if rows == "V" else rows, hidden), "BF16"))
    return out


@pytest.mark.parametrize(
    "config, weights, expected",
    [
        # GPT-2: wte / wpe, tied head
        ({"vocab_size": 1000, "tie_word_embeddings": True},
         _w(("transformer.wte", "V"), ("transformer.wpe", 512), "transformer.h.0.attn.c_attn"),
         {"transformer.wte": EMBEDDING, "transformer.wpe": EMBEDDING, "lm_head": HEAD}),
        # GPT-NeoX: embed_in / embed_out; BLOOM: word_embeddings
        ({"vocab_size": 1000}, _w(("gpt_neox.embed_in", "V"), ("embed_out", "V"), "gpt_neox.layers.0.mlp.dense_h_to_4h"),
         {"gpt_neox.embed_in": EMBEDDING, "embed_out": HEAD}),
        ({"vocab_size": 1000}, _w(("transformer.word_embeddings", "V"), ("lm_head", "V")),
         {"transformer.word_embeddings": EMBEDDING, "lm_head": HEAD}),
        # Llama's original layout: tok_embeddings / output
        ({"vocab_size": 1000}, _w(("tok_embeddings", "V"), ("output", "V"), "layers.0.attention.wq"),
         {"tok_embeddings": EMBEDDING, "output": HEAD}),
        # an embedding table under a name no list knows: found by its vocabulary-sized rows
        ({"text_config": {"vocab_size": 1000}}, _w(("model.lm.tokens", "V"), "model.lm.layers.0.fc"),
         {"model.lm.tokens": EMBEDDING}),
        # a small model whose MLP width equals its vocabulary: those are Linears of a layer
        ({"vocab_size": 1000}, _w(("model.embed_tokens", "V"), ("model.layers.0.mlp.gate_proj", "V"),
                                  ("model.layers.1.mlp.up_proj", "V"), ("lm_head", "V")),
         {"model.embed_tokens": EMBEDDING, "lm_head": HEAD}),
    ],
)  # fmt: skip
def test_embeddings_and_heads_by_role(config, weights, expected):
    assert default_kept(config, weights) == expected


def test_routers_under_every_naming():
    names = [
        "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.0.gate_proj.weight",  # Qwen-MoE
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.0.w1.weight",
        "model.layers.2.feed_forward.router.weight", "model.layers.2.feed_forward.experts.gate_up_proj",  # Llama 4
        "model.layers.3.mlp.gate.wg.weight", "model.layers.3.mlp.experts.0.up_proj.weight",  # Hunyuan
        "model.layers.4.moe.router.layer.weight",  # Granite / DBRX style
        "model.layers.5.ffn.selector.weight", "model.layers.5.ffn.selector.e_score_correction_bias",  # by its bias
        "model.layers.6.mlp.gate.weight", "model.layers.6.mlp.gate_proj.weight",  # dense: `gate` is a Linear here
    ]  # fmt: skip
    weights = [(n[: -len(".weight")], (8, 64), "BF16") for n in names if n.endswith(".weight")]
    kept = default_kept({"vocab_size": 1000}, weights, names)
    assert {m for m, r in kept.items() if r == ROUTER} == {
        "model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate", "model.layers.1.block_sparse_moe.gate",
        "model.layers.2.feed_forward.router", "model.layers.3.mlp.gate.wg", "model.layers.4.moe.router.layer",
        "model.layers.5.ffn.selector",
    }  # fmt: skip
    assert "model.layers.6.mlp.gate" not in kept  # no experts next to it: not a router
    assert not any("experts" in m or "gate_proj" in m for m in kept)


def test_towers_and_projectors_unless_asked_to_quantize_them():
    weights = _w("visual.blocks.0.attn.qkv", "visual.merger.mlp.0", "model.vision_tower.encoder.layers.0.fc1",
                 "model.multi_modal_projector.linear_1", "audio_tower.layers.0.fc1", "model.layers.0.self_attn.q_proj",
                 ("model.vision_tower.embeddings.position_embedding", 196))  # fmt: skip
    kept = default_kept({"vision_config": {}}, weights)
    assert {m for m, r in kept.items() if r == TOWER} == {m for m, _, _ in weights[:5]}
    assert kept["model.vision_tower.embeddings.position_embedding"] == EMBEDDING
    assert "model.layers.0.self_attn.q_proj" not in kept
    assert not any(r == TOWER for r in default_kept({}, weights, towers=False).values())


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral", "deepseek_v3", "tied", "odd"])
def test_ignore_entries_name_exactly_what_is_kept(checkpoint, arch):
    config, weights = _weights(checkpoint(arch))
    weights = [w for w in weights if len(w[1]) == 2 and not w[0].endswith("norm")]
    kept = default_kept(config, weights)
    quantized = [m for m, _, _ in weights if m not in kept]
    entries = ignore_entries(kept, quantized)
    assert all(any(_match(m, e) for e in entries) for m in kept), entries
    assert not any(_match(m, e) for m in quantized for e in entries), entries
    assert len(entries) <= 4  # readable: one entry per rule here, not one per layer


def _match(module, entry):
    from compressed_tensors.utils.match import match_name

    return match_name(module, entry)


def test_ignore_entries_collapse_layers_and_subtrees():
    layers = [f"model.layers.{i}.mlp.{leaf}" for i in range(3) for leaf in ("gate_proj", "down_proj")]
    tower = [f"vision.blocks.{i}.fc" for i in range(3)]
    kept = {m: "x" for m in layers if "down" in m} | {m: "x" for m in tower}
    entries = ignore_entries(kept, [m for m in layers if "gate" in m])
    assert entries == [r"re:model\.layers\.\d+\.mlp\.down_proj$", r"re:vision\."]
    # one odd layer out: named exactly, never a pattern that would also take the others
    assert ignore_entries({"model.layers.1.mlp.down_proj": "x"}, layers[:2] + layers[4:]) == ["model.layers.1.mlp.down_proj"]


def test_close_modules_for_typos():
    modules = ["lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert close_modules("lm-head", modules) == ["lm_head"]
    assert close_modules("lm_haed", modules) == ["lm_head"]
    assert close_modules(r"re:.*mlp\.gaet$", modules)[0] == "mlp.gate"
    assert close_modules("completely_different", modules) == []
