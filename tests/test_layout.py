"""The house: one-way imports, no cycles, errors that carry hints, documented public functions."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from streamer.cli.wording import cli_words, describe
from streamer.errors import SETTINGS, Cancelled, Hint, PlanError, StreamerError, api_words

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_import_graph_has_no_cycles_and_runs_one_way():
    tool = _tool()
    edges, problems = tool.graph()
    assert tool.cycles(edges) == []
    assert problems == []
    # the layers are populated as the README's Layout says
    layers = {tool.layer(m) for m in edges if m.startswith("streamer.")}
    assert {0, 1, 2, 3, 4} <= layers


def test_import_graph_tool_finds_a_cycle_and_an_upward_import(tmp_path):
    tool = _tool()
    pkg = tmp_path / "streamer"
    for sub in ("io", "engine"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "a.py").write_text("from streamer.engine.b import thing\n")
    (pkg / "engine" / "b.py").write_text("def thing():\n    from streamer.io.a import _secret\n")
    edges, problems = tool.graph(tmp_path)
    assert tool.cycles(edges) == [["streamer.engine.b", "streamer.io.a"]]
    assert any("imports streamer.engine.b from above" in p for p in problems)
    assert any("borrows the private name _secret" in p for p in problems)


def _raised_messages(path: Path):
    """(line, text) of every string literal inside a `raise X(...)` in PATH."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for arg in [*node.exc.args, *(k.value for k in node.exc.keywords if k.arg != "hints")]:
                for sub in ast.walk(arg):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        yield node.lineno, sub.value


ENGINE_LAYERS = ("io", "quant", "engine")


def test_engine_errors_name_no_command_line_flag():
    """The engine's messages are in no front end's words: the fix is a Hint each front end words."""
    offenders = []
    for layer in ENGINE_LAYERS:
        for path in sorted((ROOT / "streamer" / layer).rglob("*.py")):
            for line, text in _raised_messages(path):
                if "--" in text and any(ch.isalpha() for ch in text.split("--", 1)[1][:1]):
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert offenders == []


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_every_hint_setting_has_words_in_the_cli_and_the_api(setting):
    for hint in (Hint(setting), Hint(setting, "x"), Hint(setting, ("a", "b"))):
        cli, api = cli_words(hint), api_words(hint)
        assert cli and api
        assert "--" not in api  # the Python API names parameters, not flags


def test_hints_are_worded_by_each_front_end():
    e = StreamerError("the weight of model.x cannot be quantized", hints=(Hint("ignore", "model.x"), Hint("skip_incompatible")))
    assert describe(e) == (
        "the weight of model.x cannot be quantized: --ignore model.x or pass --skip-incompatible to keep them unquantized"
    )
    assert str(e) == "the weight of model.x cannot be quantized: add 'model.x' to ignore=[…] or pass skip_incompatible=True"
    assert e.message == "the weight of model.x cannot be quantized"
    plan = PlanError(["a: too small"], hints=(Hint("max_memory", "2GB"),))
    assert describe(plan).endswith(": pass --max-memory 2GB or more") and plan.problems == ["a: too small"]
    with pytest.raises(ValueError, match="unknown hint setting"):
        Hint("no-such-setting")


def test_a_suggested_ignore_pattern_pastes_back_as_itself():
    """A `re:` entry holds backslashes: the command line's hint quotes it for the shell, the
    mirror's as a TOML string, so that pasting either gives back the very pattern."""
    import shlex
    import tomllib

    from streamer.mirror.wording import job_words

    pattern = r"re:model\.layers\.\d+\.mlp\.gate_proj$"
    hint = Hint("ignore", (pattern, "lm_head"))
    assert shlex.split(cli_words(hint)) == ["--ignore", pattern, "--ignore", "lm_head"]
    entries = job_words(hint).removeprefix("add ").split(" to ignore = ")[0]
    assert tomllib.loads(f"ignore = [{entries}]")["ignore"] == [pattern, "lm_head"]
    quoted = job_words(Hint("ignore", "it's")).removeprefix("add ").split(" to ignore = ")[0]
    assert tomllib.loads(f"ignore = [{quoted}]")["ignore"] == ["it's"]


def test_cancelled_is_its_own_error():
    e = Cancelled()
    assert isinstance(e, StreamerError) and not isinstance(e, KeyboardInterrupt)
    assert e.exit_code == 130 and str(e) == "cancelled"


def _public_without_docstring(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    missing = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return missing


def test_every_public_function_and_class_is_documented():
    missing = []
    for path in sorted((ROOT / "streamer").rglob("*.py")):
        if "localhub" in path.parts:
            continue
        missing += _public_without_docstring(path)
    assert missing == []
