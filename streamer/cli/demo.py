"""`python -m streamer demo`: the whole Hub→Hub job offline, against a localhub on loopback.

Starts localhub in a temp folder, seeds a tiny random Llama-shaped model (no download: the
tensors are generated here), converts it Hub→Hub, and prints the new repo's files, its model
card, and how many bytes crossed the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

DEMO_TOKEN = "hf_demo_local_only_token"


def write_tiny_llama(dst: Path, *, hidden=512, intermediate=1408, layers=4, vocab=4096, heads=8, kv_heads=4, seed=0) -> Path:
    """A random Llama checkpoint (real tensor names and config) in DST, in three shards with an
    index; returns DST.

    :param dst: the folder to write (created).
    :param hidden, intermediate, layers, vocab, heads, kv_heads: the model's shape.
    :param seed: the random weights' seed."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(intermediate, hidden),
            p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        })  # fmt: skip
    tensors["lm_head.weight"] = w(vocab, hidden)

    dst.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    n_shards = 3
    per = -(-len(names) // n_shards)
    weight_map, total = {}, 0
    for k in range(n_shards):
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per : (k + 1) * per]}
        save_file(part, dst / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16",
    }  # fmt: skip
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return dst


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code.

    :param argv: the arguments after `demo` (default: the process's)."""
    p = argparse.ArgumentParser(prog="python -m streamer demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", default="NVFP4A16")
    p.add_argument("--root", help="keep localhub's data in this folder (default: a temp folder)")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)

    from streamer.localhub import LocalHub

    with tempfile.TemporaryDirectory(prefix="streamer-demo-") as tmp:
        root = Path(args.root or tmp)
        with LocalHub(root / "hub", port=args.port) as hub:
            hub.add_user("demo", DEMO_TOKEN, orgs=["demo-org"])
            source, target = "demo-org/tiny-llama", f"demo/tiny-llama-{args.scheme}"
            hub.seed_repo(source, write_tiny_llama(root / "seed"), message="Add tiny random Llama")
            print(f"localhub on {hub.url}: seeded {source} ({sum(hub.files(source).values()) / 1e6:.1f} MB)")

            # Point huggingface_hub at localhub before the engine imports it.
            os.environ.update(HF_ENDPOINT=hub.url, HF_TOKEN=DEMO_TOKEN)
            import huggingface_hub.constants as hf

            hf.ENDPOINT = hub.url
            hf.HUGGINGFACE_CO_URL_TEMPLATE = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
            from streamer.cli.terminal import setup_logging
            from streamer.engine.convert import convert

            setup_logging(quiet=False, verbose=False)
            hub.clear_log()
            print(f"$ python -m streamer {source} {target} --scheme {args.scheme}")
            result = convert(source, target, scheme=args.scheme, device="auto")

            log = hub.request_log
            ranged = [r for r in log if r.method == "GET" and (r.file or "").endswith(".safetensors")]
            print(f"\n{target} ({result.url}):")
            for name, size in hub.files(target).items():
                print(f"  {size:>10,d}  {name}")
            print(
                f"\nread {sum(r.bytes_out for r in ranged):,d} bytes of safetensors in {len(ranged)} range "
                f"requests (all ranged: {all(r.range is not None for r in ranged)})"
            )
            # Creating a repo on the Hub makes its first commit (.gitattributes); streamer's whole
            # conversion is the one commit after it.
            print(f"commits on {target}, oldest first:")
            for c in reversed(hub.commits(target)):
                files = ", ".join(c.added) if len(c.added) <= 3 else f"{len(c.added)} files"
                print(f"  {c.sha[:8]}  {c.message}: adds {files}")
            print("\n--- README.md ---")
            print(hub.read_file(target, "README.md").decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
