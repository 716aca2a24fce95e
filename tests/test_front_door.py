"""The front door works as the README says: the install line names our distribution, the two
quickstart commands are the ones CI runs, CI installs from the committed lock, the Python API
survives its second call, and `--help` starts without the engine."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DIST = PYPROJECT["project"]["name"]


def _lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "lock" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not pinned with =="
            pins[canonicalize_name(pkg)] = version
    return pins


def _shell_commands(script: str) -> list[str]:
    """Command lines of a shell script, without comments and blank lines."""
    return [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]


# --- the distribution name and the install lines -------------------------------------------------


def test_distribution_name_is_ours_everywhere_an_install_line_names_it():
    # `streamer` on the package index is an unrelated project ("Stream movies … from torrent").
    assert canonicalize_name(DIST) != "streamer"
    texts = {p: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "examples").iterdir())]}
    texts[ROOT / "space/requirements.txt"] = (ROOT / "space/requirements.txt").read_text()
    named = 0
    for path, text in texts.items():
        for spec in re.findall(r"pip install[^\n]*?[\"']([A-Za-z][A-Za-z0-9_.-]*)\[[^\]]*\][^\"']*[\"']", text):
            named += 1
            assert canonicalize_name(spec) == canonicalize_name(DIST), f"{path.name}: installs {spec!r}"
    assert named >= 3  # the README's install line and both examples


def test_lock_pins_every_dependency_within_the_supported_ranges():
    pins = _lock("engine.txt")
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("test", "app", "xet", "ray"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in .ci/lock/engine.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {req.name}=={pins[name]} not in {req}"
    assert canonicalize_name(DIST) not in pins and "streamer" not in pins  # the project installs --no-deps -e .
    ref = _lock("reference.txt")
    assert ref["llmcompressor"] == "0.14.0.1" and ref["torch"] == pins["torch"]


# --- the two quickstart commands are CI's ----------------------------------------------------------


def _quickstart() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the Quickstart has a bash block"
    return _shell_commands(block.group(1))


def test_readme_quickstart_is_two_commands_and_the_second_is_ci():
    first, second = _quickstart()  # exactly two
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "-c .ci/lock/engine.txt" in first  # the same pinned versions CI tests
    assert first.endswith("python -m streamer demo")
    assert second == "bash .ci/run"


def test_ci_installs_from_the_locks_and_runs_the_tests():
    run = _shell_commands((ROOT / ".ci/run").read_text())
    assert "pip install -q -r .ci/lock/engine.txt" in run
    assert "pip install -q --no-deps -e ." in run  # nothing resolved outside the lock
    assert run[-1] == "python -m pytest -q tests"
    setup_ref = (ROOT / ".ci/setup_reference.sh").read_text()
    assert '-r "$LOCK"' in setup_ref and 'LOCK="$REPO/.ci/lock/reference.txt"' in setup_ref
    refresh = (ROOT / ".ci/lock/refresh.sh").read_text()
    for lock in ("engine.txt", "reference.txt"):
        assert "bash .ci/lock/refresh.sh" in (ROOT / ".ci/lock" / lock).read_text().splitlines()[1]
        assert f".ci/lock/{lock}" in refresh


# --- the Python API ------------------------------------------------------------------------------

_API_SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys, types
    from pathlib import Path
    import streamer

    before = {name: getattr(streamer, name) for name in streamer.__all__}
    for info in pkgutil.walk_packages(streamer.__path__, "streamer."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name, value in before.items():
        now = getattr(streamer, name)
        assert now is value, f"streamer.{name} became {now!r} after importing the submodules"
        assert name == "__version__" or (callable(now) and not isinstance(now, types.ModuleType)), name

    from streamer.cli.demo import write_tiny_llama
    tmp = Path(sys.argv[1])
    src = write_tiny_llama(tmp / "src", hidden=128, intermediate=256, layers=2, vocab=256, heads=4, kv_heads=2)
    for i in range(2):
        r = streamer.quantize(str(src), str(tmp / f"q{i}"), scheme="FP8_DYNAMIC", device="cpu")
        assert Path(r.url).is_dir(), r.url
        r = streamer.convert(str(src), str(tmp / f"c{i}"), scheme="W8A16", device="cpu")
        assert Path(r.url).is_dir(), r.url
        streamer.model_free_ptq(str(src), str(tmp / f"m{i}"), scheme="FP8_DYNAMIC", ignore=["lm_head"])
        assert (tmp / f"m{i}" / "config.json").is_file()
    card = (tmp / "q0" / "README.md").read_text()
    print(next(line for line in card.splitlines() if line.startswith("pip install")))
    print("ok")
    """
)


def test_public_names_survive_submodule_imports_and_run_twice(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _API_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    # the model card's reproduce line installs our distribution, at the version that wrote it
    import streamer

    pip_line = proc.stdout.strip().splitlines()[-2]
    assert pip_line == f"pip install '{DIST}[xet]=={streamer.__version__}'", pip_line


# --- help starts fast: no engine imported ---------------------------------------------------------


def test_help_does_not_import_the_engine():
    script = textwrap.dedent(
        """
        import sys
        from streamer.cli.main import main
        for argv in (["--help"], ["mirror", "--help"], ["demo", "--help"]):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0, (argv, e.code)
        heavy = [m for m in ("torch", "compressed_tensors", "transformers") if m in sys.modules]
        print("heavy:", heavy)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("heavy: []"), proc.stdout[-2000:]


def test_ctrl_c_while_starting_is_one_sentence(tmp_path):
    """Ctrl-C during the seconds the engine's imports take prints a sentence, not a traceback
    from inside torch, numpy or transformers (whose lazy imports re-raise it as other errors)."""
    import signal
    import time

    from streamer.cli.demo import write_tiny_llama

    src = write_tiny_llama(tmp_path / "src", hidden=128, intermediate=256, layers=2, vocab=256, heads=4, kv_heads=2)
    # the console script's and `python -m streamer`'s entry: main() reading sys.argv
    entry = "import sys; from streamer.cli.main import main; print('ready', flush=True); sys.exit(main())"
    interrupted = 0
    for i, delay in enumerate((0.05, 0.2, 0.5, 1.0, 2.0)):
        out = tmp_path / f"out{i}"
        proc = subprocess.Popen([sys.executable, "-c", entry, str(src), str(out), "--scheme", "FP8_DYNAMIC",
                                 "--device", "cpu", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
        if proc.returncode == 0:  # it finished first
            continue
        assert proc.returncode == 130 and err.strip() == "interrupted: nothing was published", err
        assert not out.exists()
        interrupted += 1
    assert interrupted, "every run finished before Ctrl-C: nothing was tested"


def test_json_is_alone_on_stdout_and_plan_warnings_reach_a_real_run(tmp_path):
    import json

    from streamer.cli.demo import write_tiny_llama

    src = write_tiny_llama(tmp_path / "src", hidden=128, intermediate=256, layers=2, vocab=256, heads=4, kv_heads=2)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "streamer", str(src), *args, "--scheme", "FP8_DYNAMIC",
                               "--device", "cpu", "--ignore", "lm-head", "--json"],
                              capture_output=True, text=True, timeout=300)

    plan = cli("--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["dry_run"] is True  # the plan's text stays off stdout
    run = cli(str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    typo = [w for w in summary["warnings"] if "'lm-head'" in w]
    assert typo and "lm_head" in typo[0]  # the closest module name is suggested
    assert run.stderr.count(typo[0]) == 1, run.stderr  # said once in the run, not only in --dry-run


def test_api_refuses_a_zero_memory_budget_instead_of_the_default(tmp_path):
    import pytest

    import streamer
    from streamer.cli.demo import write_tiny_llama
    from streamer.errors import StreamerError

    src = write_tiny_llama(tmp_path / "src", hidden=128, intermediate=256, layers=2, vocab=256, heads=4, kv_heads=2)
    with pytest.raises(StreamerError, match="at least 1"):
        streamer.convert(str(src), str(tmp_path / "out"), scheme="FP8_DYNAMIC", max_memory=0, device="cpu")
    assert not (tmp_path / "out").exists()
