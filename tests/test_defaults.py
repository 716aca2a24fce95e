"""Safe by default: one policy for every front door, and outputs that say what they did.

A default conversion keeps embeddings, the output head, MoE routers and vision/audio towers
unquantized (found by role, see streamer/engine/policy.py); the plan, the --json summary, the model
card and config.json's quantization_config.ignore all say so; shapes a scheme cannot serve stop
the run before any tensor is read, unless --skip-incompatible keeps them unquantized. The drop-in
`model_free_ptq` keeps the reference's semantics and warns. (Loading with transformers, per
architecture and scheme: tests/test_load.py.)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from compressed_tensors.utils.match import match_name
from safetensors import safe_open

from ct_oracle import ct_module_path
from streamer import model_free_ptq
from streamer.cli import main as cli
from streamer.engine.convert import convert, prepare, quantize
from streamer.io.provenance import front_matter, read_provenance
from streamer.errors import Hint, PlanError
from streamer.mirror.check import compare
from streamer.mirror.jobs import MirrorJob, parse_jobs
from streamer.engine.plan import INCOMPATIBLE, plan_summary, render, schemes_that_fit
from test_engine import CountingSource
from test_hub import SOURCE, hub  # noqa: F401  (the localhub fixture)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def qconfig(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]


def stored_quantized(folder: Path) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in tensors_of(folder) if k.endswith(".weight_scale")}


def _only_headers_read(src: CountingSource) -> bool:
    # the catalog reads each header as 8 bytes of length, then the JSON right after it
    return all(e - s <= 8 or s == 8 for p, s, e in src.reads if p.endswith(".safetensors"))


# --- one policy, every front door ------------------------------------------------------------------


def test_cli_convert_and_quantize_keep_the_same_modules(llama_ckpt, tmp_path, capsys):
    assert cli.main([str(llama_ckpt), str(tmp_path / "cli"), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q"]) == 0
    convert(str(llama_ckpt), str(tmp_path / "api"), scheme="FP8_DYNAMIC", device="cpu")
    quantize(str(llama_ckpt), str(tmp_path / "quantize"), scheme="FP8_DYNAMIC", device="cpu")
    for out in ("cli", "api", "quantize"):
        assert stored_quantized(tmp_path / out).isdisjoint({"lm_head", "model.embed_tokens"}), out
        assert qconfig(tmp_path / out)["ignore"] == ["lm_head", "re:.*embed_tokens$"], out
    src = tensors_of(llama_ckpt)
    out = tensors_of(tmp_path / "cli")
    assert raw(out["model.embed_tokens.weight"]) == raw(src["model.embed_tokens.weight"])
    # the switch off gives the reference's behaviour: everything the scheme targets
    convert(str(llama_ckpt), str(tmp_path / "off"), scheme="FP8_DYNAMIC", device="cpu", default_ignore=False)
    assert {"lm_head", "model.embed_tokens"} <= stored_quantized(tmp_path / "off")
    assert qconfig(tmp_path / "off")["ignore"] == []


def test_mirror_jobs_use_the_policy_and_accept_its_keys(hub, tmp_path, capsys):  # noqa: F811
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(
        f'[[job]]\nname = "fp8"\nsource = "{SOURCE}"\ntarget = "acme/tiny-fp8"\nscheme = "FP8_DYNAMIC"\n'
        f'[[job]]\nname = "ref"\nsource = "{SOURCE}"\ntarget = "acme/tiny-ref"\nscheme = "FP8_DYNAMIC"\n'
        "default_ignore = false\nskip_incompatible = true\nquantize_towers = true\n"
    )
    assert cli.main(["mirror", str(jobs), "--device", "cpu", "-q"]) == 0
    assert json.loads(hub.read_file("acme/tiny-fp8", "config.json"))["quantization_config"]["ignore"] == [
        "lm_head", "re:.*embed_tokens$",
    ]  # fmt: skip
    assert json.loads(hub.read_file("acme/tiny-ref", "config.json"))["quantization_config"]["ignore"] == []
    prov = read_provenance(hub.read_file("acme/tiny-ref", "README.md").decode())
    assert prov["policy"] == ["no-default-ignore", "quantize-towers", "skip-incompatible"]
    # the same settings again: both up to date (the policy is part of the settings)
    capsys.readouterr()
    assert cli.main(["mirror", str(jobs), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [j["status"] for j in report["jobs"]] == ["skipped", "skipped"]


def test_mirror_settings_include_the_policy():
    (a,) = parse_jobs({"job": [{"name": "a", "source": "o/s", "target": "o/t", "scheme": "W4A16"}]})
    (b,) = parse_jobs({"job": [{"name": "b", "source": "o/s", "target": "o/t", "scheme": "W4A16",
                                "default_ignore": False}]})  # fmt: skip
    assert a.default_ignore and not b.default_ignore and b.policy == ("no-default-ignore",)
    assert a.settings_key(None) != b.settings_key(None)
    prov = {"source": "o/s", "source_commit": "c", "scheme": "W4A16", "ignore": [], "policy": [],
            "settings": a.settings_key(None)}  # fmt: skip
    assert compare(a, prov, "c") is None
    assert "policy [] -> ['no-default-ignore']" in compare(b, prov, "c")
    # a card written before the policy existed: converted again, once, and told why
    old = {k: v for k, v in prov.items() if k != "policy"} | {"settings": "0" * 16}
    assert "before streamer kept embeddings" in compare(a, old, "c")
    with pytest.raises(Exception, match="default_ignore must be true or false"):
        parse_jobs({"job": [{"name": "c", "source": "o/s", "target": "o/t", "scheme": "W4A16", "default_ignore": "no"}]})
    assert MirrorJob(name="x", source="o/s", target="o/t", scheme="W4A16").policy == ()


def test_model_free_ptq_keeps_the_reference_semantics_and_warns_once(llama_ckpt, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="streamer"):
        model_free_ptq(str(llama_ckpt), str(tmp_path / "ref"), scheme="W8A16", device="cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "lm_head" in warnings[0] and "model.embed_tokens" in warnings[0]
    assert "ignore 'lm_head' 're:.*embed_tokens$'" in warnings[0]  # the exact entries that fix it
    assert {"lm_head", "model.embed_tokens"} <= stored_quantized(tmp_path / "ref")
    assert qconfig(tmp_path / "ref")["ignore"] == []
    card = (tmp_path / "ref" / "README.md").read_text()
    assert read_provenance(card)["policy"] == ["no-default-ignore"]  # it mattered: it is recorded
    assert "--scheme W8A16 --no-default-ignore" in card
    # nothing to warn about when the ignore list already covers what engines expect unquantized
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamer"):
        model_free_ptq(str(llama_ckpt), str(tmp_path / "safe"), scheme="W8A16", device="cpu",
                       ignore=["lm_head", "re:.*embed_tokens$"])  # fmt: skip
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert read_provenance((tmp_path / "safe" / "README.md").read_text())["policy"] == []


# --- the plan says what the defaults kept ----------------------------------------------------------


def test_plan_lists_each_rule_once_with_a_count(checkpoint, capsys):
    src = checkpoint("qwen3_moe")
    assert cli.main([str(src), "--scheme", "W4A16", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "kept unquantized beyond the ignore list:" in text
    assert "    output head (1): lm_head" in text
    assert "    embeddings (1): model.embed_tokens" in text
    assert "    MoE routers (2): model.layers.{0..1}.mlp.gate" in text
    assert text.count("MoE routers") == 1  # one line per rule, not one per layer
    _, plan = prepare(str(src), scheme="W4A16")
    summary = plan_summary(plan)
    assert [(r["rule"], r["count"]) for r in summary["kept_by_policy"]] == [
        ("output head", 1), ("embeddings", 1), ("MoE routers", 2),
    ]  # fmt: skip
    assert summary["config_ignore"] == ["lm_head", "re:.*embed_tokens$", "re:.*mlp.gate$"]


def test_json_summary_lists_the_rules(llama_ckpt, tmp_path, capsys):
    assert cli.main([str(llama_ckpt), str(tmp_path / "o"), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [(r["rule"], r["count"]) for r in summary["kept_by_policy"]] == [("output head", 1), ("embeddings", 1)]
    assert summary["ignore"] == ["lm_head", "re:.*embed_tokens$"]


def test_ignore_entries_that_match_nothing_are_a_warning(llama_ckpt):
    _, plan = prepare(str(llama_ckpt), scheme="FP8_DYNAMIC", ignore=["lm-head", r"re:.*embed_token$"])
    warnings = [w for w in plan.warnings if "matches no module" in w]
    assert len(warnings) == 2
    assert "'lm-head' matches no module of this checkpoint; closest module names: lm_head" in warnings[0]
    assert "embed_tokens" in warnings[1]
    assert "matches no module" in render(plan)


# --- config.json tells the truth -----------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, scheme, kwargs",
    [
        ("llama", "NVFP4A16", {}),
        ("qwen3_moe", "W8A16", {"ignore": ["re:.*k_proj$"]}),
        ("mixtral", "FP8_DYNAMIC", {}),
        ("deepseek_v3", "W4A16", {}),
        ("tied", "FP8_BLOCK", {}),
        ("llama320", "FP8_BLOCK", {"skip_incompatible": True}),
    ],
)
def test_config_ignore_names_every_unquantized_target_and_nothing_quantized(checkpoint, tmp_path, arch, scheme, kwargs):
    src = checkpoint("llama", intermediate_size=320) if arch == "llama320" else checkpoint(arch)
    out = tmp_path / "out"
    result = convert(str(src), str(out), scheme=scheme, device="cpu", **kwargs)
    ignore = qconfig(out)["ignore"]
    quantized = stored_quantized(out)
    targets = {  # 2-D `.weight` modules, not norms: what the scheme's "Linear" target matches
        n[: -len(".weight")] for n, t in tensors_of(src).items()
        if n.endswith(".weight") and t.ndim == 2 and not n[: -len(".weight")].endswith("norm")
    }  # fmt: skip
    unquantized = targets - quantized
    assert unquantized and quantized
    assert all(any(match_name(m, e) for e in ignore) for m in unquantized), (unquantized, ignore)
    assert not [m for m in quantized if any(match_name(m, e) for e in ignore)], ignore
    # built by compressed-tensors, and read back by it
    QuantizationConfig.model_validate({k: v for k, v in qconfig(out).items() if k not in ("version", "quant_method")})
    assert qconfig(out)["ignore"] == result.plan.config_ignore
    if "ignore" in kwargs:
        assert ignore[: len(kwargs["ignore"])] == kwargs["ignore"]  # the user's entries come first, as given


# --- shapes a scheme cannot serve ---------------------------------------------------------------


def test_incompatible_shapes_stop_before_reading_and_print_the_fix(checkpoint, tmp_path):
    path = checkpoint("llama", intermediate_size=320)  # down_proj: in_features 320
    for scheme in ("FP8_BLOCK", "W4A16"):
        src = CountingSource(path)
        with pytest.raises(PlanError) as err:
            convert(src, str(tmp_path / "out"), scheme=scheme, device="cpu")
        head = err.value.problems[0]
        assert "2 weight(s) have shapes" in head and "model.layers.{0..1}.mlp.down_proj" in head
        assert r"'re:model\.layers\.\d+\.mlp\.down_proj$'" in head and Hint("skip_incompatible") in err.value.hints
        assert {p.split(":")[0] for p in err.value.problems[1:]} == {
            "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight",
        }  # fmt: skip
        assert _only_headers_read(src) and not (tmp_path / "out").exists()
        # the printed entries are exactly the fix
        _, plan = prepare(str(path), scheme=scheme, ignore=[r"re:model\.layers\.\d+\.mlp\.down_proj$"])
        assert plan.n_quantized == 12


def test_fp8_block_refuses_in_features_not_multiple_of_128_only(checkpoint):
    """out_features 320 (gate/up) is served with ceil-shaped scales; in_features 320 is not."""
    _, plan = prepare(str(checkpoint("llama", intermediate_size=320)), scheme="FP8_BLOCK", skip_incompatible=True)
    quantized = {q.module for j in plan.jobs for q in j.quantize}
    assert "model.layers.0.mlp.gate_proj" in quantized and "model.layers.0.mlp.down_proj" not in quantized
    (rule,) = [r for r in plan.kept_by_policy if r.rule == INCOMPATIBLE]
    assert rule.modules == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert "in_features 320 is not a multiple of 128" in rule.why
    assert "shapes the scheme cannot serve (2)" in render(plan)


def test_skip_incompatible_is_listed_in_plan_card_and_config(checkpoint, tmp_path):
    src = checkpoint("llama", intermediate_size=320)
    out = tmp_path / "out"
    convert(str(src), str(out), scheme="W4A16", device="cpu", skip_incompatible=True)
    assert r"re:model\.layers\.\d+\.mlp\.down_proj$" in qconfig(out)["ignore"]
    assert not any("down_proj" in m for m in stored_quantized(out))
    card = (out / "README.md").read_text()
    assert "| kept unquantized, shapes the scheme cannot serve | 2 (W4A16: in_features 320" in card
    assert read_provenance(card)["policy"] == ["skip-incompatible"]
    assert "--skip-incompatible" in card  # the reproduce line


def test_when_nothing_fits_the_message_says_so_and_suggests_schemes(odd_ckpt):
    with pytest.raises(PlanError) as err:
        prepare(str(odd_ckpt), scheme="FP8_BLOCK", skip_incompatible=True)
    head = err.value.problems[0]
    assert head.startswith("FP8_BLOCK cannot quantize any weight of this checkpoint")
    suggested = head.split("schemes that fit every weight: ")[1].split(", ")
    assert suggested[0] == "FP8_DYNAMIC" and "W4A16" not in suggested
    for scheme in suggested:  # every suggestion really plans
        _, plan = prepare(str(odd_ckpt), scheme=scheme)
        assert plan.n_quantized == 14 and not plan.kept_by_policy[2:]
    assert schemes_that_fit([((160, 416), "BF16")])[:2] == ["FP8_DYNAMIC", "W8A8"]


# --- the mixed-dtype router (transformers 5.24 saves DeepSeek-V3 routers as F32) -----------------

ROUTER = "model.layers.1.mlp.gate"


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "FP8_BLOCK", "W4A16", "W8A16", "NVFP4A16", "MXFP4A16"])
def test_f32_router_next_to_bf16_weights(deepseek_ckpt, tmp_path, scheme):
    src = tensors_of(deepseek_ckpt)
    assert src[ROUTER + ".weight"].dtype == torch.float32 and src[ROUTER + ".weight"].ndim == 2
    assert src["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    convert(str(deepseek_ckpt), str(tmp_path / "on"), scheme=scheme, device="cpu")
    on = tensors_of(tmp_path / "on")
    for name in (ROUTER + ".weight", ROUTER + ".e_score_correction_bias"):  # byte for byte, still F32
        assert on[name].dtype == torch.float32 and raw(on[name]) == raw(src[name]), name
    assert ROUTER + ".weight_scale" not in on
    assert "model.layers.1.mlp.experts.0.up_proj" in stored_quantized(tmp_path / "on")
    if scheme not in ("FP8_DYNAMIC", "W8A16"):
        return
    # defaults off: the F32 router is quantized exactly as compressed-tensors does it for F32
    convert(str(deepseek_ckpt), str(tmp_path / "off"), scheme=scheme, device="cpu", default_ignore=False)
    off = tensors_of(tmp_path / "off")
    expected = ct_module_path(src[ROUTER + ".weight"], preset_name_to_scheme(scheme, ["Linear"]))
    for suffix, t in expected.items():
        got = off[f"{ROUTER}.{suffix}"]
        assert got.dtype == t.dtype and raw(got) == raw(t), suffix


# --- the model card ---------------------------------------------------------------------------------

SOURCE_CARD = """---
license: other
license_name: acme-community
license_link: https://example.com/LICENSE
language:
- en
- fr
pipeline_tag: text-generation
library_name: transformers
datasets:
- acme/pile
tags:
- chat
base_model: meta/original
widget: [{"text": "hi"}]
---
# tiny
"""


def test_card_keeps_source_metadata_and_names_no_local_path(llama_ckpt, tmp_path):
    src = tmp_path / "tiny-src"
    shutil.copytree(llama_ckpt, src)
    (src / "README.md").write_text(SOURCE_CARD)
    out = tmp_path / "tiny-out"
    convert(str(src), str(out), scheme="FP8_DYNAMIC", device="cpu")
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    for key in ("license", "license_name", "license_link", "language", "pipeline_tag", "library_name", "datasets"):
        assert meta[key] == front_matter(SOURCE_CARD)[key], key
    assert meta["tags"][0] == "chat" and "compressed-tensors" in meta["tags"]
    assert "widget" not in meta and "base_model" not in meta  # a local folder is no Hub base model
    assert str(tmp_path) not in card and "/tmp" not in card
    assert "vllm serve ./tiny-out" in card and "python -m streamer ./tiny-src ./tiny-out" in card
    assert "| kept unquantized by default | output head (1), embeddings (1) |" in card


def test_card_of_a_hub_source_links_its_base_model(hub, llama_ckpt, tmp_path):  # noqa: F811
    src = tmp_path / "carded"
    shutil.copytree(llama_ckpt, src)
    (src / "README.md").write_text(SOURCE_CARD)
    hub.seed_repo("acme/carded", src)
    assert cli.main(["acme/carded", "alice/carded-fp8", "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q"]) == 0
    meta = front_matter(hub.read_file("alice/carded-fp8", "README.md").decode())
    assert meta["base_model"] == "acme/carded" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "other" and meta["license_name"] == "acme-community"


# --- the Space shows the same policy, and offers the shape choice ---------------------------------


def test_space_plan_shows_the_rules_and_offers_to_keep_unservable_shapes(checkpoint):
    pytest.importorskip("gradio")
    from streamer.web.tables import plan_tables
    from streamer.web.wording import sentence

    src = str(checkpoint("llama", intermediate_size=320))
    with pytest.raises(PlanError) as err:
        prepare(src, scheme="W4A16")
    message = sentence(err.value)
    assert "--" not in message and "tick “Keep weights the scheme cannot serve unquantized”" in message
    _, plan = prepare(src, scheme="W4A16", skip_incompatible=True)
    overview, _, tensors, _, _ = plan_tables(plan)
    assert "Kept unquantized beyond the ignore list: output head (1), embeddings (1), shapes the scheme cannot serve (2)" in overview
    why = {row[0]: row[3] for row in tensors.values.tolist() if row[2] == "keep"}
    assert why["lm_head.weight"].startswith("kept by default (output head)")
    assert why["model.layers.{0..1}.mlp.down_proj.weight"] == "W4A16 cannot serve this shape"
