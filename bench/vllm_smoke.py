"""Serve each scheme's default output with vLLM and generate a few tokens.

    python bench/vllm_smoke.py                                  # every arch x scheme below
    python bench/vllm_smoke.py --schemes FP8_DYNAMIC,NVFP4A16 --archs llama
    python bench/vllm_smoke.py --src ./My-Model --schemes W4A16 # a checkpoint of your own

For each architecture, a small random model is built with transformers (sizes vLLM's kernels
accept: hidden 512, intermediate 1024) and converted by streamer with its defaults only, no
ignore list: what a new user gets. Each output is loaded by `vllm.LLM` in a subprocess of its
own (a crash or an out-of-memory cannot take the others down, and the GPU is freed between
runs), which generates 8 tokens greedily from fixed token ids (no tokenizer needed). The table
shows whether vLLM served it, and how many of the 8 tokens match the unquantized model's
(random weights: informative only).

Without a CUDA GPU or without vLLM installed, it says so and exits 0. With both, the exit code
is 1 when any output fails to load or generate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = ("FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W4A16", "W8A16", "NVFP4A16", "MXFP4A16")
ARCHS = ("llama", "qwen2_tied", "qwen3_moe")
PROMPT = [1, 17, 242, 999, 5, 77, 640, 3, 128, 511]
MAX_TOKENS = 8

# Run in a fresh interpreter per model: prints one JSON line with the generated token ids.
_SERVE = r"""
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.25,
          max_model_len=256, seed=0)
out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}],
                   SamplingParams(max_tokens=int(sys.argv[3]), temperature=0.0, detokenize=False))
print("TOKENS " + json.dumps(list(out[0].outputs[0].token_ids)), flush=True)
"""


def why_not_here() -> str | None:
    """Why this machine cannot run the smoke test, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU here (vLLM serves quantized checkpoints on GPUs)"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (pip install vllm)"
    return None


def build(arch: str, dst: Path) -> Path:
    """A small random model of ARCH, saved with save_pretrained (config.json, safetensors)."""
    import torch
    import transformers as tf

    common = dict(vocab_size=2048, max_position_embeddings=512, initializer_range=0.05, hidden_size=512,
                  intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if arch == "llama":
        config = tf.LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "qwen2_tied":
        config = tf.Qwen2Config(**{k: v for k, v in common.items() if k != "head_dim"}, tie_word_embeddings=True)
    elif arch == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                                   tie_word_embeddings=False)  # fmt: skip
    else:
        raise SystemExit(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dst)
    return dst


def serve(folder: Path, timeout: float) -> tuple[list[int] | None, str]:
    """(generated token ids, "") or (None, the error's last lines)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SERVE, str(folder), json.dumps(PROMPT), str(MAX_TOKENS)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in proc.stdout.splitlines():
        if line.startswith("TOKENS "):
            return json.loads(line[len("TOKENS ") :]), ""
    tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-3:]
    return None, " | ".join(tail)[-400:] or f"exit code {proc.returncode}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated presets")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    p.add_argument("--src", help="convert this checkpoint (folder or Hub id) instead of building models")
    p.add_argument("--work", default=os.environ.get("STREAMER_BENCH_DIR", tempfile.gettempdir()),
                   help="where the models and outputs go (a streamer-vllm-smoke folder, deleted at the end)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per vLLM run")
    args = p.parse_args(argv)

    reason = why_not_here()
    if reason:
        print(f"vllm_smoke: skipped: {reason}")
        return 0

    from streamer.engine.convert import convert

    schemes = [s.strip().upper() for s in args.schemes.split(",") if s.strip()]
    root = Path(args.work) / "streamer-vllm-smoke"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sources = {"src": args.src} if args.src else {a: str(build(a, root / a)) for a in args.archs.split(",") if a}
    rows, failed = [], 0
    try:
        for arch, src in sources.items():
            base, why = serve(Path(src), args.timeout) if not args.src else (None, "")
            if base is None and not args.src:
                rows.append([arch, "(unquantized)", "FAILED", "-", why])
            for scheme in schemes:
                out = root / f"{arch}-{scheme}"
                t0 = time.monotonic()
                try:
                    convert(src, str(out), scheme=scheme, device="cuda")  # the defaults, no ignore list
                except Exception as e:  # a scheme that cannot take this model: say why, go on
                    rows.append([arch, scheme, "not converted", "-", f"{type(e).__name__}: {str(e)[:200]}"])
                    continue
                tokens, why = serve(out, args.timeout)
                secs = f"{time.monotonic() - t0:.0f}s"
                if tokens is None:
                    failed += 1
                    rows.append([arch, scheme, "FAILED", "-", why])
                else:
                    same = f"{sum(a == b for a, b in zip(tokens, base))}/{MAX_TOKENS}" if base else "-"
                    rows.append([arch, scheme, f"served ({secs})", same, str(tokens)])
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = ["arch", "scheme", "vLLM", "tokens as unquantized", "generated / error"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[4]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
