"""How a run stops when something around the step fails: a rank that dies, a SIGTERM (a scheduler's preemption, or
torchrun stopping the job after one of its processes died), a checkpoint that cannot be written.

Each ends in one message that says what happened and where the last complete checkpoint is; ``--resume latest``
continues from it (or from step 0 when none was written yet).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from contrast import distributed as D
from contrast.errors import UserError
from contrast.runs import CHECKPOINTS

EXIT_LOST = 2  # the exit status of a rank that stops because another was lost (as for any error with a message)


class RankLostError(UserError, RuntimeError):
    """Another rank of the run died or stopped on an error; this one stops too."""


class RunStopped(UserError):
    """The process was asked to stop (SIGTERM)."""


def checkpoint_note(run_dir: Path) -> str:
    """Where a stopped run can continue from."""
    pointer = run_dir / CHECKPOINTS / "latest"
    if pointer.is_file():
        return (f"the last complete checkpoint is {run_dir / CHECKPOINTS / pointer.read_text().strip()}: continue "
                "with --resume latest")
    return "no checkpoint was written yet: --resume latest starts again from step 0"


def lost_message(ranks: list[int], reason: str, run_dir: Path) -> str:
    who = ", ".join(str(r) for r in ranks) or "unknown"
    note = checkpoint_note(run_dir)
    return f"lost rank {who} of {D.info().world_size} ({reason}); rank {D.info().rank} stops too. {note[0].upper()}{note[1:]}"


def exit_when_lost(run_dir: Path, before_exit: Callable[[str], None]) -> Callable[[list[int], str], None]:
    """The heartbeat's ``on_lost``: say which rank was lost, let ``before_exit`` record it, and end this process
    (its main thread may be inside a collective that would otherwise wait out its timeout)."""

    def on_lost(ranks: list[int], reason: str) -> None:
        message = lost_message(ranks, reason, run_dir)
        print(f"contrast: error: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            before_exit(message)
        os._exit(EXIT_LOST)

    return on_lost


class SigtermStops:
    """Within ``with SigtermStops() as stops:``, the first SIGTERM raises :class:`RunStopped` in the main thread (so
    the run ends with a message and a summary) instead of ending the process silently; after ``stops.quiet()`` (the
    run is already on its way out, saying why) SIGTERM is ignored. Elsewhere than the main thread nothing changes."""

    def __init__(self) -> None:
        self.stopping = False
        self.previous = None

    def quiet(self) -> None:
        self.stopping = True

    def _stop(self, signum, frame) -> None:
        if self.stopping:
            return
        self.stopping = True
        raise RunStopped("stopped by SIGTERM (a scheduler's preemption, or torchrun stopping the job)")

    def __enter__(self) -> SigtermStops:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._stop)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def explain(error: BaseException, heartbeat: D.Heartbeat | None, run_dir: Path) -> BaseException:
    """The error to stop with: a failed collective or a SIGTERM in a run whose heartbeat shows a silent rank
    becomes a :class:`RankLostError` naming it; a SIGTERM alone says where to continue from; anything else as is."""
    collective = isinstance(error, RuntimeError) and not isinstance(error, UserError)
    if heartbeat is not None and (collective or isinstance(error, RunStopped)):
        ranks, reason = heartbeat.quiet_ranks()
        if ranks:
            return RankLostError(lost_message(ranks, reason, run_dir))
    if isinstance(error, RunStopped):
        return RunStopped(f"{error}; {checkpoint_note(run_dir)}")
    return error
