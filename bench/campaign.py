"""Fault, crash and malformed-input campaign: attack streamer the way a flaky network, a killed
process and a hostile checkpoint would, and count what happens.

    python bench/campaign.py                # everything (a few minutes on 2 cores)
    python bench/campaign.py --quick        # fewer cases of each kind
    python bench/campaign.py --only faults  # faults | crashes | malformed

Every case runs the real CLI (`python -m streamer`) in a child process against
`streamer.localhub`, and is classified as:

  survived identical  exit 0, and every output file equals a fault-free run's
  refused cleanly     non-zero exit, one `error:` sentence, no traceback, and nothing half-written
                      (no local folder, no commit on the target branch)
  defect              anything else (printed with its details)

It asserts nothing; it prints the counts per kind and the defects. The same cases, fewer of
them, are in the test suite (tests/test_faults.py, tests/test_malformed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the malformed corpus lives with the tests

from fixtures import build_checkpoint  # noqa: E402
from streamer.localhub import LocalHub  # noqa: E402

TOKEN = "hf_campaign_alice_0123456789"
SOURCE = "acme/src"
SCHEME = "FP8_DYNAMIC"
OUTPUTS = (".safetensors", ".json")  # the card names its target, so it is compared apart

SURVIVED, REFUSED, DEFECT = "survived identical", "refused cleanly", "defect"


@dataclass
class Case:
    kind: str  # faults | crashes | malformed
    name: str
    outcome: str = ""
    detail: str = ""


@dataclass
class Campaign:
    work: Path
    hub: LocalHub
    cases: list[Case] = field(default_factory=list)
    baseline: dict[str, bytes] = field(default_factory=dict)  # the fault-free Hub→Hub output
    local_baseline: dict[str, bytes] = field(default_factory=dict)  # and local→local

    # --- running the CLI ---------------------------------------------------------------------

    def env(self) -> dict:
        return {**os.environ, "HF_ENDPOINT": self.hub.url, "HF_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
                "HF_HOME": str(self.work / "hf_home")}

    def cli(self, src: str, dst: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "streamer", src, dst, "--scheme", SCHEME, "--device", "cpu", "-q", *extra]
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def popen(self, src: str, dst: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "streamer", src, dst, "--scheme", SCHEME, "--device", "cpu", "-q"]
        return subprocess.Popen(cmd, env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # --- what a target holds ----------------------------------------------------------------

    def hub_outputs(self, repo: str) -> dict[str, bytes]:
        if not self.hub.repo_exists(repo):
            return {}
        return {f: self.hub.read_file(repo, f) for f in self.hub.files(repo) if f.endswith(OUTPUTS)}

    @staticmethod
    def local_outputs(folder: Path) -> dict[str, bytes]:
        if not folder.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith(OUTPUTS)}

    def streamer_commits(self, repo: str) -> int:
        if not self.hub.repo_exists(repo):
            return 0
        return sum("(streamer)" in c.message for c in self.hub.commits(repo))

    def record(self, case: Case) -> None:
        self.cases.append(case)
        mark = {SURVIVED: "ok ", REFUSED: "ref", DEFECT: "BAD"}[case.outcome]
        print(f"  [{mark}] {case.kind:9s} {case.name}" + (f": {case.detail}" if case.detail else ""), flush=True)


def clean_refusal(proc: subprocess.CompletedProcess) -> str | None:
    """Why PROC is not a clean refusal, or None when it is one."""
    err = proc.stderr.strip()
    if proc.returncode == 0:
        return "exit 0"
    if "Traceback" in err:
        return "traceback: " + err.splitlines()[-1][:200]
    errors = [ln for ln in err.splitlines() if ln.startswith(("error: ", "python -m streamer: error: "))]
    if len(errors) != 1:
        return f"{len(errors)} error lines: {err[-300:]!r}"
    return None


# --- faults -------------------------------------------------------------------------------------

FAULT_KINDS = (("drop",), ("500",), ("503",), ("429",), ("slow",), ("drop", "500", "429", "slow"))


def faults(c: Campaign, quick: bool) -> None:
    """Hub→Hub under injected faults on downloads only, then on every kind of request."""
    everies = (3, 10) if quick else (2, 3, 5, 10)
    n = 0
    for paths in ("resolve", ""):
        for kinds in FAULT_KINDS:
            for every in everies:
                n += 1
                target = f"alice/fault{n}"
                name = f"every {every} {'+'.join(kinds)} on {'downloads' if paths else 'every request'}"
                c.hub.set_faults(every=every, kinds=kinds, retry_after=1, slow_seconds=0.2, only_paths=paths or None)
                try:
                    proc = c.cli(SOURCE, target)
                finally:
                    c.hub.set_faults(None)
                case = Case("faults", name)
                out = c.hub_outputs(target)
                if proc.returncode == 0 and out == c.baseline and c.streamer_commits(target) == 1:
                    case.outcome = SURVIVED
                elif proc.returncode != 0 and clean_refusal(proc) is None and c.streamer_commits(target) == 0:
                    case.outcome, case.detail = REFUSED, proc.stderr.strip().splitlines()[-1][:160]
                else:
                    case.outcome = DEFECT
                    case.detail = (f"rc {proc.returncode}, identical {out == c.baseline}, "
                                   f"commits {c.streamer_commits(target)}: {proc.stderr.strip()[-300:]!r}")
                c.record(case)


# --- crashes ------------------------------------------------------------------------------------


def _kill_at(proc: subprocess.Popen, delay: float, sig: int) -> bool:
    """Send SIG after DELAY seconds unless the run ended first; True when it was sent."""
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        proc.wait(timeout=120)
        return True


def crashes(c: Campaign, quick: bool, rng: random.Random) -> None:
    """SIGKILL / SIGINT at random points, then the same command again: the target is never
    partial, and the rerun gives the fault-free output with exactly one conversion commit."""
    runs = 3 if quick else 8
    c.hub.set_throttle(down_bytes_per_s=4_000_000, up_bytes_per_s=2_000_000)  # stretch the run
    try:
        for i in range(runs):
            for sig in (signal.SIGKILL, signal.SIGINT):
                sname = signal.Signals(sig).name
                delay = rng.uniform(0.5, 6.0)
                # Hub → Hub
                target = f"alice/crash{i}-{sname.lower()}"
                proc = c.popen(SOURCE, target)
                sent = _kill_at(proc, delay, sig)
                stderr = proc.stderr.read() if proc.stderr else ""
                partial = c.streamer_commits(target) not in (0, 1) or (
                    c.streamer_commits(target) == 1 and c.hub_outputs(target) != c.baseline)
                again = c.cli(SOURCE, target)
                case = Case("crashes", f"Hub->Hub {sname} at {delay:.1f}s" + ("" if sent else " (finished first)"))
                problems = []
                if partial:
                    problems.append("target partial after the kill")
                if sig == signal.SIGINT and sent and "Traceback" in stderr:
                    problems.append("traceback on Ctrl-C: " + stderr.strip().splitlines()[-1][:160])
                if again.returncode != 0 or c.hub_outputs(target) != c.baseline:
                    problems.append(f"rerun rc {again.returncode}: {again.stderr.strip()[-200:]!r}")
                if c.streamer_commits(target) != 1:
                    problems.append(f"{c.streamer_commits(target)} conversion commits after the rerun")
                case.outcome, case.detail = (DEFECT, "; ".join(problems)) if problems else (SURVIVED, "")
                c.record(case)

                # local → local (the source is read from disk, so only the kill point varies)
                dst = c.work / f"crash-local{i}-{sname.lower()}"
                proc = subprocess.Popen(
                    [sys.executable, "-m", "streamer", str(c.work / "src"), str(dst), "--scheme", SCHEME,
                     "--device", "cpu", "-q"], env=c.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    text=True)
                sent = _kill_at(proc, rng.uniform(0.3, 3.0), sig)
                local_before = c.local_outputs(dst)
                again = subprocess.run(
                    [sys.executable, "-m", "streamer", str(c.work / "src"), str(dst), "--scheme", SCHEME,
                     "--device", "cpu", "-q"], env=c.env(), capture_output=True, text=True, timeout=300)
                staging = [p.name for p in c.work.iterdir() if p.name.startswith(f".{dst.name}.streamer")]
                case = Case("crashes", f"local->local {sname}" + ("" if sent else " (finished first)"))
                problems = []
                if local_before and local_before != c.local_baseline:
                    problems.append("destination partial after the kill")
                if again.returncode != 0 or c.local_outputs(dst) != c.local_baseline:
                    problems.append(f"rerun rc {again.returncode}: {again.stderr.strip()[-200:]!r}")
                if staging:
                    problems.append(f"staging folders left: {staging}")
                case.outcome, case.detail = (DEFECT, "; ".join(problems)) if problems else (SURVIVED, "")
                c.record(case)
    finally:
        c.hub.set_throttle(None, None)


# --- malformed inputs ---------------------------------------------------------------------------


def malformed(c: Campaign, quick: bool) -> None:
    """Every case of the test suite's malformed corpus (tests/test_malformed.py), locally and
    through the Hub: a clean refusal, and nothing written."""
    from test_malformed import CASES

    for i, (name, case) in enumerate(CASES.items()):
        folder, work = c.work / f"bad-{name}" / "src", c.work / f"bad-{name}" / "work"
        shutil.copytree(c.work / "src", folder)
        work.mkdir()
        extra = case.build(folder, work)
        scheme = [] if "--scheme-file" in extra else ["--scheme", SCHEME]
        dst = c.work / f"bad-{name}" / "out"
        proc = subprocess.run([sys.executable, "-m", "streamer", str(folder), str(dst), *scheme, *extra,
                               "--device", "cpu", "-q"], env=c.env(), capture_output=True, text=True, timeout=300)
        why = clean_refusal(proc)
        if why is None and dst.exists():
            why = "destination created"
        c.record(Case("malformed", f"local {name}", *((REFUSED, "") if why is None else (DEFECT, why))))
        # Hub → Hub: the same folder seeded as a repo. Links and pipes cannot be committed, and
        # option cases do not depend on where the source is.
        if (quick and i % 2) or extra or any(p.is_symlink() or not (p.is_file() or p.is_dir())
                                             for p in folder.rglob("*")):
            continue
        repo, target = f"acme/bad{i}", f"alice/bad{i}"
        c.hub.seed_repo(repo, folder)
        proc = c.cli(repo, target)
        why = clean_refusal(proc)
        if why is None and c.streamer_commits(target):
            why = "target committed"
        c.record(Case("malformed", f"Hub {name}", *((REFUSED, "") if why is None else (DEFECT, why))))


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer cases of each kind")
    p.add_argument("--only", choices=("faults", "crashes", "malformed"), action="append")
    p.add_argument("--seed", type=int, default=0, help="seed for the kill points")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("STREAMER_BENCH_DIR", "/tmp/streamer-bench")) / "campaign")
    args = p.parse_args(argv)
    kinds = args.only or ["faults", "crashes", "malformed"]

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    # the tests' sharded tiny Llama (real names, tokenizer and config files), a few MB
    src = build_checkpoint("llama", args.work / "src")
    t0 = time.time()
    with LocalHub(args.work / "hub") as hub:
        hub.add_user("alice", TOKEN, orgs=["acme"])
        hub.seed_repo(SOURCE, src)
        c = Campaign(args.work, hub)
        base = c.cli(SOURCE, "alice/baseline")
        if base.returncode != 0:
            print(f"the fault-free baseline failed:\n{base.stderr}", file=sys.stderr)
            return 1
        c.baseline = c.hub_outputs("alice/baseline")
        local = subprocess.run([sys.executable, "-m", "streamer", str(src), str(args.work / "baseline-local"),
                                "--scheme", SCHEME, "--device", "cpu", "-q"], env=c.env(), capture_output=True,
                               text=True, timeout=300)
        if local.returncode != 0:
            print(f"the local baseline failed:\n{local.stderr}", file=sys.stderr)
            return 1
        c.local_baseline = c.local_outputs(args.work / "baseline-local")
        print(f"campaign on {src} ({sum(f.stat().st_size for f in src.iterdir()) / 1e6:.1f} MB), "
              f"{SCHEME}, localhub {hub.url}")
        rng = random.Random(args.seed)
        if "faults" in kinds:
            faults(c, args.quick)
        if "crashes" in kinds:
            crashes(c, args.quick, rng)
        if "malformed" in kinds:
            malformed(c, args.quick)

    print(f"\n{'kind':10s} {'tried':>6s} {'survived identical':>19s} {'refused cleanly':>16s} {'defects':>8s}")
    total = Counter()
    for kind in kinds:
        counts = Counter(case.outcome for case in c.cases if case.kind == kind)
        n = sum(counts.values())
        total.update(counts)
        print(f"{kind:10s} {n:6d} {counts[SURVIVED]:19d} {counts[REFUSED]:16d} {counts[DEFECT]:8d}")
    print(f"{'all':10s} {sum(total.values()):6d} {total[SURVIVED]:19d} {total[REFUSED]:16d} {total[DEFECT]:8d}"
          f"   ({time.time() - t0:.0f} s)")
    defects = [case for case in c.cases if case.outcome == DEFECT]
    if defects:
        print("\ndefects:")
        for case in defects:
            print(f"  {case.kind} {case.name}: {case.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
