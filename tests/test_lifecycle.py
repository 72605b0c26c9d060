"""The job lifecycle under faults: cancel in every stage, re-attach, fencing, the reap list, store hiccups.

Each test names the item of the lifecycle issue it covers; each failed on the code before its fix. Real
parts: the runner subprocess through the local provider (subclassed only to inject a provider's faults:
a slow or failing create, a poll that errs, a terminate that fails), real HTTP, a real SQLite store.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainorch_jupyter import orchestrator as orch_mod
from trainorch_jupyter.model import JobState, ProviderError
from trainorch_jupyter.orchestrator import Orchestrator
from trainorch_jupyter.providers import MachineHandle, MachineStatus, PollResult
from trainorch_jupyter.providers.local import LocalProvider
from trainorch_jupyter.store import Fence, LeaseLost, Store

from .helpers import CuttingProxy, orchestrator, pid_alive, py_command, wait_for

SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(600)"


def _numbered(n: int, width: int = 40) -> str:
    return "".join(f"line {i:06d} {'x' * width}\n" for i in range(n))


def _printer(n: int, width: int = 40, sleep: float = 0.0, files: bool = True) -> list[str]:
    code = (
        "import os, sys, time\n"
        f"for i in range({n}):\n"
        f"    sys.stdout.write(f'line {{i:06d}} {'x' * width}\\n')\n"
        f"    if {sleep}: sys.stdout.flush(); time.sleep({sleep})\n"
        "sys.stdout.flush()\n"
    )
    if files:
        code += "open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/out.txt', 'w').write('ok')\n"
    return py_command(code)


def _runner_pid(workspace: Path, job_id: str) -> int:
    info = json.loads((workspace / ".trainorch" / "machines" / job_id / "runner.json").read_text())
    return int(info["pid"])


def _job_tasks(orch: Orchestrator, job_id: str) -> list[str]:
    """Names of the orchestrator loop's tasks that belong to ``job_id`` (or follow any job)."""

    async def names() -> list[str]:
        out = []
        for t in asyncio.all_tasks():
            coro = t.get_coro()
            qual = getattr(coro, "__qualname__", "") or ""
            if job_id in t.get_name() or "follow" in qual:
                out.append(f"{t.get_name()}:{qual}")
        return out

    return asyncio.run_coroutine_threadsafe(names(), orch.loop).result(10)


class FilteringProxy:
    """An HTTP reverse proxy to a runner that answers chosen paths with an error (a runner fault)."""

    def __init__(self, fail_path: str, status: int = 400) -> None:
        self.target = ""
        self.fail_path = fail_path
        self.status = status
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _do(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path.startswith(proxy.fail_path):
                    data = b'{"error": "injected"}'
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                try:
                    r = httpx.request(self.command, proxy.target + self.path, headers=headers, content=body,
                                      timeout=60)
                except httpx.HTTPError:
                    self.close_connection = True
                    return
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_HEAD = _do

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------
# item 4: cancel during the input upload ends CANCELLED
# --------------------------------------------------------------------------------------------


class SlowLinkLocal(LocalProvider):
    proxy: CuttingProxy

    async def launch(self, job: Any, bootstrap: Any) -> MachineHandle:
        handle = await super().launch(job, bootstrap)
        handle.runner_url = self.proxy.proxied(str(handle.runner_url))
        return handle

    async def poll(self, handle: MachineHandle) -> PollResult:
        result = await super().poll(handle)
        return PollResult(result.status, handle.runner_url if result.runner_url else None, result.detail)


def test_cancel_during_the_input_upload_ends_cancelled(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 << 20))
    proxy = CuttingProxy()
    proxy.delay = 0.02  # a slow link: the upload takes many seconds
    SlowLinkLocal.proxy = proxy
    try:
        with orchestrator(tmp_path, providers={"local": SlowLinkLocal}) as orch:
            job = orch.submit({"name": "upl", "command": py_command("print(1)"), "inputs": [str(big)]})
            inputs = tmp_path / ".trainorch" / "machines" / job.id / "inputs"
            state_dir = inputs.parent
            wait_for(lambda: any(state_dir.rglob(".upload-*")) or any(state_dir.rglob("*.part")), 60,
                     what="the upload to begin")
            assert job.status is JobState.PROVISIONING
            job.cancel()
            final = job.wait(60)
            assert final.state is JobState.CANCELLED, (final.state, final.error)
            # Stopped at once, not after the whole upload (which would take many seconds more).
            assert not (inputs / "big.bin").exists()
            assert final.machine_id is not None
            assert not pid_alive(int(final.machine_id))
            assert orch.reap_list() == []
    finally:
        proxy.close()


# --------------------------------------------------------------------------------------------
# item 5: when one follower fails, the other is stopped; nothing of the job is left
# --------------------------------------------------------------------------------------------


class MetricsFaultLocal(LocalProvider):
    proxy: FilteringProxy

    async def launch(self, job: Any, bootstrap: Any) -> MachineHandle:
        handle = await super().launch(job, bootstrap)
        self.proxy.target = str(handle.runner_url)
        handle.runner_url = self.proxy.url
        return handle

    async def poll(self, handle: MachineHandle) -> PollResult:
        result = await super().poll(handle)
        return PollResult(result.status, self.proxy.url if result.runner_url else None, result.detail)


def test_a_failing_follower_stops_the_other_and_leaves_no_task(tmp_path: Path) -> None:
    proxy = FilteringProxy("/v1/metrics", status=400)
    MetricsFaultLocal.proxy = proxy
    try:
        with orchestrator(tmp_path, providers={"local": MetricsFaultLocal}) as orch:
            job = orch.submit({"name": "orphan", "command": py_command(SLEEPER)})
            final = job.wait(60)
            assert final.state is JobState.FAILED
            assert "metrics" in (final.error or "")
            wait_for(lambda: not _job_tasks(orch, job.id), 10, what="no task of the job left")
            size = job.log_path.stat().st_size
            time.sleep(1.0)
            assert job.log_path.stat().st_size == size  # nothing written after the end
            assert not pid_alive(int(final.machine_id or -1))
    finally:
        proxy.close()


# --------------------------------------------------------------------------------------------
# item 6: re-attach after a long absence drains the backlog; a runner that ended its life is served again
# --------------------------------------------------------------------------------------------


def test_reattach_long_after_the_end_drains_everything(tmp_path: Path) -> None:
    """The job ended within its max runtime while no kernel followed it; the new kernel comes back long
    past ``max_runtime + slack`` and over a slow link: it must drain the whole log, not fail it as timed out."""
    first = Orchestrator(tmp_path)
    job = first.submit({"name": "away", "command": _printer(60000, sleep=0.0), "max_runtime": 4})
    wait_for(lambda: job.status is JobState.RUNNING, 30, what="RUNNING")
    first.close()
    state_dir = tmp_path / ".trainorch" / "machines" / job.id
    wait_for(lambda: json.loads((state_dir / "status.json").read_text()).get("state") == "exited", 30,
             what="the command's end")
    time.sleep(1.0)
    proxy = CuttingProxy()
    proxy.delay = 0.1  # draining 3.7 MB takes far more than the old 5 s allowance
    SlowLinkLocal.proxy = proxy
    try:
        second = Orchestrator(tmp_path, providers={"local": SlowLinkLocal}, reattach=False)
        second.runtime_slack_s = 0.0
        try:
            # Reach the surviving runner through the slow link.
            store = Store(tmp_path)
            rec = store.get(job.id)
            rec.runner_url = proxy.proxied(str(rec.runner_url))
            store.save(rec)
            store.close()
            assert job.id in second.reattach()
            final = second.wait(job.id, timeout=240)
            assert final.state is JobState.COMPLETED, final.error
            assert second.job(job.id).log_path.read_text() == _numbered(60000)
            assert [a.name for a in final.artifacts] == ["out.txt"]
        finally:
            second.close()
    finally:
        proxy.close()


def test_reattach_after_the_runner_ended_its_life_completes(tmp_path: Path) -> None:
    """The local runner exited on its own (retention over) after a successful command: the job is
    COMPLETED with its files, not FAILED 'lost while away'."""
    first = Orchestrator(tmp_path)
    job = first.submit({"name": "gone", "command": _printer(200, sleep=0.01)})
    wait_for(lambda: job.status is JobState.RUNNING, 30, what="RUNNING")
    first.close()
    pid = _runner_pid(tmp_path, job.id)
    state_dir = tmp_path / ".trainorch" / "machines" / job.id
    wait_for(lambda: json.loads((state_dir / "status.json").read_text()).get("state") == "exited", 30,
             what="the command's end")
    os.kill(pid, 15)  # what the runner's own retention timer does
    wait_for(lambda: not pid_alive(pid), 20, what="the runner to exit")
    with orchestrator(tmp_path) as second:
        final = second.wait(job.id, timeout=60)
        assert final.state is JobState.COMPLETED, final.error
        assert second.job(job.id).log_path.read_text() == _numbered(200)
        assert [a.name for a in final.artifacts] == ["out.txt"]
        assert not pid_alive(int(final.machine_id or -1))
        assert second.reap_list() == []


# --------------------------------------------------------------------------------------------
# item 8: machines never leak at the edges of provisioning; the reap list outlives a kernel
# --------------------------------------------------------------------------------------------


class RecordingLocal(LocalProvider):
    launched: list[int] = []

    async def launch(self, job: Any, bootstrap: Any) -> MachineHandle:
        handle = await super().launch(job, bootstrap)
        RecordingLocal.launched.append(int(handle.machine_id))
        return handle


def test_saving_the_handle_fails_and_the_machine_is_still_destroyed(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch_mod.settings, "STORE_RETRY_S", 0.5)
    RecordingLocal.launched = []
    with orchestrator(tmp_path, providers={"local": RecordingLocal}) as orch:
        real_save = orch.store.save

        def failing_save(job: Any, **kw: Any) -> None:
            if job.machine_id is not None and job.state is JobState.PROVISIONING:
                raise sqlite3.OperationalError("disk I/O error")
            real_save(job, **kw)

        monkeypatch.setattr(orch.store, "save", failing_save)
        job = orch.submit({"name": "nosave", "command": py_command(SLEEPER)})
        final = job.wait(60)
        assert final.state is JobState.FAILED
        (pid,) = RecordingLocal.launched
        assert not pid_alive(pid), "the machine was left running"
        assert orch.reap_list() == []


class FailButCreated(LocalProvider):
    """A create that errs yet made the machine, and a listing by tag that errs the first times."""

    reconcile_failures = 2
    calls: list[str] = []

    async def launch(self, job: Any, bootstrap: Any) -> MachineHandle:
        await super().launch(job, bootstrap)
        raise ProviderError(self.name, "the create call timed out", retryable=True)

    async def reconcile(self, job: Any) -> list[MachineHandle]:
        FailButCreated.calls.append("reconcile")
        if FailButCreated.reconcile_failures > 0:
            FailButCreated.reconcile_failures -= 1
            raise ProviderError(self.name, "listing failed: 401 unauthorized")
        return await super().reconcile(job)


def test_a_create_that_fails_but_made_a_machine_is_reaped_even_when_listing_fails(tmp_path: Path) -> None:
    FailButCreated.reconcile_failures = 2
    FailButCreated.calls = []
    with orchestrator(tmp_path, providers={"local": FailButCreated}) as orch:
        job = orch.submit({"name": "ghost", "command": py_command(SLEEPER)})
        final = job.wait(60)
        assert final.state is JobState.FAILED and "create call timed out" in (final.error or "")
        pid = _runner_pid(tmp_path, job.id)
        # The first listing failed: the intent stays on the reap list and the reaper finds the machine.
        wait_for(lambda: not pid_alive(pid), 60, what="the reaper to destroy the machine")
        wait_for(lambda: orch.reap_list() == [], 20, what="an empty reap list")
        assert FailButCreated.calls.count("reconcile") >= 2


class StuckTerminate(LocalProvider):
    failures_left = 10**6

    async def terminate(self, handle: MachineHandle) -> None:
        if StuckTerminate.failures_left > 0:
            StuckTerminate.failures_left -= 1
            raise ProviderError(self.name, "503 service unavailable", retryable=True)
        await super().terminate(handle)


def test_a_terminate_that_keeps_failing_is_retried_after_a_restart(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch_mod.settings, "TERMINATE_GIVE_UP_S", 1.0)
    StuckTerminate.failures_left = 10**6
    with orchestrator(tmp_path, providers={"local": StuckTerminate}) as orch:
        job = orch.submit({"name": "stuck", "command": py_command("print('hi')")})
        final = job.wait(60)
        assert final.state is JobState.COMPLETED
        assert "could not be terminated yet" in (final.error or "")
        pid = _runner_pid(tmp_path, job.id)
        assert pid_alive(pid)
        (entry,) = orch.reap_list()
        assert entry.machine_id == str(pid) and entry.due
    # A new kernel (whose provider's terminate works again) reaps it from the persisted list.
    StuckTerminate.failures_left = 0
    with orchestrator(tmp_path, providers={"local": StuckTerminate}) as orch:
        wait_for(lambda: not pid_alive(pid), 30, what="the reaper to destroy the machine")
        wait_for(lambda: orch.reap_list() == [], 10, what="an empty reap list")


# --------------------------------------------------------------------------------------------
# item 9: a provider API hiccup does not kill a healthy job; a new runner URL is followed
# --------------------------------------------------------------------------------------------


class HiccupPoll(LocalProvider):
    fail_polls = 3

    async def poll(self, handle: MachineHandle) -> PollResult:
        if HiccupPoll.fail_polls > 0:
            HiccupPoll.fail_polls -= 1
            request = httpx.Request("GET", "https://api.example.invalid/pods/x")
            raise httpx.HTTPStatusError("429", request=request, response=httpx.Response(429, request=request))
        return await super().poll(handle)


def test_provider_poll_errors_are_ridden_out(tmp_path: Path) -> None:
    HiccupPoll.fail_polls = 3
    with orchestrator(tmp_path, providers={"local": HiccupPoll}) as orch:
        final = orch.submit({"name": "hiccup", "command": _printer(10)}).wait(90)
        assert final.state is JobState.COMPLETED, final.error
        assert HiccupPoll.fail_polls == 0


class MovedLocal(LocalProvider):
    """The machine is reached at a new address after the first one went dead (a new port mapping)."""

    new_url: str | None = None

    async def poll(self, handle: MachineHandle) -> PollResult:
        result = await super().poll(handle)
        if result.status is MachineStatus.READY and MovedLocal.new_url:
            return PollResult(MachineStatus.READY, MovedLocal.new_url)
        return result


def test_a_runner_reached_at_a_new_address_is_followed_there(tmp_path: Path) -> None:
    MovedLocal.new_url = None
    old = CuttingProxy()
    SlowLinkLocal.proxy = old
    first = Orchestrator(tmp_path, providers={"local": SlowLinkLocal})
    job = first.submit({"name": "moved", "command": _printer(300, sleep=0.02)})
    wait_for(lambda: job.status is JobState.RUNNING, 30, what="RUNNING")
    first.close()
    old.close()  # the old address is dead for good
    real_url = json.loads((tmp_path / ".trainorch" / "machines" / job.id / "runner.json").read_text())["url"]
    new = CuttingProxy()
    try:
        MovedLocal.new_url = new.proxied(real_url)
        second = Orchestrator(tmp_path, providers={"local": MovedLocal}, reattach=False)
        second.unreachable_timeout_s = 30.0
        try:
            second.reattach()
            final = second.wait(job.id, timeout=90)
            assert final.state is JobState.COMPLETED, final.error
            assert final.runner_url == MovedLocal.new_url
            assert second.job(job.id).log_path.read_text() == _numbered(300)
        finally:
            second.close()
    finally:
        new.close()


# --------------------------------------------------------------------------------------------
# item 10: one driver per job (a fencing token on the lease)
# --------------------------------------------------------------------------------------------


def test_store_fences_a_driver_that_lost_its_lease(tmp_path: Path) -> None:
    from trainorch_jupyter.model import Job, JobSpec

    store = Store(tmp_path)
    job = Job(id="j1", spec=JobSpec(name="j", command=("true",)), provider="local")
    store.create(job, owner="host:1:a")
    a = store.claim("j1", "host:1:a")
    assert a == Fence("host:1:a", 0)
    with store._tx() as c:  # the lease ran out (the owner stalled)
        c.execute("UPDATE jobs SET lease_until = 0")
    b = store.claim("j1", "other-host:2:b")
    assert b is not None and b.gen == a.gen + 1
    with pytest.raises(LeaseLost):
        store.append_log("j1", b"stale\n", 6, fence=a)
    with pytest.raises(LeaseLost):
        store.save(job, fence=a)
    store.append_log("j1", b"fresh\n", 6, fence=b)
    assert store.read_log("j1") == "fresh\n"
    assert store.claim("j1", "host:1:a") is None  # b's lease is live
    store.close()


def test_a_stalled_driver_whose_lease_was_taken_stops_and_doubles_nothing(tmp_path: Path) -> None:
    first = Orchestrator(tmp_path)
    job = first.submit({"name": "two", "command": _printer(400, sleep=0.01)})
    wait_for(lambda: job.logs().count("\n") > 20, 30, what="some lines")
    # The first kernel stalls past its lease; a second takes the job over.
    with first.store._tx() as c:
        c.execute("UPDATE jobs SET lease_until = 0 WHERE id = ?", (job.id,))
    second = Orchestrator(tmp_path)
    try:
        assert second.store.owner(job.id) == second.owner
        final = second.wait(job.id, timeout=90)
        assert final.state is JobState.COMPLETED, final.error
        assert second.job(job.id).log_path.read_text() == _numbered(400)
        wait_for(lambda: job.id not in first._tasks, 15, what="the first kernel to stop driving")
        assert len(second.metrics(job.id)) == 0
        history = [s for s, _, _ in second.store.state_history(job.id)]
        assert history.count("COMPLETED") == 1
    finally:
        second.close()
        first.close()


# --------------------------------------------------------------------------------------------
# item 11: cancel is persisted and honoured by whoever drives the job, in any state
# --------------------------------------------------------------------------------------------


class SlowCreate(LocalProvider):
    """A create call that takes a long time (a cloud provider booting a machine)."""

    async def launch(self, job: Any, bootstrap: Any) -> MachineHandle:
        handle = await super().launch(job, bootstrap)
        await asyncio.sleep(120)
        return handle


def test_cancel_from_another_kernel_interrupts_a_slow_create(tmp_path: Path) -> None:
    first = Orchestrator(tmp_path, providers={"local": SlowCreate})
    try:
        job = first.submit({"name": "slow", "command": py_command(SLEEPER)})
        state_dir = tmp_path / ".trainorch" / "machines" / job.id
        wait_for(lambda: (state_dir / "runner.json").exists(), 30, what="the machine to exist")
        pid = _runner_pid(tmp_path, job.id)
        with orchestrator(tmp_path, reattach=False) as second:
            t0 = time.monotonic()
            second.cancel(job.id)
            assert time.monotonic() - t0 < 5
            final = second.wait(job.id, timeout=30)
            assert final.state is JobState.CANCELLED, final.error
        assert not pid_alive(pid), "the machine made by the interrupted create was left running"
        assert first.reap_list() == []
    finally:
        first.close()


def test_a_cancel_request_survives_a_kernel_restart(tmp_path: Path) -> None:
    first = Orchestrator(tmp_path)
    job = first.submit({"name": "later", "command": py_command(SLEEPER)})
    wait_for(lambda: "up" in job.logs(), 30, what="the command to start")
    first.close()
    store = Store(tmp_path)
    assert store.request_cancel(job.id)
    store.close()
    with orchestrator(tmp_path) as second:
        final = second.wait(job.id, timeout=60)
        assert final.state is JobState.CANCELLED
        assert not pid_alive(int(final.machine_id or -1))


# --------------------------------------------------------------------------------------------
# item 12: re-attach in PROVISIONING after the command already started
# --------------------------------------------------------------------------------------------


def test_reattach_in_provisioning_after_the_start_was_sent(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("input\n")
    code = "import os, time\nprint(open(os.environ['TRAINORCH_INPUT_DIR'] + '/in.txt').read(), flush=True)\ntime.sleep(2)"
    first = Orchestrator(tmp_path)
    job = first.submit({"name": "started", "command": py_command(code), "inputs": [str(data)]})
    wait_for(lambda: job.status is JobState.RUNNING, 30, what="RUNNING")
    first.close()
    # The kernel died between sending the start and recording RUNNING.
    store = Store(tmp_path)
    rec = store.get(job.id)
    rec.state = JobState.PROVISIONING
    store.save(rec)
    store.close()
    with orchestrator(tmp_path) as second:
        final = second.wait(job.id, timeout=60)
        assert final.state is JobState.COMPLETED, final.error
        assert "input" in second.logs(job.id)


# --------------------------------------------------------------------------------------------
# item 13: store hiccups, _finish failures, on_done callbacks off the loop
# --------------------------------------------------------------------------------------------


def test_a_failed_store_write_does_not_fail_a_healthy_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with orchestrator(tmp_path) as orch:
        real = orch.store.append_log
        failures = {"n": 3}

        def flaky(*a: Any, **kw: Any) -> None:
            if failures["n"] > 0:
                failures["n"] -= 1
                raise sqlite3.OperationalError("database is locked")
            real(*a, **kw)

        monkeypatch.setattr(orch.store, "append_log", flaky)
        final = orch.submit({"name": "flaky", "command": _printer(500)}).wait(60)
        assert final.state is JobState.COMPLETED, final.error
        assert failures["n"] == 0
        assert orch.store.read_log(final.id) == _numbered(500)


def test_a_failure_while_ending_a_job_does_not_leave_it_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch_mod.settings, "STORE_RETRY_S", 0.3)
    with orchestrator(tmp_path) as orch:
        real = orch.store.save
        failures = {"n": 6}

        def flaky(job: Any, **kw: Any) -> None:
            if job.state.is_terminal and failures["n"] > 0:
                failures["n"] -= 1
                raise OSError(28, "No space left on device")
            real(job, **kw)

        monkeypatch.setattr(orch.store, "save", flaky)
        job = orch.submit({"name": "endfail", "command": py_command("print(1)")})
        final = job.wait(30)
        assert final.state is JobState.COMPLETED
        # Written to the store once the disk has room again.
        wait_for(lambda: orch.store.get(job.id).state is JobState.COMPLETED, 60, what="the record to be saved")


def test_on_done_callbacks_run_off_the_loop_and_may_wait(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    done = threading.Event()
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "cb", "command": py_command("print(1)")})

        def callback(j: Any) -> None:
            seen["thread"] = threading.current_thread().name
            seen["waited"] = job.wait(5).state  # the sync API works inside a callback
            done.set()

        job.on_done(callback)
        job.wait(30)
        assert done.wait(10), "the callback did not run"
        assert seen["thread"] != "trainorch-orchestrator"
        assert seen["waited"] is JobState.COMPLETED


# --------------------------------------------------------------------------------------------
# item 15: the store is private
# --------------------------------------------------------------------------------------------


def test_the_store_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with orchestrator(tmp_path) as orch:
            final = orch.submit({"name": "priv", "command": _printer(3)}).wait(30)
            assert final.state is JobState.COMPLETED
            root = tmp_path / ".trainorch"
            assert stat.S_IMODE(root.stat().st_mode) == 0o700
            assert stat.S_IMODE((root / "logs").stat().st_mode) == 0o700
            for f in [root / "jobs.db", root / "jobs.db-wal", orch.store.log_path(final.id)]:
                if f.exists():
                    assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        os.umask(old)


# --------------------------------------------------------------------------------------------
# a job driven by another process is followed through the store (a panel beside the server's driver)
# --------------------------------------------------------------------------------------------


def test_events_of_a_job_driven_elsewhere_come_from_the_store(tmp_path: Path) -> None:
    driver = Orchestrator(tmp_path)
    viewer = Orchestrator(tmp_path, reattach=False)
    try:
        job = driver.submit({"name": "elsewhere", "command": _printer(300, sleep=0.01)})
        wait_for(lambda: job.status is JobState.RUNNING, 30, what="RUNNING")
        events: list[Any] = []
        viewer.subscribe(events.append, job.id)
        assert driver.wait(job.id, 60).state is JobState.COMPLETED
        wait_for(lambda: any(e.kind == "state" and e.data.state is JobState.COMPLETED for e in events), 15,
                 what="the end, seen by the viewer")
        shown = "".join(e.data for e in events if e.kind == "log")
        whole = driver.logs(job.id)
        assert shown and whole.endswith(shown)  # every line from the subscription on, in order, once
        assert job.id not in viewer._tasks  # the viewer never drove it
        wait_for(lambda: job.id not in viewer._watchers, 10, what="the watcher to stop")
    finally:
        viewer.close()
        driver.close()
