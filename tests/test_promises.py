"""README promises at the orchestrator level, each on the real runner subprocess (local provider) — issue 7 item 22.

- a provider loaded through the entry-point group ``trainorch_jupyter.providers`` (a third-party dist-info on
  ``sys.path``), and a broken plugin ignored with a warning naming it;
- the unreachable window (``Orchestrator.unreachable_timeout_s``, 3 minutes by default, shrunk here): a runner
  that stops answering for less is ridden out with no line lost, for more the job fails with a clear message;
- a file whose bytes change after the runner hashed it: the job ends FAILED with an integrity error naming the
  file and both hashes, and nothing of it is left in place;
- ``TRAINORCH_WEBHOOK_URL`` from the environment: a local HTTP server receives the post.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trainorch_jupyter.model import JobState
from trainorch_jupyter.orchestrator import Event
from trainorch_jupyter.providers import available_providers

from .helpers import CuttingProxy, orchestrator, pid_alive, py_command, runner_pid, wait_for
from .test_orchestrator import ProxiedLocal

# --------------------------------------------------------------------------------------------
# A provider from a third-party package, through the entry-point group
# --------------------------------------------------------------------------------------------

PLUGIN = textwrap.dedent("""
    from trainorch_jupyter.providers.local import LocalProvider

    LAUNCHED = []


    class PluggedProvider(LocalProvider):
        '''A third party's provider: the local one under another name, counting its launches.'''

        name = "plugged"

        async def launch(self, job, bootstrap):
            LAUNCHED.append(job.id)
            return await super().launch(job, bootstrap)
""")


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Two installed distributions on sys.path: one with a working provider, one whose module fails to import.
    Yields the working plugin's module name."""
    site = tmp_path / "site"
    site.mkdir()
    tag = f"{os.getpid()}_{time.monotonic_ns()}"
    good, bad = f"trainorch_plugin_good_{tag}", f"trainorch_plugin_bad_{tag}"
    (site / f"{good}.py").write_text(PLUGIN)
    (site / f"{bad}.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    for dist, group_lines in ((f"plugin-good-{tag}", f"plugged = {good}:PluggedProvider"),
                              (f"plugin-bad-{tag}", f"shaky = {bad}:ShakyProvider")):
        info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[trainorch_jupyter.providers]\n{group_lines}\n")
    monkeypatch.syspath_prepend(str(site))  # also invalidates the import caches
    try:
        yield good
    finally:
        sys.modules.pop(good, None)
        sys.modules.pop(bad, None)


def test_a_provider_from_the_entry_point_group_runs_a_job(tmp_path: Path, plugins: str) -> None:
    found = available_providers()
    assert found["plugged"].__module__ == plugins and "local" in found
    assert "shaky" not in found  # the broken plugin is left out; the others still load
    workspace = tmp_path / "ws"
    with orchestrator(workspace) as orch:  # no providers= here: only what the entry points give
        assert {"local", "plugged"} <= set(orch.provider_names) and "shaky" not in orch.provider_names
        job = orch.submit({"name": "plugged", "provider": "plugged", "command": py_command(
            "import os; print('hello from the plugin'); "
            "open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/out.txt', 'w').write('ok')")})
        final = job.wait(60)
        assert final.state is JobState.COMPLETED, final.error
        assert final.provider == "plugged" and orch.jobs(provider="plugged")[0].id == job.id
        assert sys.modules[plugins].LAUNCHED == [job.id]  # type: ignore[attr-defined]
        assert job.logs() == "hello from the plugin\n"
        assert [a.name for a in final.artifacts] == ["out.txt"]
        assert not pid_alive(runner_pid(final))


def test_a_broken_plugin_is_named_in_a_warning(plugins: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        found = available_providers()
    assert "plugged" in found and "shaky" not in found
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("shaky" in m and "broken on purpose" in m for m in warnings), warnings


# --------------------------------------------------------------------------------------------
# The unreachable window
# --------------------------------------------------------------------------------------------

def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connections are refused at once
    return port


def _numbered(n: int) -> bytes:
    return "".join(f"line {i:05d}\n" for i in range(n)).encode()


SLOW_LINES = "import time\nfor i in range(600):\n    print(f'line {i:05d}', flush=True)\n    time.sleep(0.02)\n"
SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(600)"


def test_a_runner_silent_for_less_than_the_window_is_ridden_out(tmp_path: Path) -> None:
    """Frozen (SIGSTOP) for a while, then unreachable (connections refused, well past the client's own few
    retries) for a while: each shorter than the window, so the job goes on and its log is whole."""
    proxy = CuttingProxy()
    ProxiedLocal.proxy = proxy
    try:
        with orchestrator(tmp_path, providers={"local": ProxiedLocal}) as orch:
            orch.unreachable_timeout_s = 20.0
            job = orch.submit({"name": "blips", "command": py_command(SLOW_LINES)})
            wait_for(lambda: "line 00050" in job.logs(), timeout=60, what="the first lines")
            pid = runner_pid(job.record)
            os.kill(pid, signal.SIGSTOP)  # the machine freezes: connections open, nothing answers
            try:
                time.sleep(2.0)
            finally:
                os.kill(pid, signal.SIGCONT)
            real = proxy.target
            proxy.target = ("127.0.0.1", _dead_port())  # then the network goes: every connection refused
            proxy.cut()
            time.sleep(5.0)
            assert not job.status.is_terminal
            proxy.target = real
            final = job.wait(90)
            assert final.state is JobState.COMPLETED, final.error
            got = job.log_path.read_bytes()
            assert got == _numbered(600), f"{len(got)} bytes, {len(got.splitlines())} lines"
    finally:
        proxy.close()


def test_a_runner_unreachable_for_longer_than_the_window_fails_the_job(tmp_path: Path) -> None:
    proxy = CuttingProxy()
    ProxiedLocal.proxy = proxy
    try:
        with orchestrator(tmp_path, providers={"local": ProxiedLocal}) as orch:
            orch.unreachable_timeout_s = 3.0
            job = orch.submit({"name": "lost", "command": py_command(SLEEPER)})
            wait_for(lambda: job.status is JobState.RUNNING and "up" in job.logs(), timeout=60, what="running")
            command_pid = int(json.loads((tmp_path / ".trainorch" / "machines" / job.id / "status.json").read_text())["pid"])
            proxy.target = ("127.0.0.1", _dead_port())
            proxy.cut()
            t0 = time.monotonic()
            final = job.wait(170)
            took = time.monotonic() - t0
    finally:
        proxy.close()
    assert final.state is JobState.FAILED
    assert "unreachable for" in (final.error or ""), final.error
    assert took < 120  # the shrunk window (plus retries and the terminate) was used, not the default 180 s
    assert not pid_alive(runner_pid(final))  # the machine was terminated: nothing left billing
    assert not pid_alive(command_pid)


@pytest.mark.slow
def test_a_frozen_runner_fails_the_job_soon_after_the_window(tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        orch.unreachable_timeout_s = 5.0
        job = orch.submit({"name": "frozen", "command": py_command(SLEEPER)})
        wait_for(lambda: job.status is JobState.RUNNING and "up" in job.logs(), timeout=60, what="running")
        pid = runner_pid(job.record)
        os.kill(pid, signal.SIGSTOP)
        try:
            # One long poll may be in flight when the runner freezes (the client waits up to 35 s for its answer):
            # allow that, the window, the terminate (a frozen runner takes its 15 s grace before SIGKILL) and slack.
            final = orch.wait(job.id, timeout=5.0 + 40.0 + 20.0 + 10.0)
        finally:
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
            if not job.status.is_terminal:
                job.cancel()
                job.wait(60)
    assert final.state is JobState.FAILED
    assert "unreachable" in (final.error or ""), final.error


# --------------------------------------------------------------------------------------------
# A file that changed after the runner hashed it
# --------------------------------------------------------------------------------------------

WRITE_FILES = ("import os\nout = os.environ['TRAINORCH_OUTPUT_DIR']\n"
               "open(out + '/adapter.bin', 'wb').write(bytes(range(256)) * 4096)\n"
               "open(out + '/notes.txt', 'w').write('fine')\n")


def test_a_file_corrupted_after_the_manifest_fails_the_job_naming_it_and_both_hashes(tmp_path: Path) -> None:
    seen: dict[str, str] = {}

    def corrupt_on_download(event: Event) -> None:
        # Runs on the orchestrator's loop as the job enters DOWNLOADING: the runner has hashed its output (the
        # manifest is final) and no byte was fetched yet.
        if event.kind != "state" or event.data.state is not JobState.DOWNLOADING:
            return
        state_dir = tmp_path / ".trainorch" / "machines" / event.job_id
        manifest = json.loads((state_dir / "manifest.json").read_text())
        seen["expected"] = next(f["sha256"] for f in manifest["files"] if f["path"] == "adapter.bin")
        target = state_dir / "output" / "adapter.bin"
        data = bytearray(target.read_bytes())
        data[123_456] ^= 0xFF  # one bit flipped on the machine's disk: same size, other bytes
        target.write_bytes(bytes(data))
        seen["got"] = hashlib.sha256(data).hexdigest()

    with orchestrator(tmp_path) as orch:
        orch.subscribe(corrupt_on_download)
        job = orch.submit({"name": "rot", "command": py_command(WRITE_FILES)})
        final = job.wait(90)
    assert seen["expected"] == hashlib.sha256(bytes(range(256)) * 4096).hexdigest() != seen["got"]
    assert final.state is JobState.FAILED, final.error
    error = final.error or ""
    assert "adapter.bin" in error and seen["expected"] in error and seen["got"] in error, error
    dest = tmp_path / "artifacts" / job.id
    assert not (dest / "adapter.bin").exists() and not list(dest.glob(".*.part"))  # nothing wrong left in place
    assert final.artifacts == []
    assert not pid_alive(runner_pid(final))


# --------------------------------------------------------------------------------------------
# TRAINORCH_WEBHOOK_URL
# --------------------------------------------------------------------------------------------


def test_webhook_url_from_the_environment_gets_the_post(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    posts: list[tuple[str, dict[str, Any]]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret_path = "/services/T000/B000/hooksecret" + "9" * 16  # a Slack-like URL is a secret of sorts
    monkeypatch.setenv("TRAINORCH_WEBHOOK_URL", f"http://127.0.0.1:{server.server_address[1]}{secret_path}")
    code = "import os\nprint(os.environ.get('TRAINORCH_WEBHOOK_URL', 'absent'))\nraise SystemExit(4)"
    try:
        with orchestrator(tmp_path) as orch:  # no webhook_url=: the environment's
            final = orch.submit({"name": "envhook", "command": py_command(code)}).wait(60)
            wait_for(lambda: posts, timeout=15, what="the webhook post")
    finally:
        server.shutdown()
    assert final.state is JobState.FAILED and final.exit_code == 4
    ((path, body),) = posts
    assert path == secret_path
    assert body["job_id"] == final.id and body["state"] == "FAILED"
    assert final.id in body["text"] and "exited with code 4" in body["text"]
    assert orch.logs(final.id) == "absent\n"  # the job never sees the URL
    for file in (tmp_path / ".trainorch").rglob("*"):
        if file.is_file():
            assert b"hooksecret" not in file.read_bytes(), file
