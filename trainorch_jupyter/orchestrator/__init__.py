"""The in-kernel orchestrator: its own asyncio loop in a daemon thread, the job lifecycle, events.

One orchestrator per process (``get_orchestrator()``). The notebook's thread only ever hands work to
the orchestrator's loop and returns: ``submit`` validates and persists the job, schedules it and gives
back a :class:`JobHandle` at once. Public methods come in pairs: ``async def a<name>`` for IPython's
top-level ``await`` and a sync wrapper. Nothing here imports IPython or ipywidgets.

Where things are (each stage of a job's drive is a file):

- ``facade.py``: :class:`Orchestrator` (the public API, close, re-attach) and ``get_orchestrator``
- ``handle.py``: :class:`JobHandle`, :class:`Download`
- ``loop.py``: the loop thread and the bridges into it (``_submit``, ``_call``, ``_bridge``, ``call_soon``)
- ``events.py``: :class:`Event` and the subscribe/emit bus
- ``base.py``: the state every part shares, and the calls the parts make on each other
- ``settings.py``: every tunable number (patch ``settings.NAME``; code reads it at call time)
- ``drive.py``: one job's drive: the stages in order, the job's record, honouring a cancel
- ``outcome.py``: :class:`Outcome`, :class:`JobCancelled`, :class:`DeadlineExceeded`
- ``provision.py``: provision: create (or find again) the machine, wait until its runner answers
- ``connect.py``: connect: reach the runner through outages, follow a machine that moved
- ``run.py``: run and follow: upload, start, follow logs and metrics, conclude; ``build_command``
- ``collect.py``: collect: verified downloads of a job's files
- ``release.py``: release: terminate the machine, confirmed
- ``reaper.py``: the reaper of the persisted reap list, and ``cleanup`` of tagged machines no job owns
- ``watch.py``: events, from the store, of jobs another process drives (another kernel, the Jupyter server)
- ``offers.py``: one offers table across cloud providers, and ``--provider auto`` with its failover
- ``notify.py``: done callbacks and the webhook
- ``housekeeping.py``: lease renewal, cancel requests from the store, the reaper's schedule
"""

from __future__ import annotations

from . import settings
from .events import Event
from .facade import Orchestrator, get_orchestrator, reset_orchestrator
from .handle import Download, JobHandle
from .outcome import DeadlineExceeded, JobCancelled, Outcome
from .run import build_command

__all__ = [
    "DeadlineExceeded",
    "Download",
    "Event",
    "JobCancelled",
    "JobHandle",
    "Orchestrator",
    "Outcome",
    "build_command",
    "get_orchestrator",
    "reset_orchestrator",
    "settings",
]
