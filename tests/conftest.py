"""Shared pytest fixtures: tiny real-architecture checkpoints (built once per session) and the
llm-compressor reference.

Checkpoint fixtures (session-scoped, READ-ONLY: copy before modifying):
  llama_ckpt        LlamaForCausalLM, 6 shards, q|k,v and gate|up straddle shards
  moe_ckpt          Qwen3MoeForCausalLM, per-expert gate/up straddle shards
  mixtral_ckpt      MixtralForCausalLM (block_sparse_moe.experts.N.w1/w2/w3), w1|w3 straddle
  deepseek_ckpt     DeepseekV3ForCausalLM (MLA, layer 0 dense, layer 1 MoE + shared expert)
  tied_ckpt         Qwen3ForCausalLM with tie_word_embeddings (no lm_head.weight in the files)
  odd_ckpt          Llama with hidden 160 / intermediate 416 / vocab 1000 (not multiples of 128)
  single_file_ckpt  the llama model as a single model.safetensors, no index
  checkpoint        factory: checkpoint(arch, **build_checkpoint_kwargs) -> Path, cached

Reference:
  reference         fixture: the reference venv's python (fails under $CI when absent, else skips)
  @pytest.mark.reference   same check for a whole test
  reference_runs    fixture: cached runner, reference_runs(src, scheme, ignore=()) -> output Path
                    (raises ReferenceFailed); reference_runs.many([(src, scheme, ignore), ...])
                    runs the uncached ones in one subprocess and returns ReferenceResults.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from fixtures import build_checkpoint  # noqa: E402
from reference import (  # noqa: E402
    ReferenceFailed,
    ReferenceResult,
    require_reference,
    run_reference_many,
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "reference: needs the llm-compressor reference venv (.ci/setup_reference.sh); "
        "fails under $CI when it is missing, skips locally")


def pytest_runtest_setup(item):
    if item.get_closest_marker("reference") is not None:
        require_reference()


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkpoints_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


class _CheckpointFactory:
    def __init__(self, root: Path):
        self.root = root
        self.cache: dict = {}

    def __call__(self, arch: str, **kwargs) -> Path:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in self.cache:
            name = arch + ("" if not kwargs else f"-{len(self.cache)}")
            self.cache[key] = build_checkpoint(arch, self.root / name, **kwargs)
        return self.cache[key]


@pytest.fixture(scope="session")
def checkpoint(checkpoints_dir) -> _CheckpointFactory:
    """checkpoint(arch, **kwargs) -> Path; built once per session per distinct arguments."""
    return _CheckpointFactory(checkpoints_dir)


@pytest.fixture(scope="session")
def llama_ckpt(checkpoint) -> Path:
    return checkpoint("llama")


@pytest.fixture(scope="session")
def moe_ckpt(checkpoint) -> Path:
    return checkpoint("qwen3_moe")


@pytest.fixture(scope="session")
def mixtral_ckpt(checkpoint) -> Path:
    return checkpoint("mixtral")


@pytest.fixture(scope="session")
def deepseek_ckpt(checkpoint) -> Path:
    return checkpoint("deepseek_v3")


@pytest.fixture(scope="session")
def tied_ckpt(checkpoint) -> Path:
    return checkpoint("tied")


@pytest.fixture(scope="session")
def odd_ckpt(checkpoint) -> Path:
    return checkpoint("odd")


@pytest.fixture(scope="session")
def single_file_ckpt(checkpoint) -> Path:
    return checkpoint("llama", single_file=True)


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------


@pytest.fixture
def reference() -> Path:
    """The reference venv's python (pytest.fail under $CI when missing, skip locally)."""
    return require_reference()


class _ReferenceRuns:
    """Cached reference runs for the session; outputs are READ-ONLY."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict = {}

    @staticmethod
    def _key(src, scheme, ignore):
        return (str(Path(src).resolve()), scheme, tuple(ignore))

    def many(self, specs) -> list[ReferenceResult]:
        """specs: iterable of (src, scheme) or (src, scheme, ignore).  Runs the uncached ones in
        one subprocess; returns one ReferenceResult per spec (failures included, not raised)."""
        require_reference()
        specs = [(s[0], s[1], tuple(s[2]) if len(s) > 2 else ()) for s in specs]
        todo, jobs = [], []
        for src, scheme, ignore in specs:
            key = self._key(src, scheme, ignore)
            if key not in self.results and key not in todo:
                todo.append(key)
                dst = self.root / f"ref{len(self.results) + len(todo)}-{Path(src).name}-{scheme}"
                jobs.append({"src": src, "dst": dst, "scheme": scheme, "ignore": list(ignore)})
        if jobs:
            for key, res in zip(todo, run_reference_many(jobs)):
                self.results[key] = res
        return [self.results[self._key(*s)] for s in specs]

    def __call__(self, src, scheme: str, ignore=()) -> Path:
        (res,) = self.many([(src, scheme, tuple(ignore))])
        if not res.ok:
            raise ReferenceFailed(f"model_free_ptq({scheme}, ignore={list(ignore)}) on {src} "
                                  f"failed: {res.error}\n{res.traceback[-4000:]}",
                                  stderr=res.traceback)
        return res.dst


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory) -> _ReferenceRuns:
    return _ReferenceRuns(tmp_path_factory.mktemp("reference"))
