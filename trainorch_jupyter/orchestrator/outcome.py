"""How a job's drive ends: its :class:`Outcome`, and the errors a stage raises to end it from inside."""

from __future__ import annotations

from dataclasses import dataclass

from ..model import JobState, TrainorchError


@dataclass(frozen=True)
class Outcome:
    state: JobState
    error: str | None = None
    timed_out: bool = False


class DeadlineExceeded(TrainorchError):
    """The orchestrator's own deadline on a job's run passed."""


class JobCancelled(TrainorchError):
    """Raised inside a job's driver when the user cancelled it."""


#: The message a job's drive task is cancelled with when the user cancels it during provisioning (so it is
#: told apart from the orchestrator closing, which leaves the machine to the next orchestrator).
_USER_CANCEL = "trainorch: cancelled by the user"
