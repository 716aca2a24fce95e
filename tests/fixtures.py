"""Tiny checkpoints of real architectures, and a corpus of malformed ones.

Everything here is built locally from ``transformers`` config classes with random weights and
saved with ``save_pretrained`` -- nothing is downloaded.  The checkpoints are real Hugging Face
checkpoints: real tensor names, ``config.json``, ``generation_config.json``, a (tiny) tokenizer,
a chat template, and -- unless ``single_file=True`` -- several shards with
``model.safetensors.index.json``, laid out so that fused sets straddle shard boundaries.

Public API
----------
``ARCHS``                       the architecture names ``build_checkpoint`` accepts
``build_checkpoint(arch, dst)``  build and save a checkpoint, returns ``dst``
``load_logits(path, ids)``       logits of a checkpoint folder (plain or compressed-tensors)
``dequantize_checkpoint(src, dst)``  compressed-tensors checkpoint -> dense one
``PROMPT_IDS``                   fixed token ids to feed ``load_logits``
``read_header(path)``            (header dict, data offset) of one safetensors file, raw
``weight_map(path)``             tensor name -> file name of a checkpoint folder
``write_header(path, header)``   rewrite a safetensors header, keeping the data section
``fused_sets(names)``            the fused sets vLLM fuses (q/k/v, MLA q_a/kv_a, gate/up of dense,
                                 shared and routed experts, Mixtral w1/w3) among tensor names
``straddling_sets(wmap)``        those whose members live in more than one file
``CORRUPTIONS`` / ``corrupt_checkpoint(kind, src, dst)``   malformed checkpoints
``target_shard(src)``            the shard file that header-level corruptions damage (the one
                                 holding ``CORRUPTION_TARGET`` = layer 0 q_proj)

Tensor layout written by transformers 5.23 ``save_pretrained``: always the classic per-module
2-D names -- MoE experts are saved per expert (``mlp.experts.N.{gate,up,down}_proj.weight``,
Mixtral ``block_sparse_moe.experts.N.w{1,2,3}.weight``), never the fused 3-D
``experts.gate_up_proj`` that the in-memory model uses (save_pretrained reverts the conversion).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Iterable

import torch

__all__ = [
    "ARCHS",
    "PROMPT_IDS",
    "CORRUPTIONS",
    "CORRUPTION_TARGET",
    "CORRUPTION_WORDS",
    "build_checkpoint",
    "load_logits",
    "dequantize_checkpoint",
    "read_header",
    "write_header",
    "weight_map",
    "fused_sets",
    "straddling_sets",
    "corrupt_checkpoint",
    "target_shard",
]

ARCHS = ("llama", "qwen3_moe", "mixtral", "deepseek_v3", "tied", "odd")

#: fixed prompt for ``load_logits`` (valid for every fixture: all vocabularies are >= 1000)
PROMPT_IDS = [1, 17, 242, 999, 5, 77, 640, 3, 128, 511, 900, 42]

# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

_COMMON = dict(
    vocab_size=1024,
    max_position_embeddings=512,
    initializer_range=0.05,  # weights ~N(0, 0.05): not tiny, logits stay finite in 2-4 layers
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def _config(arch: str, overrides: dict):
    import transformers as tf

    if arch == "llama":
        kw = dict(_COMMON, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)
        cls = tf.LlamaConfig
    elif arch == "odd":
        # hidden / intermediate multiples of 32 but NOT of 128 (FP8_BLOCK edge blocks,
        # group-size-128 errors); vocab 1000 is not a multiple of 32 either (rows only).
        kw = dict(_COMMON, vocab_size=1000, hidden_size=160, intermediate_size=416,
                  num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1, head_dim=32)
        cls = tf.LlamaConfig
    elif arch == "tied":
        kw = dict(_COMMON, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  tie_word_embeddings=True)
        cls = tf.Qwen3Config
    elif arch == "qwen3_moe":
        kw = dict(_COMMON, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
        cls = tf.Qwen3MoeConfig
    elif arch == "mixtral":
        kw = dict(_COMMON, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  num_local_experts=4, num_experts_per_tok=2)
        cls = tf.MixtralConfig
    elif arch == "deepseek_v3":
        # q_a 256->128, q_b 128->4*(64+64)=512, kv_a 256->128+64=192 (like the real 576: not a
        # multiple of 128 in `out`), kv_b 128->4*(64+64)=512, o 4*64=256->256.
        kw = dict(_COMMON, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                  num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=128,
                  kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64)
        cls = tf.DeepseekV3Config
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    kw.update(overrides)
    return cls(**kw)


# --------------------------------------------------------------------------------------------
# names, fused sets
# --------------------------------------------------------------------------------------------

# Fused sets as vLLM fuses them (one global scale per set for NVFP4).  Each entry: a regex with
# a `p` (prefix) group on the first member's name, and the suffixes of all members.
_FUSED = [
    ("attn_qkv", r"(?P<p>.*\.(?:self_attn|attn|attention|self_attention))\.q_proj\.weight$",
     ["q_proj.weight", "k_proj.weight", "v_proj.weight"]),
    ("mla_qkv_a", r"(?P<p>.*\.self_attn)\.q_a_proj\.weight$",
     ["q_a_proj.weight", "kv_a_proj_with_mqa.weight"]),
    ("gate_up", r"(?P<p>.*)\.gate_proj\.weight$", ["gate_proj.weight", "up_proj.weight"]),
    ("w1_w3", r"(?P<p>.*\.experts\.\d+)\.w1\.weight$", ["w1.weight", "w3.weight"]),
]


def fused_sets(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Fused sets present among ``names``: [(kind, [member names...])], members all present.

    kinds: attn_qkv, mla_qkv_a, gate_up (dense mlp, shared_experts and per-expert), w1_w3.
    """
    names = set(names)
    out = []
    for kind, pat, suffixes in _FUSED:
        for n in sorted(names):
            m = re.match(pat, n)
            if m:
                members = [f"{m.group('p')}.{s}" for s in suffixes]
                if all(x in names for x in members):
                    out.append((kind, members))
    return out


def straddling_sets(wmap: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The fused sets of a weight map whose members live in more than one file."""
    return [(k, ms) for k, ms in fused_sets(wmap) if len({wmap[m] for m in ms}) > 1]


# Partners in llm-compressor 0.14's DEFAULT_FUSED_MAPPINGS (microscale schemes): a shard that
# holds *only* such partners has no job there and model_free_ptq raises
# "Could not find inverse_weight_map for shard ...".  The default layout avoids that so the
# reference can run on the fixtures; build_checkpoint("llama", dst, max_shard_size="160KB")
# gives shards holding only k_proj+v_proj or only up_proj, to test that case.
_REF_PRIMARIES = [
    (r"^(?P<prefix>.+?)\.(?P<attn>attn|attention|self_attn|self_attention)\.q_proj\.weight$",
     ["{prefix}.{attn}.k_proj.weight", "{prefix}.{attn}.v_proj.weight"]),
    (r"^(?P<prefix>.+?)\.(?P<attn>attn|attention|self_attn)\.wq_a\.weight$",
     ["{prefix}.{attn}.wkv_a_with_mqa.weight"]),
    (r"^(?P<prefix>.+?)\.(?P<mlp>mlp|feed_forward)\.gate_proj\.weight$",
     ["{prefix}.{mlp}.up_proj.weight"]),
    (r"^(?P<prefix>.+?)\.w1\.weight$", ["{prefix}.w3.weight"]),
]


def _reference_partners(names: Iterable[str]) -> set[str]:
    deps: set[str] = set()
    for n in names:
        for pat, templates in _REF_PRIMARIES:
            m = re.match(pat, n)
            if m:
                deps.update(t.format(**m.groupdict()) for t in templates)
    return deps


def _layout_ok(arch: str, wmap: dict[str, str], reference_compatible: bool = True) -> bool:
    """Does this weight map have the straddles the fixture promises (see build_checkpoint)?"""
    files = set(wmap.values())
    if len(files) < 2:
        return False
    straddles = straddling_sets(wmap)
    kinds = {k for k, _ in straddles}

    def any_straddle(pred) -> bool:
        return any(pred(k, ms) for k, ms in straddles)

    if arch == "deepseek_v3":
        ok = ("mla_qkv_a" in kinds
              and any_straddle(lambda k, ms: k == "gate_up" and ".experts." in ms[0])
              and any_straddle(lambda k, ms: k == "gate_up" and ".experts." not in ms[0]))
    else:
        # q_proj and v_proj of one layer in different files
        ok = any_straddle(lambda k, ms: k == "attn_qkv" and wmap[ms[0]] != wmap[ms[2]])
        if arch == "mixtral":
            ok = ok and "w1_w3" in kinds
        elif arch == "qwen3_moe":
            ok = ok and any_straddle(lambda k, ms: k == "gate_up" and ".experts." in ms[0])
        else:
            ok = ok and any_straddle(lambda k, ms: k == "gate_up")
    if not ok or not reference_compatible:
        return ok
    # every file holds at least one tensor that is not a reference partner
    partners = _reference_partners(wmap)
    by_file: dict[str, list[str]] = {}
    for n, f in wmap.items():
        by_file.setdefault(f, []).append(n)
    return ok and all(any(n not in partners for n in ns) for ns in by_file.values())


# --------------------------------------------------------------------------------------------
# small files: tokenizer, chat template
# --------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _write_tokenizer(dst: Path, vocab_size: int) -> None:
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    words += [str(d) for d in range(10)] + list(".,!?;:'\"()-")
    base = ["the", "a", "of", "and", "to", "in", "is", "it", "hello", "world", "model", "quant"]
    vocab_list = specials + words + base
    vocab_list += [f"tok{i}" for i in range(max(0, min(vocab_size, 512) - len(vocab_list)))]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, decoders

        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        tok.decoder = decoders.WordPiece(prefix="##")
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
        tok.save(str(dst / "tokenizer.json"))
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        (dst / "tokenizer.json").write_text(json.dumps(
            {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab,
                                         "unk_token": "<unk>"}}, indent=2))
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(
        {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2) + "\n")
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------


def _make_model(arch: str, dtype: torch.dtype, seed: int, overrides: dict):
    from transformers import AutoModelForCausalLM

    cfg = _config(arch, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        # norms / biases come out as exact 1s and 0s: perturb every 1-D tensor so that
        # pass-through tensors are distinguishable and a byte-for-byte check means something.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 and p.is_floating_point():
                    p.add_(torch.randn(p.shape, dtype=torch.float32).to(p.dtype) * 0.05)
            for name, b in model.named_buffers():
                if b.ndim == 1 and b.is_floating_point() and "bias" in name:
                    b.add_(torch.randn(b.shape, dtype=torch.float32).to(b.dtype) * 0.05)
    model.eval()
    return model


class _quiet_transformers:
    """Silence transformers' progress bars and info logs while saving (restored afterwards)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._bars = hf_logging.is_progress_bar_enabled()
        self._level = hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(self._level)
        return False


def _clear_weights(dst: Path) -> None:
    for p in dst.glob("*.safetensors"):
        p.unlink()
    idx = dst / "model.safetensors.index.json"
    if idx.exists():
        idx.unlink()


def _candidate_sizes(total: int) -> list[int]:
    """Shard sizes to try, largest (fewest shards) first: a 3 % geometric grid."""
    sizes, s = [], float(total)
    while s >= 4096:
        sizes.append(int(s))
        s *= 0.97
    return sizes


def _simulated_layouts(model):
    """Yield (size, weight map) for candidate sizes, computed the way save_pretrained shards
    (its reverted state dict + huggingface_hub's splitter) without writing anything.  Yields
    nothing when transformers' internals moved (the caller then saves and checks instead)."""
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
        from transformers.modeling_utils import (
            remove_tied_weights_from_state_dict,
            revert_weight_conversion,
        )

        sd = remove_tied_weights_from_state_dict(model.state_dict(), model)
        sd = revert_weight_conversion(model, sd)
    except Exception:  # pragma: no cover - depends on transformers internals
        return
    total = sum(t.numel() * t.element_size() for t in sd.values())
    for size in _candidate_sizes(total):
        split = split_torch_state_dict_into_shards(
            sd, filename_pattern="model{suffix}.safetensors", max_shard_size=size)
        if split.is_sharded:
            yield size, dict(split.tensor_to_filename)


def build_checkpoint(
    arch: str,
    dst: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int | None = "default-small",
    seed: int = 0,
    single_file: bool = False,
    **overrides,
) -> Path:
    """Build a tiny random-weight checkpoint of a real architecture into ``dst``.

    arch: one of ``ARCHS``.  ``overrides`` go to the transformers config class.

    max_shard_size:
      * ``"default-small"`` (default): several shards; the size is chosen (and the result checked
        from the written index, AssertionError otherwise) so that
          - some layer's ``q_proj`` and ``v_proj`` are in different files (DeepSeek:
            ``q_a_proj`` and ``kv_a_proj_with_mqa``),
          - some dense/shared ``gate_proj``/``up_proj`` pair straddles (llama, tied, odd,
            deepseek_v3), some expert's ``gate_proj``/``up_proj`` pair straddles (qwen3_moe,
            deepseek_v3), some expert's ``w1``/``w3`` pair straddles (mixtral),
          - if any candidate size allows it (all default fixtures), every file holds at least
            one tensor that is not an llm-compressor fused *partner* (k_proj, v_proj,
            mlp.up_proj, w3), so the reference ``model_free_ptq`` has a job for every shard.
            NB: the reference still cannot run NVFP4/MXFP4 on the sharded mixtral (it raises
            "Matched a re:.*w1\\.weight$ twice before completing set"): use single_file=True.
        The largest size on a 3 % grid that gives this with >= 5 files (else >= 2) is used; the
        layout is computed the way save_pretrained shards, then checked from the written index.
      * an int or a string like ``"200KB"``: passed to ``save_pretrained`` as is, nothing checked.
      * ``None`` (or ``single_file=True``): one ``model.safetensors``, no index.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _clear_weights(dst)
    with _quiet_transformers():
        model = _make_model(arch, dtype, seed, overrides)
        _save(model, arch, dst, max_shard_size, single_file)
    _write_tokenizer(dst, model.config.vocab_size)
    return dst


def _save(model, arch: str, dst: Path, max_shard_size, single_file: bool) -> None:
    if single_file or max_shard_size is None:
        model.save_pretrained(dst, max_shard_size="100GB")
        assert (dst / "model.safetensors").exists()
        assert not (dst / "model.safetensors.index.json").exists()
    elif max_shard_size == "default-small":
        # prefer a layout the reference can also process; else (e.g. mixtral with 8 experts)
        # one that only straddles
        layouts = list(_simulated_layouts(model))
        chosen = None
        for ref_ok, min_files in ((True, 5), (True, 2), (False, 5), (False, 2)):
            for size, wmap in layouts:
                if len(set(wmap.values())) >= min_files and \
                        _layout_ok(arch, wmap, reference_compatible=ref_ok):
                    chosen = size
                    break
            if chosen is not None:
                break
        if chosen is None:  # no simulation possible: save and check
            total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            for size in _candidate_sizes(total):
                _clear_weights(dst)
                model.save_pretrained(dst, max_shard_size=size)
                if (dst / "model.safetensors.index.json").exists() and \
                        _layout_ok(arch, weight_map(dst), reference_compatible=False):
                    chosen = size
                    break
        else:
            model.save_pretrained(dst, max_shard_size=chosen)
        if chosen is None:
            raise AssertionError(f"{arch}: no shard size makes the fused sets straddle shards")
        wmap = weight_map(dst)
        assert len(set(wmap.values())) >= 2
        assert _layout_ok(arch, wmap, reference_compatible=False), \
            f"{arch}: fused sets do not straddle shards as promised"
    else:
        model.save_pretrained(dst, max_shard_size=max_shard_size)


def weight_map(path: Path) -> dict[str, str]:
    """tensor name -> file name, from the index or (single file) from the header."""
    path = Path(path)
    idx = path / "model.safetensors.index.json"
    if idx.exists():
        return dict(json.loads(idx.read_text())["weight_map"])
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        header, _ = read_header(f)
        out.update({k: f.name for k in header if k != "__metadata__"})
    return out


# --------------------------------------------------------------------------------------------
# load a checkpoint, run it
# --------------------------------------------------------------------------------------------


_QPARAM_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale",
                    "weight_shape", "weight_g_idx")


def _is_quantized_ckpt(path: Path) -> bool:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return cfg.get("quantization_config") is not None


def _quantized_modules(names: Iterable[str]) -> set[str]:
    """Module names that carry compressed-tensors parameters (weight_packed / weight_scale)."""
    mods = set()
    for n in names:
        for suf in ("weight_packed", "weight_scale"):
            if n.endswith("." + suf):
                mods.add(n[: -len(suf) - 1])
    return mods


def dequantize_checkpoint(src: Path, dst: Path) -> Path:
    """Decompress a compressed-tensors checkpoint into a plain dense one (config without
    ``quantization_config``), using compressed-tensors' own compressors module by module:
    ``BaseCompressor.get_value_from_registry(format).decompress(local_state_dict, scheme)``.
    Small files are copied.  Independent of transformers' loader (whose MoE paths are broken for
    NVFP4 / FP8_BLOCK experts in 5.23)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    qdata = dict(cfg.pop("quantization_config"))
    qdata.pop("version", None)
    qcfg = QuantizationConfig.model_validate(qdata)
    dtype = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"))

    groups = list(qcfg.config_groups.values())

    def scheme_for(module: str):
        for g in groups:  # explicit regex targets first (mixed configs), then class targets
            if any(t.startswith("re:") and re.match(t[3:], module) for t in g.targets):
                return g
            if module in g.targets:
                return g
        for g in groups:
            if any(not t.startswith("re:") for t in g.targets):
                return g
        return groups[0]

    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json" \
                and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))

    wmap: dict[str, str] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(str(f))
        out = {}
        mods = _quantized_modules(tensors)
        done = set()
        for mod in sorted(mods):
            local = {}
            for suf in ("weight",) + _QPARAM_SUFFIXES:
                key = f"{mod}.{suf}"
                if key in tensors:
                    local[suf] = tensors[key]
                    done.add(key)
            scheme = scheme_for(mod)
            fmt = scheme.format or qcfg.format
            dense = BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)
            out[f"{mod}.weight"] = dense["weight"].to(dtype).contiguous()
        for k, v in tensors.items():
            if k not in done:
                out[k] = v
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        wmap.update({k: f.name for k in out})
    if (src / "model.safetensors.index.json").exists():
        total = sum((dst / f).stat().st_size for f in set(wmap.values()))
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))
    return dst


def load_logits(path: Path, prompt_ids: list[int] | torch.Tensor = PROMPT_IDS,
                dtype: torch.dtype = torch.float32, *, via: str = "auto") -> torch.Tensor:
    """Load a checkpoint folder on CPU and return float32 logits, shape (len(prompt_ids), vocab).

    Plain checkpoints: ``AutoModelForCausalLM.from_pretrained``.  compressed-tensors checkpoints:
      * ``via="transformers"``: transformers' compressed-tensors integration, decompressing on
        load (``CompressedTensorsConfig(dequantize=True)``, formerly ``run_compressed=False``).
        A plain ``from_pretrained`` (compressed run) is wrong on CPU in 5.23: silently garbage
        logits for FP8/INT8/W4A16/W8A16, errors for NVFP4/MXFP4/MXFP8/W4A16_ASYM.
        Works on CPU for every dense-model scheme; for MoE experts transformers 5.23 is broken on
        NVFP4 (ignores ``weight_global_scale`` -> garbage, no error) and FP8_BLOCK (raises).
      * ``via="dequantize"``: ``dequantize_checkpoint`` (compressed-tensors' compressors) into a
        temporary dense checkpoint, then a plain load.
      * ``via="auto"`` (default): "dequantize" when quantized MoE expert tensors are present,
        else "transformers".
    """
    import tempfile

    from transformers import AutoModelForCausalLM

    path = Path(path)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    kwargs = {}
    tmp = None
    try:
        if _is_quantized_ckpt(path):
            mode = via
            if mode == "auto":
                mods = _quantized_modules(weight_map(path))
                mode = "dequantize" if any(".experts." in m for m in mods) else "transformers"
            if mode == "dequantize":
                tmp = tempfile.TemporaryDirectory(prefix="dequant-")
                path = dequantize_checkpoint(path, Path(tmp.name))
            elif mode == "transformers":
                from transformers import CompressedTensorsConfig

                kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
            else:
                raise ValueError(f"via must be auto, transformers or dequantize, not {via!r}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantization_config.*already has")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu",
                                                         **kwargs)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids).logits
        return out[0].float()
    finally:
        if tmp is not None:
            tmp.cleanup()


# --------------------------------------------------------------------------------------------
# raw safetensors headers
# --------------------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data section) of a well-formed safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def write_header(path: Path, header, data: bytes | None = None, *, raw: bytes | None = None,
                 pad_to: int | None = None) -> None:
    """Rewrite a safetensors file with a new header (dict/list/anything JSON, or ``raw`` bytes),
    keeping its data section (or writing ``data``).  The header is space-padded to a multiple of
    8, or to exactly ``pad_to`` bytes."""
    path = Path(path)
    if data is None:
        _, start = read_header(path)
        data = path.read_bytes()[start:]
    hb = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    target = pad_to if pad_to is not None else (len(hb) + 7) // 8 * 8
    if len(hb) > target:
        raise ValueError("header longer than pad_to")
    hb = hb + b" " * (target - len(hb))
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


# --------------------------------------------------------------------------------------------
# malformed checkpoints
# --------------------------------------------------------------------------------------------

CORRUPTIONS = [
    "truncated_header",          # file ends inside the JSON header
    "header_len_past_eof",       # 8-byte length N > file size - 8
    "overlapping_offsets",       # two tensors' data_offsets overlap (each span's size is right)
    "out_of_bounds_offsets",     # a tensor's data_offsets lie past the end of the file
    "dtype_size_mismatch",       # dtype BF16 -> F32 without changing the span: shape*dtype != span
    "absurd_header_len",         # N = 2**60
    "non_utf8_header",           # invalid UTF-8 bytes inside the header JSON (in a tensor name)
    "missing_shard",             # the index names a file that is absent
    "unknown_dtype",             # dtype "Q4_K"
    "duplicate_tensor_across_shards",  # same tensor name in two shards; the index lists one
    "index_not_json",            # model.safetensors.index.json is not JSON
    "header_not_object",         # the header is valid JSON but an array, not an object
]

#: a word the error for each corruption must contain (the tests check streamer names the damage)
CORRUPTION_WORDS = {
    "truncated_header": "truncated",
    "header_len_past_eof": "past the end",
    "overlapping_offsets": "overlap",
    "out_of_bounds_offsets": "outside",
    "dtype_size_mismatch": "needs",
    "absurd_header_len": "limit",
    "non_utf8_header": "UTF-8",
    "missing_shard": "does not have",
    "unknown_dtype": "unknown dtype",
    "duplicate_tensor_across_shards": "both",
    "index_not_json": "not valid JSON",
    "header_not_object": "JSON object",
}

#: header-level corruptions damage the file holding this tensor (see ``target_shard``)
CORRUPTION_TARGET = "model.layers.0.self_attn.q_proj.weight"


BF16_NAN, BF16_INF, BF16_NEG_INF = b"\xc0\x7f", b"\x80\x7f", b"\x80\xff"


def set_element(ckpt: Path, tensor: str, index: int, value: bytes) -> None:
    """Overwrite element INDEX of the BF16 TENSOR of the checkpoint folder CKPT with the raw bytes
    VALUE (BF16_NAN, BF16_INF …), in place."""
    shard = ckpt / weight_map(ckpt)[tensor]
    header, start = read_header(shard)
    entry = header[tensor]
    assert entry["dtype"] == "BF16"
    with open(shard, "r+b") as f:
        f.seek(start + entry["data_offsets"][0] + 2 * index)
        f.write(value)


def target_shard(src: Path) -> str:
    """File name that ``corrupt_checkpoint`` damages for header-level kinds (and deletes for
    ``missing_shard``): the one holding ``CORRUPTION_TARGET`` (else the first file)."""
    wmap = weight_map(src)
    if CORRUPTION_TARGET in wmap:
        return wmap[CORRUPTION_TARGET]
    return sorted(set(wmap.values()))[0]


def _tensor_entries(header: dict) -> list[tuple[str, dict]]:
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])


def corrupt_checkpoint(kind: str, src: Path, dst: Path) -> Path:
    """Copy checkpoint folder ``src`` to ``dst`` and damage it at the byte level; returns ``dst``.

    Header-level kinds damage ``target_shard(src)``.  ``missing_shard``,
    ``duplicate_tensor_across_shards`` and ``index_not_json`` need a sharded ``src``.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    sharded = index.exists()
    needs_index = ("missing_shard", "duplicate_tensor_across_shards", "index_not_json")
    if kind in needs_index and not sharded:
        raise ValueError(f"{kind} needs a sharded checkpoint (with an index)")

    fname = target_shard(src)
    victim = dst / fname
    raw = victim.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    entries = _tensor_entries(header)

    if kind == "truncated_header":
        victim.write_bytes(raw[: 8 + n // 2])
    elif kind == "header_len_past_eof":
        victim.write_bytes(struct.pack("<Q", len(raw) + 1000) + raw[8:])
    elif kind == "absurd_header_len":
        victim.write_bytes(struct.pack("<Q", 2**60) + raw[8:])
    elif kind == "overlapping_offsets":
        # the second tensor (in file order) starts inside the first one; sizes unchanged
        (_, a), (_, b) = entries[0], entries[1]
        size_b = b["data_offsets"][1] - b["data_offsets"][0]
        begin = a["data_offsets"][0] + max(2, (a["data_offsets"][1] - a["data_offsets"][0]) // 2)
        begin -= begin % 2
        b["data_offsets"] = [begin, begin + size_b]
        write_header(victim, header, data)
    elif kind == "out_of_bounds_offsets":
        _, last = entries[-1]
        b0, b1 = last["data_offsets"]
        last["data_offsets"] = [b0 + len(data), b1 + len(data)]
        write_header(victim, header, data)
    elif kind == "dtype_size_mismatch":
        name = CORRUPTION_TARGET if CORRUPTION_TARGET in header else entries[0][0]
        header[name]["dtype"] = "F32" if header[name]["dtype"] != "F32" else "F64"
        write_header(victim, header, data)
    elif kind == "unknown_dtype":
        name = CORRUPTION_TARGET if CORRUPTION_TARGET in header else entries[0][0]
        header[name]["dtype"] = "Q4_K"
        write_header(victim, header, data)
    elif kind == "non_utf8_header":
        hb = raw[8:8 + n]
        name = (CORRUPTION_TARGET if CORRUPTION_TARGET in header else entries[0][0]).encode()
        i = hb.index(b'"' + name + b'"') + 1
        bad = hb[:i] + b"\xff\xfe" + hb[i + 2:]  # same length; 0xff never occurs in UTF-8
        victim.write_bytes(raw[:8] + bad + data)
    elif kind == "header_not_object":
        write_header(victim, None, data, raw=json.dumps(
            [{k: v} for k, v in header.items()], separators=(",", ":")).encode())
    elif kind == "missing_shard":
        victim.unlink()
    elif kind == "index_not_json":
        index.write_text('{"metadata": {"total_size": 12}, "weight_map": {"model.embed_tok')
    elif kind == "duplicate_tensor_across_shards":
        from safetensors import safe_open
        from safetensors.torch import save_file

        wmap = weight_map(dst)
        other = next(f for f in sorted(set(wmap.values())) if f != fname)
        with safe_open(str(victim), "pt") as f:
            dup = f.get_tensor(CORRUPTION_TARGET if CORRUPTION_TARGET in header
                               else entries[0][0])
            dup_name = CORRUPTION_TARGET if CORRUPTION_TARGET in header else entries[0][0]
        with safe_open(str(dst / other), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        # a different value under the same name: which copy wins matters
        tensors[dup_name] = (dup.float() * -1).to(dup.dtype)
        save_file(tensors, str(dst / other), metadata=meta)
    return dst
