"""RunnerClient against a real runner subprocess (and a flaky TCP proxy in front of it for the retries)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.runner_fixtures import PY, RunningRunner, group_pids, running, start_runner
from trainorch_jupyter.model import RunnerError
from trainorch_jupyter.runner_client import LogChunk, MetricsChunk, RunnerClient, RunnerHTTPError


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[RunningRunner]:
    with running(tmp_path / "state") as r:
        yield r


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def wait_exited(client: RunnerClient, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = await client.status()
        if st["state"] == "exited":
            return st
        assert time.monotonic() < deadline, "the command did not exit"
        await asyncio.sleep(0.05)


async def follow_logs(client: RunnerClient, offset: int = 0, limit: int | None = None) -> bytes:
    out = bytearray()
    while True:
        chunk = await client.read_logs(offset, wait=5, limit=limit)
        assert chunk.next_offset == offset + len(chunk.data)
        out += chunk.data
        offset = chunk.next_offset
        if chunk.complete:
            return bytes(out)


class FlakyProxy:
    """TCP proxy to the runner: drops the first ``drop`` connections, answers ``fail503`` with a 503,
    and cuts the first forwarded connection after ``cut_after`` bytes of the answer."""

    def __init__(self, target_port: int, *, drop: int = 0, fail503: int = 0, cut_after: int | None = None) -> None:
        self.target_port = target_port
        self.drop = drop
        self.fail503 = fail503
        self.cut_after = cut_after
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FlakyProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.drop > 0:
                self.drop -= 1
                return
            if self.fail503 > 0:
                self.fail503 -= 1
                await reader.readuntil(b"\r\n\r\n")
                body = b'{"error": "try again later"}'
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                return
            cut, self.cut_after = self.cut_after, None
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None) -> None:
                sent = 0
                try:
                    while True:
                        data = await src.read(65536)
                        if not data:
                            break
                        if limit is not None and sent + len(data) >= limit:
                            dst.write(data[: limit - sent])
                            await dst.drain()
                            break
                        dst.write(data)
                        await dst.drain()
                        sent += len(data)
                finally:
                    dst.close()

            t1 = asyncio.ensure_future(pump(reader, up_writer, None))
            t2 = asyncio.ensure_future(pump(up_reader, writer, cut))
            self._tasks.update((t1, t2))
            await asyncio.wait([t1, t2], return_when=asyncio.FIRST_COMPLETED)
            for t in (t1, t2):
                t.cancel()
            up_writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def proxied(runner: RunningRunner, **kwargs: object) -> AsyncIterator[tuple[FlakyProxy, RunnerClient]]:
    async with FlakyProxy(runner.port, **kwargs) as proxy:  # type: ignore[arg-type]
        client = RunnerClient(proxy.url, runner.token, request_timeout=10)
        try:
            yield proxy, client
        finally:
            await client.aclose()


# ------------------------------------------------------------------------------------ basics


def test_file_url_and_headers() -> None:
    c = RunnerClient("http://127.0.0.1:9/", "s3cret-token")
    try:
        assert c.base_url == "http://127.0.0.1:9"
        assert c.auth_headers() == {"Authorization": "Bearer s3cret-token"}
        assert c.file_url("sub dir/a#b?.json") == "http://127.0.0.1:9/v1/files/sub%20dir/a%23b%3F.json"
        assert c.file_url("../x") == "http://127.0.0.1:9/v1/files/../x"  # quoted as given; the runner refuses it
        assert "s3cret" not in repr(c)
    finally:
        run(c.aclose())
    with pytest.raises(ValueError):
        RunnerClient("http://x", "")


def test_health_status_and_errors_without_token(runner: RunningRunner, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with RunnerClient(runner.url, runner.token) as c:
            assert await c.health() == {"ok": True, "version": "1", "state": "idle", "max_upload_bytes": 64 << 30}
            st = await c.status()
            assert st["state"] == "idle"
            assert await c.wait_ready(timeout=5) == {"ok": True, "version": "1", "state": "idle",
                                                     "max_upload_bytes": 64 << 30}
            with pytest.raises(RunnerHTTPError) as info:
                await c.start([])
            assert info.value.status == 400 and "command" in info.value.error
            for bad in ("..", ".", "a/b", ""):
                with pytest.raises(RunnerError, match="plain file name"):
                    await c.upload_input(bad, Path(__file__))
            res = await c.upload_input("a b%2e.py", Path(__file__))
            assert res["name"] == "a b%2e.py"
            assert (runner.state_dir / "inputs" / "a b%2e.py").read_bytes() == Path(__file__).read_bytes()
        bad_token = "wrong-" + runner.token[:8]
        async with RunnerClient(runner.url, bad_token) as c:
            for call in (c.status(), c.health(), c.read_logs(0, wait=0), c.manifest(), c.cancel()):
                with pytest.raises(RunnerHTTPError) as info:
                    await call
                assert info.value.status == 401 and info.value.error == "unauthorized"
                assert bad_token not in str(info.value) and runner.token not in str(info.value)
            t0 = time.monotonic()
            with pytest.raises(RunnerHTTPError):
                await c.wait_ready(timeout=30)  # a 401 will not heal: no waiting
            assert time.monotonic() - t0 < 10

    run(main())
    assert runner.token not in caplog.text


def test_wait_ready_while_the_runner_starts(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        r = start_runner(tmp_path / "state", port=port, wait=False)
        try:
            async with RunnerClient(f"http://127.0.0.1:{port}", r.token) as c:
                assert (await c.wait_ready(timeout=30, interval=0.05))["ok"] is True
        finally:
            r.stop()
        async with RunnerClient(f"http://127.0.0.1:{port}", r.token) as c:
            t0 = time.monotonic()
            with pytest.raises(RunnerError, match="not ready within") as info:
                await c.wait_ready(timeout=0.6, interval=0.1)
            assert time.monotonic() - t0 < 10
            assert r.token not in str(info.value)

    run(main())


# ------------------------------------------------------------------------------------ a whole job


JOB = (
    "import hashlib, json, os, sys, time\n"
    "data = open(os.path.join(os.environ['TRAINORCH_INPUT_DIR'], 'train.bin'), 'rb').read()\n"
    "print('input sha', hashlib.sha256(data).hexdigest())\n"
    "w = sys.stdout.write\n"
    "for i in range(20000):\n"
    "    w('line %05d\\n' % i)\n"
    "    if i % 4000 == 0:\n"
    "        print('TRAINORCH_METRIC ' + json.dumps({'step': i, 'loss': 1.5}))\n"
    "        sys.stdout.flush(); time.sleep(0.02)\n"
    "print('TRAINORCH_METRIC not json')\n"
    "open(os.path.join(os.environ['TRAINORCH_OUTPUT_DIR'], 'adapter.bin'), 'wb').write(data[:100000])\n"
)


def test_upload_start_follow_and_download(runner: RunningRunner, tmp_path: Path) -> None:
    src = tmp_path / "train.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()

    async def main() -> None:
        async with httpx.AsyncClient() as shared:
            c = RunnerClient(runner.url, runner.token, http=shared)
            assert await c.upload_input("train.bin", src) == {"name": "train.bin", "size": len(payload), "sha256": sha}
            started = await c.start([PY, "-c", JOB], env={"X": "1"}, max_runtime_s=600, grace_s=2)
            assert started["state"] == "running"
            with pytest.raises(RunnerHTTPError) as info:
                await c.start(["true"])
            assert info.value.status == 409
            # follow part of the log on one client, the rest on a fresh one from the last offset
            first = bytearray()
            offset = 0
            for _ in range(3):
                chunk = await c.read_logs(offset, wait=5, limit=4096)
                assert isinstance(chunk, LogChunk) and chunk.data.endswith(b"\n")
                first += chunk.data
                offset = chunk.next_offset
            await c.aclose()
            assert not shared.is_closed  # not ours to close
            async with RunnerClient(runner.url, runner.token) as c2:
                log = bytes(first) + await follow_logs(c2, offset, limit=8192)
                lines = log.decode().splitlines()
                assert lines[0] == f"input sha {sha}"
                plain = [ln for ln in lines if ln.startswith("line ")]
                assert plain == [f"line {i:05d}" for i in range(20000)]
                assert "TRAINORCH_METRIC not json" in lines
                metrics: list[dict] = []
                moffset = 0
                while True:
                    m = await c2.read_metrics(moffset, wait=5)
                    assert isinstance(m, MetricsChunk)
                    metrics += m.metrics
                    moffset = m.next_offset
                    if m.complete:
                        break
                assert metrics == [{"step": i, "loss": 1.5} for i in range(0, 20000, 4000)]
                st = await wait_exited(c2)
                assert st["exit_code"] == 0
                manifest = await c2.manifest()
                assert manifest is not None
                assert manifest["files"] == [{"path": "adapter.bin", "size": 100000,
                                              "sha256": hashlib.sha256(payload[:100000]).hexdigest()}]
                r = await shared.get(c2.file_url("adapter.bin"), headers={**c2.auth_headers(), "Range": "bytes=10-"})
                assert r.status_code == 206 and r.content == payload[10:100000]

    run(main())


def test_manifest_none_while_running_cancel_and_long_poll(runner: RunningRunner) -> None:
    async def main() -> None:
        # request_timeout shorter than the long-poll: the read timeout must still outlast `wait`
        async with RunnerClient(runner.url, runner.token, request_timeout=0.5) as c:
            res = await c.start([PY, "-c", "import time; print('up', flush=True); time.sleep(60)"], grace_s=5)
            assert (await c.read_logs(0, wait=10)).data == b"up\n"
            assert await c.manifest() is None
            t0 = time.monotonic()
            chunk = await c.read_logs(3, wait=1.5)
            assert chunk == LogChunk(data=b"", next_offset=3, complete=False)
            assert time.monotonic() - t0 >= 1.2
            m = await c.read_metrics(0, wait=0.7)
            assert m == MetricsChunk(metrics=[], next_offset=0, complete=False)
            st = await c.cancel(grace_s=2)
            assert st["cancelled"] is True
            st = await wait_exited(c)
            assert st["exit_code"] == -signal.SIGTERM
            assert group_pids(res["pid"]) == []
            assert await c.cancel() == await c.status()  # idempotent
            assert (await c.manifest()) == {"files": [], "total_size": 0, "exit_code": -signal.SIGTERM}
            chunk = await c.read_logs(3, wait=10)
            assert chunk.complete and chunk.data == b""

    run(main())


def test_shutdown(runner: RunningRunner) -> None:
    async def main() -> None:
        async with RunnerClient(runner.url, runner.token) as c:
            await c.start([PY, "-c", "import time; time.sleep(60)"], grace_s=2)
            await c.shutdown()
            assert await asyncio.to_thread(runner.proc.wait, 20) == 0
            with pytest.raises(RunnerError) as info:
                await c.status()
            assert runner.token not in str(info.value)

    run(main())


# ------------------------------------------------------------------------------------ retries


def test_retry_on_dropped_connections_and_503(runner: RunningRunner, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with proxied(runner, drop=2) as (proxy, c):
            assert (await c.status())["state"] == "idle"
            assert proxy.connections == 3
        async with proxied(runner, fail503=1) as (proxy, c):
            assert (await c.health())["ok"] is True
            assert proxy.connections == 2
        async with proxied(runner, drop=1) as (proxy, c):
            assert (await c.cancel(grace_s=1))["state"] == "exited"  # cancel is retried too
        # bounded: a runner that keeps dropping makes the call fail after a few tries
        async with proxied(runner, drop=1000) as (proxy, c):
            t0 = time.monotonic()
            with pytest.raises(RunnerError) as info:
                await c.status()
            assert not isinstance(info.value, RunnerHTTPError)
            assert proxy.connections == 4 and time.monotonic() - t0 < 15
            assert runner.token not in str(info.value)
            assert info.value.__cause__ is None and info.value.__suppress_context__
        async with proxied(runner, fail503=1000) as (proxy, c):
            with pytest.raises(RunnerHTTPError) as info:
                await c.status()
            assert info.value.status == 503 and "try again later" in str(info.value)
            assert proxy.connections == 4

    run(main())
    assert runner.token not in caplog.text


def test_start_is_not_retried(runner: RunningRunner) -> None:
    async def main() -> None:
        async with proxied(runner, drop=1) as (proxy, c):
            with pytest.raises(RunnerError):
                await c.start(["true"])
            assert proxy.connections == 1
            assert (await c.status())["state"] == "idle"

    run(main())


def test_log_read_cut_mid_body_is_retried(runner: RunningRunner) -> None:
    code = "import sys\nfor i in range(3000): sys.stdout.write('row %04d\\n' % i)\n"

    async def main() -> None:
        async with RunnerClient(runner.url, runner.token) as direct:
            await direct.start([PY, "-c", code])
            await wait_exited(direct)
            whole = await direct.read_logs(0, wait=0, limit=20000)
        async with proxied(runner, cut_after=500) as (proxy, c):
            chunk = await c.read_logs(0, wait=0, limit=20000)
            assert chunk == whole and len(chunk.data) > 500
            assert proxy.connections == 2
            assert await follow_logs(c) == b"".join(b"row %04d\n" % i for i in range(3000))

    run(main())


# ------------------------------------------------------------------------------------ untrusted answers (issue 7.16)


def test_upload_over_the_runner_cap_is_a_clear_413(tmp_path: Path) -> None:
    """The runner refuses an input over --max-upload-bytes; the client says so (before sending, as the
    runner advertises its cap) instead of a connection reset after the body was half sent."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3_000_000))
    small = tmp_path / "small.bin"
    small.write_bytes(b"s" * 10)

    async def main(r: RunningRunner) -> None:
        async with RunnerClient(r.url, r.token) as c:
            with pytest.raises(RunnerHTTPError) as info:
                await c.upload_input("big.bin", big)
            assert info.value.status == 413 and "at most 100000 bytes" in str(info.value)
            assert (await c.upload_input("small.bin", small))["size"] == 10

    with running(tmp_path / "state", args=("--max-upload-bytes", "100000")) as r:
        run(main(r))
        assert sorted(p.name for p in (r.state_dir / "inputs").iterdir()) == ["small.bin"]


class ScriptedRunner:
    """A misbehaving runner on loopback: ``answers[path] = (status, headers, body)``; anything else 404."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, dict[str, str], bytes]] = {}
        scripted = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                status, headers, body = scripted.answers.get(self.path.split("?")[0], (404, {}, b"{}"))
                self.send_response(status)
                chunked = "Transfer-Encoding" in headers  # no Content-Length: only reading tells the size
                headers = headers if chunked else {"Content-Length": str(len(body)), **headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(OSError):
                    if not chunked:
                        self.wfile.write(body)
                        return
                    for i in range(0, len(body), 65536):
                        block = body[i : i + 65536]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    self.wfile.write(b"0\r\n\r\n")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def json(self, path: str, obj: object, status: int = 200) -> None:
        self.answers[path] = (status, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[ScriptedRunner]:
    s = ScriptedRunner()
    try:
        yield s
    finally:
        s.close()


def _logs(s: ScriptedRunner, body: bytes, next_offset: str | None, chunked: bool = False) -> None:
    headers = {"X-Log-Complete": "0"}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    if next_offset is not None:
        headers["X-Next-Offset"] = next_offset
    s.answers["/v1/logs"] = (200, headers, body)


def test_log_answers_are_bounded_and_offsets_checked(scripted: ScriptedRunner) -> None:
    async def main() -> None:
        async with RunnerClient(scripted.url, "tok", request_timeout=10) as c:
            _logs(scripted, b"abc\n", "14")
            assert (await c.read_logs(10, wait=0)).next_offset == 14
            for bad in (None, "x", "-3", "9", "13", "15", "100"):  # missing, garbage, backwards, short, beyond
                _logs(scripted, b"abc\n", bad)
                with pytest.raises(RunnerError, match="X-Next-Offset"):
                    await c.read_logs(10, wait=0)
            # More than asked for (or, with no limit, more than the runner's 1 MiB default): refused unread.
            _logs(scripted, b"x" * 2000, "2000")
            with pytest.raises(RunnerError, match="more than the 1000 bytes"):
                await c.read_logs(0, wait=0, limit=1000)
            _logs(scripted, b"x" * ((1 << 20) + 1), str((1 << 20) + 1))
            with pytest.raises(RunnerError, match="more than"):
                await c.read_logs(0, wait=0)
            _logs(scripted, b"x" * (8 << 20), str(8 << 20), chunked=True)  # no size given: cut while reading
            with pytest.raises(RunnerError, match="more than the 1000 bytes"):
                await c.read_logs(0, wait=0, limit=1000)

    run(main())


def test_metrics_answers_are_checked(scripted: ScriptedRunner) -> None:
    async def main() -> None:
        async with RunnerClient(scripted.url, "tok", request_timeout=10) as c:
            good = {"metrics": [{"step": 1}], "next_offset": 10 + len('{"step":1}\n'), "complete": False}
            scripted.json("/v1/metrics", good)
            assert (await c.read_metrics(10, wait=0)).metrics == [{"step": 1}]
            scripted.json("/v1/metrics", {"metrics": [], "next_offset": 10, "complete": True})
            assert (await c.read_metrics(10, wait=0)).complete is True
            bads: list[object] = [
                {"metrics": [{"step": 1}]},  # no next_offset: was a KeyError
                {"metrics": [], "next_offset": "12"},
                {"metrics": [], "next_offset": True},
                {"metrics": [], "next_offset": 5},  # backwards
                {"metrics": [{"step": 1}], "next_offset": 10},  # metrics, but no progress: would repeat them
                {"metrics": [{"step": 1}], "next_offset": 10_000},  # beyond what was sent
            ]
            for bad in bads:
                scripted.json("/v1/metrics", bad)
                with pytest.raises(RunnerError, match="next_offset"):
                    await c.read_metrics(10, wait=0)
            scripted.json("/v1/metrics", {"metrics": [{"k": "v" * 100}] * 50_000, "next_offset": 20})
            with pytest.raises(RunnerError, match="more than"):
                await c.read_metrics(10, wait=0)

    run(main())


def test_status_and_manifest_answers_are_bounded(scripted: ScriptedRunner) -> None:
    def entry(i: int, size: int = 1) -> dict[str, object]:
        return {"path": f"f{i}", "size": size, "sha256": "0" * 64}

    async def main() -> None:
        async with RunnerClient(scripted.url, "tok", request_timeout=10) as c:
            scripted.json("/v1/status", {"state": "running", "error": "e" * (2 << 20)})
            with pytest.raises(RunnerError, match="more than"):
                await c.status()
            scripted.json("/v1/status", ["not", "an", "object"])
            with pytest.raises(RunnerError, match="not an object"):
                await c.status()
            scripted.json("/v1/manifest", {"files": [entry(1, 5), entry(2, 6)], "total_size": 11, "exit_code": 0})
            assert (await c.manifest() or {})["total_size"] == 11
            bads: list[tuple[object, str]] = [
                ({"files": [entry(i) for i in range(100_001)], "total_size": 100_001}, "100001 files"),
                ({"files": [entry(1, 1 << 50)], "total_size": 1 << 50}, "bytes in all"),
                ({"files": [entry(1, 5)], "total_size": 6}, "total_size"),
                ({"files": [entry(1, -1)], "total_size": -1}, "size"),
                ({"files": [{"path": "a", "size": "5"}]}, "size"),
                ({"nofiles": []}, "files"),
            ]
            for bad, match in bads:
                scripted.json("/v1/manifest", bad)
                with pytest.raises(RunnerError, match=match):
                    await c.manifest()
            scripted.answers["/v1/manifest"] = (200, {}, b"[" * (70 << 20))
            with pytest.raises(RunnerError, match="more than"):
                await c.manifest()
            # An error answer is read only so far: its message is cut, the rest is not buffered.
            scripted.answers["/v1/status"] = (400, {}, b"E" * (8 << 20))
            with pytest.raises(RunnerHTTPError) as info:
                await c.status()
            assert info.value.status == 400 and len(info.value.error) <= 500

    run(main())
