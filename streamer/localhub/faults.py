"""Deterministic fault injection: every Nth matching request misbehaves.

Counter-based rather than random so a test that expects "the 3rd download drops" sees
exactly that on every run.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

KINDS = ("drop", "500", "502", "503", "504", "429", "slow")


@dataclass(frozen=True)
class FaultPlan:
    every: int
    kinds: tuple[str, ...] = ("drop",)
    retry_after: int = 1
    slow_seconds: float = 0.5
    only_paths: str | None = "resolve"  # regex searched in the URL path; None = every request
    methods: tuple[str, ...] | None = None  # e.g. ("GET",); None = all methods
    max_faults: int | None = None  # stop injecting after that many

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("every must be >= 1")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown fault kinds {unknown}; choose from {KINDS}")


class FaultInjector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plan: FaultPlan | None = None
        self._pattern: re.Pattern | None = None
        self._seen = 0
        self._injected = 0

    def set(self, plan: FaultPlan | None) -> None:
        with self._lock:
            self._plan = plan
            self._pattern = re.compile(plan.only_paths) if plan and plan.only_paths else None
            self._seen = 0
            self._injected = 0

    @property
    def plan(self) -> FaultPlan | None:
        return self._plan

    def draw(self, method: str, path: str) -> tuple[str, FaultPlan] | None:
        """Count this request if it matches; return the fault it gets (with its plan), if any."""
        with self._lock:
            plan = self._plan
            if plan is None:
                return None
            if plan.methods is not None and method not in plan.methods:
                return None
            if self._pattern is not None and not self._pattern.search(path):
                return None
            self._seen += 1
            if self._seen % plan.every or (plan.max_faults is not None and self._injected >= plan.max_faults):
                return None
            kind = plan.kinds[self._injected % len(plan.kinds)]
            self._injected += 1
            return kind, plan
