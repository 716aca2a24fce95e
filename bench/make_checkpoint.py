"""Write a Llama-shaped bf16 checkpoint of about N GB, fast, without building a transformers model.

Real Llama tensor names and shapes, random normal values (std 0.02), sharded like the Hub
(`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`), a real `config.json`
(transformers' LlamaConfig when installed, else the same keys by hand). The number of layers is
chosen to reach the size.

    python bench/make_checkpoint.py DST --gb 1.0                 # hidden 2048 (Llama-3.2-1B layers), vocab 32000
    python bench/make_checkpoint.py DST --gb 9                   # hidden 4096 (Llama-3.1-8B), 16 layers, 4 shards
    python bench/make_checkpoint.py DST --gb 4 --shards 4 --hidden 2048 --vocab 32000

Defaults: hidden 4096 (intermediate 14336, 32 q / 8 kv heads, head_dim 128, vocab 128256) when
--gb >= 6, else hidden 2048 (intermediate 8192, 32 q / 8 kv heads, head_dim 64) with vocab 32000;
4 shards, at most 5 GB each. Writing an existing DST is refused unless --force.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

GB = 1_000_000_000
BF16 = 2

# hidden -> (intermediate, q heads, kv heads, head_dim): shapes of real Llama models
SHAPES = {
    2048: (8192, 32, 8, 64),  # Llama-3.2-1B
    3072: (8192, 24, 8, 128),  # Llama-3.2-3B
    4096: (14336, 32, 8, 128),  # Llama-3.1-8B
    8192: (28672, 64, 8, 128),  # Llama-3.1-70B
}


def layer_tensors(i: int, h: int, inter: int, nq: int, nkv: int, hd: int) -> list[tuple[str, tuple]]:
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (h,)),
        (p + "self_attn.q_proj.weight", (nq * hd, h)),
        (p + "self_attn.k_proj.weight", (nkv * hd, h)),
        (p + "self_attn.v_proj.weight", (nkv * hd, h)),
        (p + "self_attn.o_proj.weight", (h, nq * hd)),
        (p + "post_attention_layernorm.weight", (h,)),
        (p + "mlp.gate_proj.weight", (inter, h)),
        (p + "mlp.up_proj.weight", (inter, h)),
        (p + "mlp.down_proj.weight", (h, inter)),
    ]


POOL = (1 << 25) + 15  # bf16 normals (64 MB); odd length so that tiles do not line up with rows


def fill(shape: tuple, pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A bf16 tensor of SHAPE tiled from POOL starting at a random offset."""
    n = numel(shape)
    out = torch.empty(n, dtype=torch.bfloat16)
    pos = int(torch.randint(len(pool), (1,), generator=gen))
    done = 0
    while done < n:
        k = min(n - done, len(pool) - pos)
        out[done : done + k] = pool[pos : pos + k]
        done += k
        pos = 0
    return out.view(shape)


def numel(shape: tuple) -> int:
    return math.prod(shape)


def plan_tensors(gb: float, h: int, inter: int, nq: int, nkv: int, hd: int, vocab: int, tie: bool,
                 layers: int | None) -> tuple[int, list[tuple[str, tuple]]]:
    per_layer = sum(numel(s) for _, s in layer_tensors(0, h, inter, nq, nkv, hd)) * BF16
    fixed = (vocab * h * (1 if tie else 2) + h) * BF16
    if layers is None:
        layers = round((gb * GB - fixed) / per_layer)
        if layers < 1:
            raise SystemExit(
                f"--gb {gb} is too small for hidden {h} and vocab {vocab} "
                f"(embeddings alone are {fixed / GB:.2f} GB): pass a smaller --hidden or --vocab"
            )
    names = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        names += layer_tensors(i, h, inter, nq, nkv, hd)
    names.append(("model.norm.weight", (h,)))
    if not tie:
        names.append(("lm_head.weight", (vocab, h)))
    return layers, names


def config_dict(h, inter, nq, nkv, hd, vocab, layers, tie) -> dict:
    kw = dict(
        vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=nq, num_key_value_heads=nkv, head_dim=hd, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tie, bos_token_id=min(128000, vocab - 2),
        eos_token_id=min(128001, vocab - 1), hidden_act="silu", torch_dtype="bfloat16",
    )
    try:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**kw)
        cfg.architectures = ["LlamaForCausalLM"]
        return json.loads(cfg.to_json_string(use_diff=False))
    except Exception:  # transformers missing or changed: the same keys by hand
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **kw}


def _units(names: list[tuple[str, tuple]], whole_layers: bool) -> list[list[tuple[str, tuple]]]:
    if not whole_layers:
        return [[t] for t in names]
    units: list[list] = []
    key = None
    for name, shape in names:
        k = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        if units and k == key:
            units[-1].append((name, shape))
        else:
            units.append([(name, shape)])
        key = k
    return units


def shard_groups(names: list[tuple[str, tuple]], shards: int, max_shard: int,
                 whole_layers: bool = True) -> list[list[tuple[str, tuple]]]:
    """Split the tensor list in order into about SHARDS groups of similar size (each <= MAX_SHARD).

    With WHOLE_LAYERS a layer never straddles two shards: llm-compressor 0.14's model_free_ptq
    crashes on NVFP4 when q/k/v or gate/up of one layer sit in different shards.
    """
    total = sum(numel(s) for _, s in names) * BF16
    target = min(max_shard, math.ceil(total / max(shards, 1)))
    groups: list[list] = [[]]
    size = cum = 0
    for unit in _units(names, whole_layers):
        n = sum(numel(s) for _, s in unit) * BF16
        # a new shard when this unit's middle would cross the next multiple of the target size
        if groups[-1] and (cum + n / 2 > len(groups) * target or size + n > max_shard):
            groups.append([])
            size = 0
        groups[-1].extend(unit)
        size += n
        cum += n
    return groups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--gb", type=float, default=1.0, help="approximate size in GB (10^9 bytes)")
    ap.add_argument("--hidden", type=int, help="hidden size (default 4096 for --gb >= 6, else 2048)")
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--heads", type=int, help="query heads")
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--vocab", type=int, help="default 128256 for hidden >= 4096, else 32000")
    ap.add_argument("--layers", type=int, help="exact number of layers (overrides --gb)")
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the embeddings (no lm_head tensor)")
    ap.add_argument("--shards", type=int, default=4, help="number of shards to aim for (default 4)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="largest shard, GB (default 5, as the Hub)")
    ap.add_argument("--split-layers", action="store_true",
                    help="let a shard boundary fall inside a layer (as save_pretrained may); "
                         "llm-compressor 0.14 cannot quantize such a checkpoint to NVFP4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = ap.parse_args(argv)

    h = args.hidden or (4096 if args.gb >= 6 else 2048)
    d_inter, d_nq, d_nkv, d_hd = SHAPES.get(h, (int(h * 3.5) // 256 * 256, max(h // 128, 1), max(h // 512, 1), 128))
    inter = args.intermediate or d_inter
    nq = args.heads or d_nq
    nkv = args.kv_heads or d_nkv
    hd = args.head_dim or d_hd
    vocab = args.vocab or (128256 if h >= 4096 else 32000)
    layers, names = plan_tensors(args.gb, h, inter, nq, nkv, hd, vocab, args.tie, args.layers)
    groups = shard_groups(names, args.shards, int(args.max_shard_gb * GB), not args.split_layers)

    dst: Path = args.dst
    if dst.exists():
        if not args.force and any(dst.iterdir()):
            raise SystemExit(f"{dst} exists and is not empty (pass --force to replace it)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True)

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(args.seed)
    # torch.randn runs at ~50 MB/s on a small CPU; a pool of normals copied from random offsets
    # gives every tensor different bytes (same distribution) at memcpy speed.
    pool = (torch.randn(POOL, generator=gen) * 0.02).to(torch.bfloat16)
    t0 = time.perf_counter()
    weight_map: dict[str, str] = {}
    total = 0
    n = len(groups)
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                t = (1.0 + 0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
            else:
                t = fill(shape, pool, gen)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * BF16
        save_file(tensors, str(dst / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname} ({sum(numel(s) for _, s in group) * BF16 / GB:.2f} GB)", file=sys.stderr, flush=True)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = config_dict(h, inter, nq, nkv, hd, vocab, layers, args.tie)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen_cfg = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}
    (dst / "generation_config.json").write_text(json.dumps(gen_cfg) + "\n")
    dt = time.perf_counter() - t0
    print(
        f"{dst}: {total / GB:.3f} GB in {n} shard(s), {layers} layers, hidden {h}, intermediate {inter}, "
        f"heads {nq}/{nkv}x{hd}, vocab {vocab}{', tied' if args.tie else ''}  ({dt:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
