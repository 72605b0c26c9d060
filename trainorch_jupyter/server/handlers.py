"""The REST API under ``<base_url>api/training/`` (``docs/server-api.yaml`` is its OpenAPI document).

Every method is ``@web.authenticated`` and ``@authorized`` (resource ``training``): it answers 403 to a request
without a user whatever ``ServerApp.allow_unauthenticated_access`` says. A POST from a cookie session must carry
the XSRF token (``JupyterHandler.prepare`` checks it; requests with the server token in a header are exempt, as
everywhere in Jupyter). JSON in and out, except the log (``text/plain``) and the event stream
(``text/event-stream``, whose content type is set here: ``APIHandler.finish`` would say JSON). Every store read
and write runs in a worker thread; the server's event loop only moves bytes.

Reads a client polls (the job list, a status, a log, the summary, the event stream) count as the server's
activity for idle culling only while a submitted job is live: an open JupyterLab with nothing running does not
keep an idle server up, a running job does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from jupyter_server._tz import utcnow
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web
from tornado.iostream import StreamClosedError

from ..artifacts import DestinationConflict
from ..model import JobNotFound, JobState, SpecError, TrainorchError
from .driver import Conflict, ServerOrchestrator
from .service import ServiceUnavailable, TrainingService, parse_time, redact_record

#: The largest log slice one ``/logs`` answer carries.
MAX_LOG_LIMIT = 8 * 1024 * 1024
DEFAULT_LOG_LIMIT = 1024 * 1024
_JOB_ID = r"(?P<job_id>[A-Za-z0-9][A-Za-z0-9._-]{0,127})"


class ApiError(Exception):
    """An answer other than 2xx, with the body ``{"error", "message", "field"}``."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


class TrainingHandler(APIHandler):
    """The base of every handler here: the service, errors as JSON, activity only while a job is live."""

    auth_resource = "training"
    #: Requests a client polls: activity only while a job is live (see the module's docstring).
    _polled = False

    @property
    def service(self) -> TrainingService:
        service: TrainingService = self.settings["trainorch_service"]
        return service

    async def ready_service(self) -> TrainingService:
        try:
            await self.service.ready()
        except (ServiceUnavailable, TimeoutError) as exc:
            raise ApiError(503, str(exc) or "trainorch is still starting") from None
        return self.service

    @property
    def _track_activity(self) -> bool:  # type: ignore[override]
        """jupyter_server's switch for counting a request as activity: a polled read counts only while a
        submitted job is live."""
        return not self._polled or self.service.any_live()

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def send_error_json(self, exc: ApiError) -> None:
        self.set_status(exc.status)
        self.finish(json.dumps({"error": exc.message, "message": exc.message, "field": exc.field}))

    async def run(self, work: Any) -> None:
        """Run a handler's body; known errors become their JSON answers."""
        try:
            await work
        except ApiError as exc:
            self.send_error_json(exc)
        except SpecError as exc:
            self.send_error_json(ApiError(400, str(exc), exc.field))
        except JobNotFound as exc:
            self.send_error_json(ApiError(404, str(exc)))
        except (Conflict, DestinationConflict) as exc:
            self.send_error_json(ApiError(409, str(exc)))

    def query_arg(self, name: str) -> str | None:
        value = self.get_query_argument(name, None)
        return None if value is None or value == "" else value

    def int_arg(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self.query_arg(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, f"{name}: must be an integer, got {raw!r}", name) from None
        if not lo <= value <= hi:
            raise ApiError(400, f"{name}: must be from {lo} to {hi}, got {value}", name)
        return value

    def since_arg(self, name: str = "since") -> Any:
        raw = self.query_arg(name)
        if raw is None:
            return None
        try:
            return parse_time(raw)
        except ValueError:
            raise ApiError(400, f"{name}: must be an ISO 8601 time such as 2025-01-01T12:00:00Z, got {raw!r}",
                           name) from None

    async def act_on(self, job_id: str, action: Callable[[ServerOrchestrator, str], object]) -> None:
        """``action(server orchestrator, job_id)`` on a known job (off the loop), then answer 202 with the job's
        summary as the store now has it."""
        await self.entry_or_404(job_id)
        service = self.service
        assert service.orch is not None
        await asyncio.to_thread(action, service.orch, job_id)
        service.mark_dirty()
        await service.refresh()
        self.send_json(service.summary_by_id(job_id), 202)

    async def entry_or_404(self, job_id: str) -> Any:
        service = await self.ready_service()
        entry = service.entry(job_id)
        if entry is None:
            service.mark_dirty()
            await service.refresh()
            entry = service.entry(job_id)
        if entry is None:
            raise ApiError(404, f"no job {job_id!r} in this workspace")
        return entry

    def json_body(self) -> dict[str, Any]:
        raw = self.request.body
        if not raw or not raw.strip():
            raise ApiError(400, "spec: the request body must be a JSON object (the job spec)", "spec")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"spec: the request body is not JSON ({exc})", "spec") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"spec: must be a JSON object, got {type(data).__name__}", "spec")
        return data


class JobsHandler(TrainingHandler):
    """``GET /api/training/jobs`` (filters: state, provider, since) and ``POST`` (create a job from a spec)."""

    _polled = True

    @web.authenticated
    @authorized
    async def get(self) -> None:
        async def work() -> None:
            service = await self.ready_service()
            raw_state = self.query_arg("state")
            state = None
            if raw_state is not None:
                try:
                    state = JobState(raw_state.upper())
                except ValueError:
                    raise ApiError(400, f"state: unknown state {raw_state!r}; one of "
                                        f"{', '.join(s.value for s in JobState)}", "state") from None
            since = self.since_arg()
            await service.refresh()
            entries = service.entries(state=state, provider=self.query_arg("provider"), since=since)
            self.send_json({"jobs": [service.summary_of(e) for e in entries], "now": service.now.isoformat()})

        await self.run(work())

    @web.authenticated
    @authorized
    async def post(self) -> None:
        async def work() -> None:
            service = await self.ready_service()
            body = self.json_body()
            spec = await asyncio.to_thread(spec_from_body, body, service)
            assert service.orch is not None
            job = await asyncio.to_thread(service.orch.create_draft, spec)
            service.mark_dirty()
            await service.refresh()
            entry = service.entry(job.id)
            assert entry is not None
            self.set_header("Location", self.request.path.rstrip("/") + f"/{job.id}/status")
            self.send_json(service.summary_of(entry), 201)

        await self.run(work())


class SubmitHandler(TrainingHandler):
    """``POST /api/training/jobs/{job_id}/submit``: start a created job, driven by the server."""

    @web.authenticated
    @authorized
    async def post(self, job_id: str) -> None:
        await self.run(self.act_on(job_id, ServerOrchestrator.start))


class StatusHandler(TrainingHandler):
    """``GET /api/training/jobs/{job_id}/status``: the JobSummary and the whole record."""

    _polled = True

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        async def work() -> None:
            service = await self.ready_service()
            await service.refresh()
            entry = await self.entry_or_404(job_id)
            out = service.summary_of(entry)
            out["record"] = redact_record(entry.job.to_dict())
            out["driven_here"] = job_id in service.driven
            self.send_json(out)

        await self.run(work())


class CancelHandler(TrainingHandler):
    """``POST /api/training/jobs/{job_id}/cancel``: recorded in the store; whoever drives the job honours it."""

    @web.authenticated
    @authorized
    async def post(self, job_id: str) -> None:
        await self.run(self.act_on(job_id, ServerOrchestrator.cancel_job))


class DownloadHandler(TrainingHandler):
    """``POST /api/training/jobs/{job_id}/download-artifact``: the job's files, each verified by SHA-256, in
    ``artifacts/<job_id>/`` of the workspace (kept there: a second call verifies and answers at once)."""

    @web.authenticated
    @authorized
    async def post(self, job_id: str) -> None:
        async def work() -> None:
            entry = await self.entry_or_404(job_id)
            if entry.job.state.is_live:
                raise ApiError(409, f"job {job_id} is {entry.job.state.value}: its files come when it ends")
            service = self.service
            assert service.orch is not None
            try:
                infos = await service.orch.adownload(job_id)
            except (JobNotFound, SpecError, Conflict, DestinationConflict):
                raise
            except TrainorchError as exc:
                raise ApiError(409, str(exc)) from None
            service.mark_dirty()
            files = await asyncio.to_thread(_describe_files, infos, service.root_dir)
            self.send_json({"job_id": job_id, "files": files})

        await self.run(work())


class LogsHandler(TrainingHandler):
    """``GET /api/training/jobs/{job_id}/logs?offset=N&limit=M``: committed log bytes from a byte offset."""

    _polled = True

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        async def work() -> None:
            service = await self.ready_service()
            offset = self.int_arg("offset", 0, 0, 2**62)
            limit = self.int_arg("limit", DEFAULT_LOG_LIMIT, 1, MAX_LOG_LIMIT)
            entry = await self.entry_or_404(job_id)
            assert service.orch is not None and service.view is not None
            # The state first, then the log: a job seen ended has its whole log committed (its drive drains the
            # log before it ends the job), so "complete" is never said of a log that grows after the read.
            record = await asyncio.to_thread(service.view.record, job_id)
            ended = (record[0] if record is not None else entry.job).state.is_terminal
            data, committed = await asyncio.to_thread(_read_log, service, job_id, offset, limit)
            nxt = offset + len(data)
            complete = ended and nxt >= committed
            self.set_header("X-Next-Offset", str(nxt))
            self.set_header("X-Log-Complete", "1" if complete else "0")
            self.set_header("X-Log-Size", str(committed))
            self.set_header("Cache-Control", "no-store")
            self.set_status(200)
            self.finish(data, set_content_type="text/plain; charset=utf-8")

        await self.run(work())


class SummaryHandler(TrainingHandler):
    """``GET /api/training/summary``: what the status bar shows."""

    _polled = True

    @web.authenticated
    @authorized
    async def get(self) -> None:
        async def work() -> None:
            service = await self.ready_service()
            await service.refresh()
            self.send_json({**service.totals(), "now": service.now.isoformat()})

        await self.run(work())


class EventsHandler(TrainingHandler):
    """``GET /api/training/events``: server-sent events.

    ``event: job`` (a JobSummary, with ``id:`` its change time: a reconnecting EventSource sends it back as
    ``Last-Event-ID`` and gets every job changed since), ``event: log`` (``{"job_id", "offset", "next_offset",
    "text"}``: new committed bytes of a log; ``?logs=`` chooses whose: ``*`` (default) every job's, a comma list
    of ids, or empty for none), and a ``: ping`` comment every ``ping_interval`` seconds."""

    _polled = True
    _client_gone = False
    _sub: Any = None

    @web.authenticated
    @authorized
    async def get(self) -> None:
        try:
            service = await self.ready_service()
            since = self.since_arg()
        except ApiError as exc:
            self.send_error_json(exc)
            return
        if since is None and self.request.headers.get("Last-Event-ID"):
            try:
                since = parse_time(self.request.headers["Last-Event-ID"])
            except ValueError:
                since = None
        raw_logs = self.get_query_argument("logs", "*")
        logs = None if raw_logs.strip() == "*" else [j for j in (s.strip() for s in raw_logs.split(",")) if j]
        self.set_status(200)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache, no-store")
        self.set_header("X-Accel-Buffering", "no")  # no proxy buffering
        sub = self._sub = service.subscribe(logs)
        try:
            await service.refresh()
            self.write("retry: 3000\n\n")
            if since is not None:
                for entry in service.entries(since=since):
                    self.write(service.job_event(entry))
            await self.flush()
            ended = False
            while not ended and not self._client_gone:
                try:
                    first = await asyncio.wait_for(sub.queue.get(), service.ping_interval)
                except TimeoutError:
                    first = ": ping\n\n"
                    self._activity_if_live()
                batch = [first]
                while not sub.queue.empty():  # what else is waiting goes in the same flush
                    batch.append(sub.queue.get_nowait())
                for message in batch:
                    if message is None:
                        ended = True
                        break
                    self.write(message)
                await self.flush()
        except StreamClosedError:
            self._client_gone = True
        finally:
            service.unsubscribe(sub)
        if not self._finished:
            self.finish(set_content_type="text/event-stream; charset=utf-8")

    def _activity_if_live(self) -> None:
        if self.service.any_live():
            self.settings["api_last_activity"] = utcnow()

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self._sub is not None:
            self._sub.put(None)


def _describe_files(infos: list[Any], root_dir: Any) -> list[dict[str, Any]]:
    files = []
    for a in infos:
        path = a.path.resolve()
        try:
            shown = path.relative_to(root_dir).as_posix()
        except ValueError:
            shown = str(path)
        files.append({"name": a.name, "size_bytes": a.size_bytes, "hash_sha256": a.hash_sha256,
                      "path": shown, "verified": a.metadata.get("verified", True) is not False})
    return files


def _read_log(service: TrainingService, job_id: str, offset: int, limit: int) -> tuple[bytes, int]:
    """(bytes ``offset..`` of the log, at most ``limit``, within the committed part; the committed size)."""
    assert service.orch is not None and service.view is not None
    committed = service.view.log_offset(job_id)
    if committed is None:
        raise JobNotFound(job_id)
    if offset >= committed:
        return b"", committed
    try:
        with open(service.orch.store.log_path(job_id), "rb") as fh:
            fh.seek(offset)
            return fh.read(min(limit, committed - offset)), committed
    except FileNotFoundError:
        return b"", committed


def spec_from_body(body: dict[str, Any], service: TrainingService) -> Any:
    """The job spec of a request body, made and checked exactly as a ``%%train submit`` cell is (the same
    defaults: a name from the model or the command, a command's workdir = the workspace folder; then
    ``Orchestrator.validate`` and the checks before billing, which pack the workdir's snapshot), with relative
    file paths taken from the workspace folder (a notebook's kernel takes them from its own folder, which is the
    workspace). Blocking: call it in a worker thread."""
    from .. import checks, magics

    orch = service.orch
    assert orch is not None
    data = dict(body)
    for key in ("train", "resources", "env"):
        if key in data and data[key] is not None and not isinstance(data[key], dict):
            raise SpecError(key, f"must be a JSON object, got {type(data[key]).__name__}")
    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("data"), str):
        train = dict(train)
        train["data"] = _in_workspace(train["data"], service)
        data["train"] = train
    inputs = data.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, list):
        data["inputs"] = [_in_workspace(p, service) if isinstance(p, str) else p for p in inputs]
    # What TrainMagics._do_submit and _submit_checked do with a cell body and no options:
    spec = magics.spec_from_args(magics._parse("submit", []), None, data, workspace=orch.workspace)
    spec = orch.validate(spec)
    remote = spec.provider == "auto" or bool(getattr(orch.provider(spec.provider), "remote", False))
    prepared = checks.prepare(spec, workspace=orch.workspace, remote=remote, pack=True)
    for note in prepared.notes:
        service.log.info("trainorch: job %s: %s", spec.name, note)
    return prepared.spec


def _in_workspace(path: str, service: TrainingService) -> str:
    from pathlib import Path

    if not path.strip():
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else service.workspace / p)


def routes() -> list[tuple[str, type[TrainingHandler]]]:
    base = "/api/training"
    return [
        (rf"{base}/jobs/?", JobsHandler),
        (rf"{base}/jobs/{_JOB_ID}/submit", SubmitHandler),
        (rf"{base}/jobs/{_JOB_ID}/status", StatusHandler),
        (rf"{base}/jobs/{_JOB_ID}/cancel", CancelHandler),
        (rf"{base}/jobs/{_JOB_ID}/download-artifact", DownloadHandler),
        (rf"{base}/jobs/{_JOB_ID}/logs", LogsHandler),
        (rf"{base}/summary", SummaryHandler),
        (rf"{base}/events", EventsHandler),
    ]
