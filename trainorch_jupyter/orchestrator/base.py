"""What every part of the orchestrator shares: the state of one orchestrator, and the calls its parts make on
each other.

:class:`OrchestratorBase` is the root of the stage mixins (``drive``, ``provision``, ``connect``, ``run``,
``collect``, ``release``, ``reaper``, ``notify``, ``housekeeping``) that :class:`~.facade.Orchestrator` puts
together. It holds the per-job bookkeeping (which jobs are driven here, under which lease, with which machine and
runner client), the workspace's store and providers, and the loop and event bus it inherits. The methods a stage
calls on another stage are declared (for the type checker only) at the end of the class: that block is the index
of who calls whom across files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from ..model import ArtifactInfo, Job, JobSpec, JobState, ProviderError, default_workspace
from ..providers import MachineHandle, Provider, available_providers
from ..runner_client import RunnerClient
from ..store import Fence, Store, process_owner_id
from . import settings
from .events import EventBus
from .loop import LoopOwner

if TYPE_CHECKING:
    from .outcome import Outcome

T = TypeVar("T")


class OrchestratorBase(LoopOwner, EventBus):
    """The state of one orchestrator (see :class:`~.facade.Orchestrator` for what it does)."""

    # Set once the loop runs (by ``Orchestrator.__init__``).
    _http: httpx.AsyncClient
    _lease_task: asyncio.Task[None]

    def __init__(self, workspace: Path | str | None = None, *,
                 provider_config: Mapping[str, Mapping[str, Any]] | None = None, webhook_url: str | None = None,
                 providers: Mapping[str, type[Provider]] | None = None) -> None:
        EventBus.__init__(self)
        self.workspace = Path(workspace).resolve() if workspace is not None else default_workspace()
        self.store = Store(self.workspace)
        self.workspace_id = self.store.workspace_id()  # tags cloud machines (with the job id)
        self.artifacts_dir = self.workspace / "artifacts"
        self.owner = process_owner_id()
        # A URL (e.g. a Slack incoming webhook) posted a short summary when a job ends. It is a secret of
        # sorts: it is never logged or stored.
        self.webhook_url = webhook_url or os.environ.get("TRAINORCH_WEBHOOK_URL") or None
        self.unreachable_timeout_s = settings.UNREACHABLE_TIMEOUT_S
        # Providers come from the entry-point group; ``providers`` adds or replaces some (tests, embedding).
        self._provider_classes = {**available_providers(), **dict(providers or {})}
        self._provider_config = {k: dict(v) for k, v in (provider_config or {}).items()}
        self._providers: dict[str, Provider] = {}
        self._providers_lock = threading.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._fences: dict[str, Fence] = {}  # the lease each driven job is held under
        self._lost: set[str] = set()  # driven jobs whose lease another orchestrator took: stop, touch nothing
        self._interruptible: set[str] = set()  # jobs whose drive may be cancelled outright (before the start)
        self._user_cancelled: set[str] = set()  # drive tasks cancelled for a user's cancel
        self._clients: dict[str, RunnerClient] = {}  # the runner client of each driven job (its URL may move)
        self._last_ok: dict[str, float] = {}
        # Jobs shown here but driven by another process: watched through the store (watch.py).
        self._watchers: dict[str, asyncio.Future[None]] = {}
        self._all_watcher: asyncio.Future[None] | None = None  # when each driven job's runner last answered (monotonic)
        # One HTTP client per remote job, pinned to that job's TLS certificate; never shared with a provider's
        # API client (which carries the account's key) nor with another job.
        self._runner_https: dict[str, httpx.AsyncClient] = {}
        self._reaping: set[tuple[str, str]] = set()
        self._unsaved: dict[str, Job] = {}  # ended jobs whose final record could not be written yet
        self._callbacks = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="trainorch-on-done")
        self._background: set[asyncio.Task[Any]] = set()
        self._downloading: dict[str, asyncio.Task[list[ArtifactInfo]]] = {}
        self._machines: dict[str, tuple[Provider, MachineHandle]] = {}  # jobs driven here, once launched
        self.runtime_slack_s = settings.RUNTIME_SLACK_S
        self._cancel_requested: set[str] = set()
        self._done_events: dict[str, threading.Event] = {}
        self._done_callbacks: dict[str, list[Callable[[Job], None]]] = {}
        self._jobs: dict[str, Job] = {}  # the live record of jobs this orchestrator drives
        self._done_lock = threading.Lock()  # guards _done_callbacks (appended off the loop, run on it)
        self._download_locks: dict[str, asyncio.Lock] = {}  # one on-demand download of a job at a time
        self._closed = False
        self._closing = False

    if TYPE_CHECKING:
        # The calls stages make on each other, by the file that defines them. Declarations only: the type
        # checker holds each definition to its declaration here.

        # facade.py
        def provider(self, name: str) -> Provider: ...
        async def _aget(self, job_id: str) -> Job: ...

        # drive.py
        async def _store_write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...
        def _fence(self, job_id: str) -> Fence | None: ...
        async def _save(self, job: Job, note: str | None = None) -> None: ...
        async def _set_state(self, job: Job, state: JobState, note: str | None = None) -> None: ...
        def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...
        def _check_cancel(self, job: Job) -> None: ...
        def _honour_cancel(self, job_id: str) -> None: ...

        # provision.py
        async def _provision(self, job: Job, provider: Provider, *, launch_spec: JobSpec | None = None,
                             timeout_s: float | None = None) -> MachineHandle: ...
        async def _resume_handle(self, job: Job, provider: Provider) -> MachineHandle | None: ...

        # connect.py
        async def _persist(self, what: str, fn: Callable[[], Coroutine[Any, Any, T]],
                           job_id: str | None = None, *, bounded: bool = True) -> T: ...
        def _runner_http(self, job: Job) -> httpx.AsyncClient: ...
        async def _close_runner_http(self, job_id: str) -> None: ...
        async def _ensure_runner(self, job: Job, provider: Provider, deadline: float) -> None: ...

        # run.py
        async def _start_command(self, job: Job, client: RunnerClient) -> None: ...
        async def _follow(self, job: Job, client: RunnerClient) -> None: ...
        async def _conclude(self, job: Job, client: RunnerClient) -> Outcome | None: ...

        # collect.py
        async def _auto_download(self, job: Job, client: RunnerClient) -> None: ...
        async def _salvage(self, job: Job, client: RunnerClient) -> None: ...

        # offers.py
        async def _provision_auto(self, job: Job) -> tuple[Provider, MachineHandle]: ...

        # release.py
        async def _terminate(self, provider: Provider, handle: MachineHandle, job: Job) -> None: ...

        # reaper.py
        async def areap(self) -> int: ...

        # notify.py
        def _run_done_callbacks(self, job: Job) -> None: ...
        async def _post_webhook(self, job: Job) -> None: ...


def _transient(exc: BaseException) -> bool:
    """An error of a provider's API that may pass if asked again (a 429, a 5xx, the network)."""
    if isinstance(exc, ProviderError):
        return bool(getattr(exc, "retryable", False))
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError | TimeoutError | ConnectionError)
