"""One conversion per user at a time, each cancellable: the slots of the conversions running now."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from streamer.web.wording import UserError


@dataclass
class Slot:
    """A running conversion: where it publishes (as shown, and the repos, lowercased), the event
    that cancels it, when it started."""

    target: str
    repos: frozenset[str] = frozenset()
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)


_active: dict[str, Slot] = {}
_active_lock = threading.Lock()


def claim(user: str, target: str, repos: list[str] | None = None) -> Slot:
    """The slot for USER's conversion to TARGET; a UserError when USER already has one running,
    or when another user's conversion publishes to one of the same repos (two runs committing to
    one repo: the second would fail, and a cancel of the first would remove the repo under it).

    user: the account name.
    target: where the conversion publishes, as the page shows it.
    repos: the repo ids it publishes to (default: TARGET alone)."""
    wanted = frozenset(r.lower() for r in (repos or [target]))  # repo ids are case-insensitive
    with _active_lock:
        running = _active.get(user)
        if running is not None:
            raise UserError(
                f"You already have a conversion running (to {running.target}). Wait for it to finish "
                "or cancel it before starting another one."
            )
        for other in _active.values():
            taken = sorted(wanted & other.repos)
            if taken:
                raise UserError(
                    f"Another conversion is publishing to {taken[0]} right now: choose another repo name, "
                    "or wait for it to finish."
                )
        slot = _active[user] = Slot(target, wanted)
        return slot


def release(user: str, slot: Slot) -> None:
    """Free USER's slot once its conversion has ended (a newer slot of USER's is left alone).

    user: the account name.
    slot: the slot `claim` gave that conversion."""
    with _active_lock:
        if _active.get(user) is slot:
            del _active[user]


def cancel(user: str) -> Slot | None:
    """Ask USER's running conversion to stop; its slot, or None when none is running.

    user: the account name."""
    with _active_lock:
        slot = _active.get(user)
    if slot is not None:
        slot.cancel.set()
    return slot
