"""artifacts: streaming download + verify + atomic placement, over real HTTP on loopback.

``FileServer`` stands in for the runner's ``/v1/files/{path}`` (docs/PROTOCOL.md §2): it serves bytes or files with
Range support and can be told, per path and for its first N requests, to flip one byte, truncate, drop the
connection after N bytes, or ignore Range.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainorch_jupyter import artifacts
from trainorch_jupyter.artifacts import (
    ARTIFACT_INDEX,
    ArtifactMismatch,
    DestinationConflict,
    NotEnoughSpace,
    check_safetensors,
    download_file,
    download_manifest,
    verify_local,
)
from trainorch_jupyter.model import ArtifactInfo, IntegrityError, RunnerError

TOKEN = "s3cr3t-runner-token-do-not-leak"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# The fake runner file server
# --------------------------------------------------------------------------------------------


@dataclass
class Fault:
    corrupt_at: int | None = None  # flip this byte (file offset) in what is sent
    truncate_by: int | None = None  # serve a complete response this many bytes short
    drop_after: int | None = None  # send the full Content-Length header, then only this many body bytes, then close
    ignore_range: bool = False  # answer every request with 200 and the whole file
    status: int | None = None  # answer with this status and a JSON error
    times: int = -1  # how many requests it applies to (-1: all)
    then: Fault | None = None  # the fault for the requests after those


@dataclass
class Seen:
    path: str
    range: str | None
    authorization: str | None
    status: int = 0


@dataclass
class FileServer:
    port: int = 0
    files: dict[str, bytes | Path] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/v1/files/{name}"

    def reset(self) -> None:
        with self.lock:
            self.files.clear()
            self.faults.clear()
            self.requests.clear()

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            fault = self.faults.get(path)
            if fault is None or fault.times == 0:
                return None
            if fault.times > 0:
                fault.times -= 1
                if fault.times == 0 and fault.then is not None:
                    self.faults[path] = fault.then
            return fault

    def file_requests(self, name: str) -> list[Seen]:
        return [r for r in self.requests if r.path == name]


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _error(self, status: int, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._get()

        def _get(self) -> None:
            seen = Seen(path="", range=self.headers.get("Range"), authorization=self.headers.get("Authorization"))
            if not self.path.startswith("/v1/files/"):
                self._error(404, "not found")
                return
            name = unquote(self.path[len("/v1/files/"):].split("?")[0])
            seen.path = name
            with server.lock:
                server.requests.append(seen)
            if seen.authorization != f"Bearer {TOKEN}":
                seen.status = 401
                self._error(401, "unauthorized")
                return
            src = server.files.get(name)
            if src is None:
                seen.status = 404
                self._error(404, "no such file")
                return
            size = src.stat().st_size if isinstance(src, Path) else len(src)
            fault = server.take_fault(name) or Fault()
            if fault.status is not None:
                seen.status = fault.status
                self._error(fault.status, "injected failure")
                return
            start, end = 0, size  # [start, end)
            status = 200
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", seen.range or "")
            if m and not fault.ignore_range:
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
                if start >= size:
                    seen.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            if fault.truncate_by is not None:
                end = max(start, end - fault.truncate_by)
            seen.status = status
            self.send_response(status)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            limit = end - start if fault.drop_after is None else min(end - start, fault.drop_after)
            if isinstance(src, Path) and fault.corrupt_at is None:
                self.wfile.flush()
                with open(src, "rb") as f:
                    if limit:
                        self.connection.sendfile(f, start, limit)
            else:
                pos = start
                stop = start + limit
                with contextlib.ExitStack() as stack:
                    f = stack.enter_context(open(src, "rb")) if isinstance(src, Path) else None
                    while pos < stop:
                        n = min(1 << 16, stop - pos)
                        if f is None:
                            assert isinstance(src, bytes)
                            block = bytearray(src[pos:pos + n])
                        else:
                            f.seek(pos)
                            block = bytearray(f.read(n))
                        if fault.corrupt_at is not None and pos <= fault.corrupt_at < pos + n:
                            block[fault.corrupt_at - pos] ^= 0xFF
                        self.wfile.write(block)
                        pos += n
            if fault.drop_after is not None and limit < end - start:
                self.wfile.flush()
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_WR)
                self.close_connection = True

    return Handler


@pytest.fixture(scope="module")
def file_server() -> Iterator[FileServer]:
    fs = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(fs))
    httpd.daemon_threads = True
    fs.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield fs
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(file_server: FileServer) -> FileServer:
    file_server.reset()
    return file_server


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "_RESUME_BACKOFF_S", 0.0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _fetch(server: FileServer, name: str, data: bytes, dest: Path, **kw: Any) -> Path:
    async with httpx.AsyncClient(timeout=30) as http:
        return await download_file(http, server.url(name), headers=AUTH, name=name, expected_size=len(data),
                                   expected_sha256=sha(data), dest_dir=dest, **kw)


def fetch(server: FileServer, name: str, data: bytes, dest: Path, **kw: Any) -> Path:
    return asyncio.run(_fetch(server, name, data, dest, **kw))


def leftovers(dest: Path) -> list[str]:
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) if dest.exists() else []


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

payloads = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda n, seed: random.Random(seed).randbytes(n), st.integers(0, 1 << 20), st.integers(0, 2**32)),
)
chunk_sizes = st.sampled_from([4096, 65536, 1 << 20])
PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


@PROPS
@given(data=payloads, chunk_size=chunk_sizes)
def test_property_download_is_byte_identical(file_server: FileServer, tmp_path_factory: pytest.TempPathFactory,
                                             data: bytes, chunk_size: int) -> None:
    file_server.reset()
    dest = tmp_path_factory.mktemp("dl")
    file_server.files["f.bin"] = data
    path = fetch(file_server, "f.bin", data, dest, chunk_size=chunk_size)
    assert path == (dest / "f.bin").resolve()
    assert path.read_bytes() == data
    assert sha(path.read_bytes()) == sha(data)
    assert leftovers(dest) == ["f.bin"]


@PROPS
@given(data=payloads.filter(bool), where=st.floats(0, 1, exclude_max=True), chunk_size=chunk_sizes)
def test_property_flipped_byte_is_detected(file_server: FileServer, tmp_path_factory: pytest.TempPathFactory,
                                           data: bytes, where: float, chunk_size: int) -> None:
    file_server.reset()
    dest = tmp_path_factory.mktemp("dl")
    pos = int(where * len(data))
    file_server.files["f.bin"] = data
    file_server.faults["f.bin"] = Fault(corrupt_at=pos)
    with pytest.raises(IntegrityError) as info:
        fetch(file_server, "f.bin", data, dest, chunk_size=chunk_size)
    err = info.value
    assert isinstance(err, ArtifactMismatch)
    bad = bytearray(data)
    bad[pos] ^= 0xFF
    assert err.got_sha256 == sha(bytes(bad)) and err.expected_sha256 == sha(data)
    msg = str(err)
    assert "f.bin" in msg and sha(data) in msg and sha(bytes(bad)) in msg and TOKEN not in msg
    assert len(file_server.file_requests("f.bin")) == 2  # one retry from scratch
    assert all(r.range is None for r in file_server.file_requests("f.bin"))
    assert leftovers(dest) == []


@PROPS
@given(data=payloads.filter(bool), cut=st.floats(0, 1, exclude_max=True), chunk_size=chunk_sizes)
def test_property_truncation_is_detected(file_server: FileServer, tmp_path_factory: pytest.TempPathFactory,
                                         data: bytes, cut: float, chunk_size: int) -> None:
    file_server.reset()
    dest = tmp_path_factory.mktemp("dl")
    by = 1 + int(cut * len(data))  # 1..len(data) bytes short
    file_server.files["f.bin"] = data
    file_server.faults["f.bin"] = Fault(truncate_by=by)
    with pytest.raises(IntegrityError) as info:
        fetch(file_server, "f.bin", data, dest, chunk_size=chunk_size)
    assert "f.bin" in str(info.value) and sha(data) in str(info.value)
    assert len(file_server.file_requests("f.bin")) == 2
    assert leftovers(dest) == []


@PROPS
@given(data=payloads.filter(bool), where=st.floats(0, 1, exclude_max=True))
def test_property_one_bad_transfer_is_retried(file_server: FileServer, tmp_path_factory: pytest.TempPathFactory,
                                              data: bytes, where: float) -> None:
    file_server.reset()
    dest = tmp_path_factory.mktemp("dl")
    file_server.files["f.bin"] = data
    file_server.faults["f.bin"] = Fault(corrupt_at=int(where * len(data)), times=1)
    assert fetch(file_server, "f.bin", data, dest).read_bytes() == data
    assert len(file_server.file_requests("f.bin")) == 2
    assert leftovers(dest) == ["f.bin"]


@PROPS
@given(data=payloads.filter(lambda b: len(b) > 1), where=st.floats(0, 1, exclude_min=True, exclude_max=True),
       ignore_range=st.booleans())
def test_property_dropped_connection_resumes(file_server: FileServer, tmp_path_factory: pytest.TempPathFactory,
                                             data: bytes, where: float, ignore_range: bool) -> None:
    file_server.reset()
    dest = tmp_path_factory.mktemp("dl")
    cut = max(1, min(len(data) - 1, int(where * len(data))))
    file_server.files["f.bin"] = data
    file_server.faults["f.bin"] = Fault(drop_after=cut, times=1, then=Fault(ignore_range=True) if ignore_range else None)
    assert fetch(file_server, "f.bin", data, dest, chunk_size=4096).read_bytes() == data
    reqs = file_server.file_requests("f.bin")
    assert len(reqs) == 2 and reqs[1].range == f"bytes={cut}-" and reqs[1].status == (200 if ignore_range else 206)
    assert leftovers(dest) == ["f.bin"]


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def test_resume_after_dropped_connection_uses_range(server: FileServer, tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 * (1 << 20) + 123)
    server.files["w.bin"] = data
    server.faults["w.bin"] = Fault(drop_after=1_000_000, times=1)
    seen: list[tuple[int, int]] = []
    path = fetch(server, "w.bin", data, tmp_path, chunk_size=65536, progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == data
    reqs = server.file_requests("w.bin")
    assert [r.status for r in reqs] == [200, 206]
    assert reqs[0].range is None
    m = re.fullmatch(r"bytes=(\d+)-", reqs[1].range or "")
    assert m and 0 < int(m.group(1)) <= 1_000_000
    assert seen[-1] == (len(data), len(data))
    assert leftovers(tmp_path) == ["w.bin"]


def test_resume_when_server_ignores_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    data = random.Random(2).randbytes(2 * (1 << 20))
    server.files["w.bin"] = data
    # The first request drops; from then on the server ignores Range.
    server.faults["w.bin"] = Fault(drop_after=700_000, times=1, then=Fault(ignore_range=True))
    assert fetch(server, "w.bin", data, tmp_path).read_bytes() == data
    reqs = server.file_requests("w.bin")
    assert len(reqs) == 2 and reqs[1].range is not None and reqs[1].status == 200


def test_resume_from_part_left_by_an_earlier_call(server: FileServer, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(1 << 20)
    server.files["w.bin"] = data
    (tmp_path / ".w.bin.part").write_bytes(data[:300_000])
    assert fetch(server, "w.bin", data, tmp_path).read_bytes() == data
    assert [r.range for r in server.file_requests("w.bin")] == ["bytes=300000-"]


def test_stale_wrong_part_costs_one_retry_not_a_bad_file(server: FileServer, tmp_path: Path) -> None:
    data = random.Random(4).randbytes(500_000)
    server.files["w.bin"] = data
    (tmp_path / ".w.bin.part").write_bytes(b"\0" * 1000)  # not the file's first bytes
    assert fetch(server, "w.bin", data, tmp_path).read_bytes() == data
    assert [r.range for r in server.file_requests("w.bin")] == ["bytes=1000-", None]


def test_resumes_are_bounded(server: FileServer, tmp_path: Path) -> None:
    data = b"x" * 100_000
    server.files["w.bin"] = data
    server.faults["w.bin"] = Fault(drop_after=0)
    with pytest.raises(RunnerError) as info:
        fetch(server, "w.bin", data, tmp_path)
    assert "w.bin" in str(info.value) and TOKEN not in str(info.value)
    assert len(server.file_requests("w.bin")) == artifacts._MAX_STALLED_RESUMES + 1


def test_transient_5xx_is_retried(server: FileServer, tmp_path: Path) -> None:
    data = b"hello" * 1000
    server.files["w.bin"] = data
    server.faults["w.bin"] = Fault(status=503, times=2)
    assert fetch(server, "w.bin", data, tmp_path).read_bytes() == data
    assert [r.status for r in server.file_requests("w.bin")] == [503, 503, 200]


def test_http_error_is_runner_error_without_secrets(server: FileServer, tmp_path: Path) -> None:
    data = b"abc"
    with pytest.raises(RunnerError) as info:  # not served: 404
        fetch(server, "missing.bin", data, tmp_path)
    assert "404" in str(info.value) and "missing.bin" in str(info.value) and TOKEN not in str(info.value)

    server.files["w.bin"] = data

    async def bad_token() -> None:
        async with httpx.AsyncClient() as http:
            await download_file(http, server.url("w.bin") + "?token=querysecret", headers={"Authorization": "x"},
                                name="w.bin", expected_size=3, expected_sha256=sha(data), dest_dir=tmp_path)

    with pytest.raises(RunnerError) as info:
        asyncio.run(bad_token())
    assert "401" in str(info.value) and "querysecret" not in str(info.value)


def test_server_sending_more_than_the_manifest_is_cut_off(server: FileServer, tmp_path: Path) -> None:
    data = b"a" * 10_000
    server.files["w.bin"] = data + b"extra bytes"
    with pytest.raises(ArtifactMismatch):
        fetch(server, "w.bin", data, tmp_path)
    assert leftovers(tmp_path) == []


def test_existing_verified_file_is_skipped(server: FileServer, tmp_path: Path) -> None:
    data = b"already here"
    (tmp_path / "w.bin").write_bytes(data)
    server.files["w.bin"] = data
    assert fetch(server, "w.bin", data, tmp_path).read_bytes() == data
    assert server.file_requests("w.bin") == []
    (tmp_path / "w.bin").write_bytes(b"already HERE")  # same size, other bytes: not ours to replace...
    with pytest.raises(DestinationConflict, match=r"w\.bin.*--overwrite") as conflict:
        fetch(server, "w.bin", data, tmp_path)
    assert conflict.value.paths == [(tmp_path / "w.bin").resolve()]
    assert (tmp_path / "w.bin").read_bytes() == b"already HERE" and leftovers(tmp_path) == ["w.bin"]
    assert server.file_requests("w.bin") == []  # refused before the first request
    # ... unless the caller says so.
    assert fetch(server, "w.bin", data, tmp_path, overwrite=True).read_bytes() == data
    assert len(server.file_requests("w.bin")) == 1


def test_empty_file(server: FileServer, tmp_path: Path) -> None:
    server.files["empty"] = b""
    assert fetch(server, "empty", b"", tmp_path).read_bytes() == b""


def test_two_concurrent_downloads_of_one_file(server: FileServer, tmp_path: Path) -> None:
    data = random.Random(5).randbytes(2 << 20)
    server.files["w.bin"] = data

    async def both() -> list[Path]:
        return list(await asyncio.gather(_fetch(server, "w.bin", data, tmp_path, chunk_size=4096),
                                         _fetch(server, "w.bin", data, tmp_path, chunk_size=4096)))

    paths = asyncio.run(both())
    assert paths[0] == paths[1] and paths[0].read_bytes() == data
    assert leftovers(tmp_path) == ["w.bin"]


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../evil", "", ".", "a//b", "a/./b", "a\\b",
                                  "C:/x", "nul\0byte", "sub/.x.part", ARTIFACT_INDEX, "a/.."])
def test_bad_names_are_rejected_before_any_write(server: FileServer, tmp_path: Path, name: str) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError):
        fetch(server, name, b"x", dest)
    manifest = {"files": [{"path": "ok.bin", "size": 1, "sha256": sha(b"x")},
                          {"path": name, "size": 1, "sha256": sha(b"x")}]}
    server.files["ok.bin"] = b"x"

    async def go() -> None:
        async with httpx.AsyncClient() as http:
            await download_manifest(http, server.base_url, headers=AUTH, manifest=manifest, dest_dir=dest,
                                    job_id="j", metadata={})

    with pytest.raises(IntegrityError):
        asyncio.run(go())
    assert not dest.exists()
    assert server.requests == []
    assert not (tmp_path / "evil").exists()


def test_symlinked_subdir_is_not_followed(server: FileServer, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    server.files["sub/x"] = b"x"
    with pytest.raises(IntegrityError, match="symlink"):
        fetch(server, "sub/x", b"x", dest)
    assert list(outside.iterdir()) == []


def test_bad_manifest_values_are_rejected(tmp_path: Path) -> None:
    async def go(files: Any) -> None:
        async with httpx.AsyncClient() as http:
            await download_manifest(http, "http://127.0.0.1:9", headers={}, manifest={"files": files},
                                    dest_dir=tmp_path / "d", job_id="j", metadata={})

    for files in (None, [{"path": "a", "size": -1, "sha256": "0" * 64}], [{"path": "a", "size": 1, "sha256": "xyz"}],
                  [{"path": "a", "size": 1, "sha256": "0" * 64}, {"path": "a", "size": 1, "sha256": "0" * 64}],
                  [{"path": "a", "size": 1, "sha256": "0" * 64}, {"path": "a/b", "size": 1, "sha256": "0" * 64}],
                  [{"path": "a", "size": True, "sha256": "0" * 64}]):
        with pytest.raises(IntegrityError):
            asyncio.run(go(files))
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------------------------
# A whole manifest, the index file, verify_local
# --------------------------------------------------------------------------------------------


def _safetensors_bytes(tmp_path: Path) -> bytes:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    p = tmp_path / "src.safetensors"
    save_file({"lora_A.weight": torch.randn(8, 16), "lora_B.weight": torch.zeros(16, 8, dtype=torch.bfloat16)},
              str(p), metadata={"format": "pt"})
    return p.read_bytes()


def test_download_manifest_writes_verified_files_and_index(server: FileServer, tmp_path: Path) -> None:
    files = {
        "adapter_model.safetensors": _safetensors_bytes(tmp_path),
        "adapter_config.json": b'{"r": 8}',
        "checkpoints/step 10/state.bin": random.Random(6).randbytes(70_000),
        "empty.txt": b"",
    }
    server.files.update(files)
    manifest = {"files": [{"path": k, "size": len(v), "sha256": sha(v)} for k, v in sorted(files.items())],
                "total_size": sum(map(len, files.values())), "exit_code": 0}
    dest = tmp_path / "artifacts" / "job-1"
    events: list[tuple[str, int, int]] = []
    meta = {"provider": "local", "provider_job_id": "pid-42", "model": "tiny", "api_key": "NOPE",
            "nested": {"auth_token": "NOPE", "ok": 1}}

    async def go() -> list[ArtifactInfo]:
        async with httpx.AsyncClient() as http:
            return await download_manifest(http, server.base_url + "/", headers=AUTH, manifest=manifest,
                                           dest_dir=dest, job_id="job-1", metadata=meta,
                                           progress=lambda n, d, t: events.append((n, d, t)))

    infos = asyncio.run(go())
    assert [i.name for i in infos] == sorted(files)
    for info in infos:
        assert info.path == (dest / info.name).resolve()
        assert info.path.read_bytes() == files[info.name]
        assert info.hash_sha256 == sha(files[info.name]) and info.size_bytes == len(files[info.name])
        assert info.artifact_id == f"job-1:{info.name}" and info.job_id == "job-1"
        assert info.metadata["verified"] is True
        assert info.metadata["source_url"].startswith(server.base_url + "/v1/files/")
    st_meta = next(i for i in infos if i.name.endswith(".safetensors")).metadata["safetensors"]
    assert st_meta["tensors"] == 2 and "stdlib" in st_meta["checked_by"]
    assert events[-1][0] == "empty.txt" and ("adapter_config.json", 8, 8) in events

    raw = (dest / ARTIFACT_INDEX).read_text()
    assert TOKEN not in raw and "NOPE" not in raw and "Bearer" not in raw
    index = json.loads(raw)
    assert index["job_id"] == "job-1" and index["metadata"]["provider_job_id"] == "pid-42"
    assert index["metadata"]["nested"] == {"ok": 1}
    assert [ArtifactInfo.from_dict(f) for f in index["files"]] == infos
    assert sorted(leftovers(dest)) == sorted([*files, ARTIFACT_INDEX])

    assert verify_local(dest) == infos
    # Moved folder: still verifiable, paths follow.
    moved = tmp_path / "moved"
    dest.rename(moved)
    assert [i.path for i in verify_local(moved)] == [(moved / n).resolve() for n in sorted(files)]

    target = moved / "checkpoints/step 10/state.bin"
    blob = bytearray(target.read_bytes())
    blob[12345] ^= 1
    target.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=r"state\.bin") as info:
        verify_local(moved)
    assert sha(files["checkpoints/step 10/state.bin"]) in str(info.value)
    target.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_local(moved)
    with pytest.raises(IntegrityError, match="no artifact index"):
        verify_local(tmp_path / "nothing")


def test_download_manifest_rejects_malformed_safetensors(server: FileServer, tmp_path: Path) -> None:
    good = _safetensors_bytes(tmp_path)
    bad = good[:-1]  # the trainer wrote a short file: the hash matches, the header check does not
    server.files["adapter_model.safetensors"] = bad
    manifest = {"files": [{"path": "adapter_model.safetensors", "size": len(bad), "sha256": sha(bad)}]}

    async def go() -> None:
        async with httpx.AsyncClient() as http:
            await download_manifest(http, server.base_url, headers=AUTH, manifest=manifest,
                                    dest_dir=tmp_path / "d", job_id="j", metadata={})

    with pytest.raises(IntegrityError, match="safetensors"):
        asyncio.run(go())
    assert not (tmp_path / "d" / ARTIFACT_INDEX).exists()


# --------------------------------------------------------------------------------------------
# Flat memory
# --------------------------------------------------------------------------------------------


def test_memory_stays_flat_for_a_large_file(server: FileServer, tmp_path: Path) -> None:
    size = 256 << 20
    src = tmp_path / "big.src"
    with open(src, "wb") as f:  # sparse: holes read as zeros
        f.truncate(size)
    zeros_sha = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(size >> 20):
        zeros_sha.update(block)
    del block
    server.files["big.bin"] = src
    dest = tmp_path / "dest"

    async def go() -> Path:
        async with httpx.AsyncClient(timeout=60) as http:
            return await download_file(http, server.url("big.bin"), headers=AUTH, name="big.bin",
                                       expected_size=size, expected_sha256=zeros_sha.hexdigest(), dest_dir=dest)

    tracemalloc.start()
    try:
        path = asyncio.run(go())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size == size
    print(f"peak traced memory {peak / (1 << 20):.2f} MiB")
    assert peak < 8 << 20, f"peak traced memory {peak / (1 << 20):.1f} MiB"
    path.unlink()


# --------------------------------------------------------------------------------------------
# safetensors header check
# --------------------------------------------------------------------------------------------


def _st(header: dict[str, Any], payload: bytes, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return len(raw).to_bytes(8, "little") + raw + payload


@pytest.fixture(params=["library", "stdlib"])
def st_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "stdlib":
        monkeypatch.setattr(artifacts, "_lib_safe_open", lambda: None)
    return str(request.param)


def test_safetensors_real_file_passes(tmp_path: Path, st_mode: str) -> None:
    p = tmp_path / "a.safetensors"
    p.write_bytes(_safetensors_bytes(tmp_path))
    check_safetensors(p)
    summary = artifacts._check_safetensors_summary(p)
    assert ("safetensors" in summary["checked_by"]) == (st_mode == "library")
    # Hand-made, padded header, zero-size tensor, sub-byte dtype.
    h = {"__metadata__": {"k": "v"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [8, 8]},
         "b": {"dtype": "U8", "shape": [3], "data_offsets": [8, 11]}}
    p.write_bytes(_st(h, b"\0" * 11, pad=5))
    check_safetensors(p)


@pytest.mark.parametrize("case", ["truncated", "extra", "garbage", "huge_len", "not_json", "gap", "overlap",
                                  "dtype_size", "short", "array_header", "dup_key", "bad_meta", "neg_shape"])
def test_safetensors_malformed_fails(tmp_path: Path, st_mode: str, case: str) -> None:
    good = _safetensors_bytes(tmp_path)
    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    blobs = {
        "truncated": good[:-1],
        "extra": good + b"\0",
        "garbage": os.urandom(64),
        "huge_len": (1 << 40).to_bytes(8, "little") + b"{}",
        "not_json": (5).to_bytes(8, "little") + b"{oops",
        "gap": _st({"a": a, "b": {"dtype": "U8", "shape": [1], "data_offsets": [9, 10]}}, b"\0" * 10),
        "overlap": _st({"a": a, "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8),
        "dtype_size": _st({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "short": b"\x01\x02",
        "array_header": (2).to_bytes(8, "little") + b"[]",
        "dup_key": (lambda raw: len(raw).to_bytes(8, "little") + raw + b"\0" * 8)(
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],'
            b'"data_offsets":[0,8]}}'),
        "bad_meta": _st({"__metadata__": {"k": 1}, "a": a}, b"\0" * 8),
        "neg_shape": _st({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
    }
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blobs[case])
    with pytest.raises(IntegrityError, match=r"bad\.safetensors"):
        check_safetensors(p)


# --------------------------------------------------------------------------------------------
# Against the real runner
# --------------------------------------------------------------------------------------------

RUNNER = ROOT / "trainorch_jupyter" / "runner.py"


def _runner_request(url: str, method: str = "GET", body: Any = None) -> Any:
    with httpx.Client(timeout=10) as http:
        resp = http.request(method, url, headers=AUTH, json=body)
        resp.raise_for_status()
        return resp.json()


@pytest.mark.skipif(not RUNNER.exists(), reason="trainorch_jupyter/runner.py is not written yet (another engineer's part)")
def test_download_manifest_from_real_runner(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "TRAINORCH_RUNNER_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--state-dir", str(state), "--port", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        info_file = state / "runner.json"
        while not info_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"runner did not start: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            time.sleep(0.05)
        url = json.loads(info_file.read_text())["url"]
        script = (
            "import os, pathlib, random\n"
            "out = pathlib.Path(os.environ['TRAINORCH_OUTPUT_DIR'])\n"
            "(out / 'sub').mkdir(parents=True, exist_ok=True)\n"
            "(out / 'adapter_config.json').write_text('{\"r\": 4}')\n"
            "(out / 'sub' / 'blob.bin').write_bytes(random.Random(7).randbytes(3_000_000))\n"
            "(out / 'empty').write_bytes(b'')\n"
        )
        _runner_request(f"{url}/v1/start", "POST", {"command": [sys.executable, "-c", script]})
        while _runner_request(f"{url}/v1/status")["state"] != "exited":
            if time.monotonic() > deadline:
                pytest.fail("the command did not exit")
            time.sleep(0.05)
        manifest = _runner_request(f"{url}/v1/manifest")
        dest = tmp_path / "artifacts" / "job-r"
        # Half of one file is already here from an interrupted earlier download: it resumes with Range.
        (dest / "sub").mkdir(parents=True)
        (dest / "sub" / ".blob.bin.part").write_bytes(random.Random(7).randbytes(3_000_000)[:1_234_567])

        async def go() -> list[ArtifactInfo]:
            async with httpx.AsyncClient(timeout=30) as http:
                return await download_manifest(http, url, headers=AUTH, manifest=manifest, dest_dir=dest,
                                               job_id="job-r", metadata={"provider": "local"},
                                               progress=lambda n, done, t: events.append((n, done)))

        events: list[tuple[str, int]] = []
        infos = asyncio.run(go())
        # The runner answered the Range request with 206: no byte before the resume point was fetched again.
        assert min(done for n, done in events if n == "sub/blob.bin") > 1_234_567
        assert sorted(i.name for i in infos) == ["adapter_config.json", "empty", "sub/blob.bin"]
        assert (dest / "sub" / "blob.bin").read_bytes() == random.Random(7).randbytes(3_000_000)
        assert verify_local(dest) == infos
        assert TOKEN not in (dest / ARTIFACT_INDEX).read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# Read size and batching (the throughput levers; benchmarks/bench_download.py measures them)
# --------------------------------------------------------------------------------------------


def test_larger_reads_apply_to_the_download_connection_and_are_put_back(server: FileServer, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import httpcore

    data = random.Random(8).randbytes(3 << 20)
    server.files["w.bin"] = data
    seen: list[Any] = []
    real = artifacts._larger_reads

    @contextlib.contextmanager
    def spy(resp: httpx.Response) -> Iterator[None]:
        conn = artifacts._h11_connection(resp)
        assert isinstance(conn, httpcore.AsyncHTTP11Connection)
        with real(resp):
            seen.append(conn.READ_NUM_BYTES)
            yield
        seen.append((conn.READ_NUM_BYTES, "READ_NUM_BYTES" in vars(conn)))

    monkeypatch.setattr(artifacts, "_larger_reads", spy)
    assert fetch(server, "w.bin", data, tmp_path).read_bytes() == data
    assert seen == [artifacts._READ_SIZE, (httpcore.AsyncHTTP11Connection.READ_NUM_BYTES, False)]
    assert artifacts._READ_SIZE > httpcore.AsyncHTTP11Connection.READ_NUM_BYTES


def test_other_transports_are_left_alone_and_small_chunks_are_batched(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(3 * (1 << 20) + 17)
    requests: list[httpx.Request] = []

    class Pieces(httpx.AsyncByteStream):
        async def __aiter__(self) -> Any:
            for i in range(0, len(data), 1000):  # many small chunks: several go into one batch
                yield data[i:i + 1000]

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=Pieces())

    async def go() -> Path:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            async with http.stream("GET", "http://runner/v1/files/m.bin") as resp:
                assert artifacts._h11_connection(resp) is None
            return await download_file(http, "http://runner/v1/files/m.bin", headers=AUTH, name="m.bin",
                                       expected_size=len(data), expected_sha256=sha(data), dest_dir=tmp_path,
                                       chunk_size=1 << 20)

    assert asyncio.run(go()).read_bytes() == data
    assert requests[-1].headers["Authorization"] == AUTH["Authorization"]
    assert leftovers(tmp_path) == ["m.bin"]


# --------------------------------------------------------------------------------------------
# Destinations: a download never replaces a file it did not place (issue 7 items 1 and 16), with the real runner
# --------------------------------------------------------------------------------------------

CARD = b"# model card written by the job\n"
ADAPTER = random.Random(11).randbytes(300_000)
NOTES = b"notes from the job\n"
JOB_FILES = {"README.md": CARD, "adapter.bin": ADAPTER, "sub/notes.txt": NOTES}
WRITE_JOB_FILES = (
    "import os, pathlib, random\n"
    "out = pathlib.Path(os.environ['TRAINORCH_OUTPUT_DIR'])\n"
    "(out / 'sub').mkdir(parents=True, exist_ok=True)\n"
    f"(out / 'README.md').write_bytes({CARD!r})\n"
    "(out / 'adapter.bin').write_bytes(random.Random(11).randbytes(300_000))\n"
    f"(out / 'sub' / 'notes.txt').write_bytes({NOTES!r})\n"
)


@dataclass
class ServedJob:
    url: str
    token: str
    manifest: dict[str, Any]

    def download(self, dest: Path, *, job_id: str = "job-d", **kw: Any) -> list[ArtifactInfo]:
        async def go() -> list[ArtifactInfo]:
            async with httpx.AsyncClient(timeout=30) as http:
                return await download_manifest(http, self.url, headers={"Authorization": f"Bearer {self.token}"},
                                               manifest=self.manifest, dest_dir=dest, job_id=job_id,
                                               metadata={"provider": "local"}, **kw)

        return asyncio.run(go())


@pytest.fixture(scope="module")
def served_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedJob]:
    """A real runner whose command wrote JOB_FILES and exited: it serves its manifest and files."""
    from tests.runner_fixtures import py_command, running, wait_exited

    with running(tmp_path_factory.mktemp("served") / "state") as runner, runner.client() as client:
        assert client.post("/v1/start", json={"command": py_command(WRITE_JOB_FILES)}).status_code in (200, 201, 202)
        wait_exited(client)
        manifest = client.get("/v1/manifest").json()
        assert sorted(f["path"] for f in manifest["files"]) == sorted(JOB_FILES)
        yield ServedJob(runner.url, runner.token, manifest)


def tree(dest: Path) -> dict[str, bytes]:
    """Every file under ``dest`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


def test_a_users_folder_is_checked_before_the_first_byte(served_job: ServedJob, tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    (dest / "sub").mkdir(parents=True)
    (dest / "README.md").write_bytes(b"my own notes, not the job's\n")  # the user's file: never replaced silently
    (dest / "sub" / "notes.txt").write_bytes(NOTES)  # byte-identical to the job's: fine
    (dest / "keep.txt").write_bytes(b"unrelated")  # not in the manifest: never touched
    before = tree(dest)
    with pytest.raises(DestinationConflict) as info:
        served_job.download(dest, own_folder=False)
    assert info.value.differing == [(dest / "README.md").resolve()] and info.value.blocked == []
    msg = str(info.value)
    assert "README.md" in msg and "--overwrite" in msg and "overwrite=True" in msg and "nothing was written" in msg
    assert "notes.txt" not in msg and "\n" not in msg
    assert tree(dest) == before  # not one byte: no adapter.bin, no .part, no index

    infos = served_job.download(dest, own_folder=False, overwrite=True)
    assert {i.name: i.path.read_bytes() for i in infos} == JOB_FILES
    assert (dest / "keep.txt").read_bytes() == b"unrelated"
    # Idempotent: everything already there is identical (the index too, though its date differs).
    again = served_job.download(dest, own_folder=False)
    assert [i.hash_sha256 for i in again] == [i.hash_sha256 for i in infos]
    assert verify_local(dest) == again
    assert sorted(tree(dest)) == sorted([*JOB_FILES, "keep.txt", ARTIFACT_INDEX])


def test_an_index_of_another_job_or_the_users_is_a_conflict(served_job: ServedJob, tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    served_job.download(dest, own_folder=False, job_id="job-a")
    with pytest.raises(DestinationConflict) as info:  # the same files, but another job's download into it
        served_job.download(dest, own_folder=False, job_id="job-b")
    assert info.value.differing == [(dest / ARTIFACT_INDEX)]
    assert json.loads((dest / ARTIFACT_INDEX).read_text())["job_id"] == "job-a"
    (dest / ARTIFACT_INDEX).write_text("my own file that happens to have this name")
    with pytest.raises(DestinationConflict, match=ARTIFACT_INDEX):
        served_job.download(dest, own_folder=False, job_id="job-a")
    assert (dest / ARTIFACT_INDEX).read_text() == "my own file that happens to have this name"


def test_folders_and_special_files_are_never_replaced(served_job: ServedJob, tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    (dest / "README.md").mkdir(parents=True)  # a folder where the job has a file
    (dest / "sub").write_bytes(b"a file where the job has a folder")
    before = tree(dest)
    for overwrite in (False, True):
        with pytest.raises(DestinationConflict) as info:
            served_job.download(dest, own_folder=False, overwrite=overwrite)
        assert sorted(info.value.blocked) == sorted([(dest / "README.md").resolve(), (dest / "sub").resolve()])
        assert "move it away" in str(info.value)
    assert tree(dest) == before and (dest / "README.md").is_dir()
    file_dest = tmp_path / "a-file"
    file_dest.write_bytes(b"x")
    with pytest.raises(DestinationConflict):
        served_job.download(file_dest, own_folder=False, overwrite=True)
    assert file_dest.read_bytes() == b"x"


def test_the_jobs_own_folder_replaces_only_the_files_of_its_manifest(served_job: ServedJob, tmp_path: Path) -> None:
    dest = tmp_path / "artifacts" / "job-d"
    served_job.download(dest)
    (dest / "adapter.bin").write_bytes(b"damaged")  # its own file, damaged: a re-download replaces it
    (dest / "mine.txt").write_bytes(b"a user's file in the job's folder")  # not in the manifest: left alone
    infos = served_job.download(dest)
    assert {i.name: i.path.read_bytes() for i in infos} == JOB_FILES
    assert (dest / "mine.txt").read_bytes() == b"a user's file in the job's folder"


def test_free_space_is_checked_before_the_first_byte(served_job: ServedJob, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    real_disk_usage = shutil.disk_usage
    total = sum(map(len, JOB_FILES.values()))
    assert served_job.manifest["total_size"] == total
    seen: list[Path] = []

    def disk_usage(path: Any) -> Any:
        seen.append(Path(path))
        usage = real_disk_usage(path)
        return type(usage)(usage.total, usage.used, 1000)  # 1000 bytes free on that filesystem

    monkeypatch.setattr(artifacts.shutil, "disk_usage", disk_usage)
    dest = tmp_path / "new" / "folder"
    with pytest.raises(NotEnoughSpace) as info:
        served_job.download(dest)
    assert (info.value.needed, info.value.free) == (total, 1000)
    assert f"needs {total} bytes" in str(info.value) and "1000 bytes" in str(info.value)
    assert seen and seen[0] == tmp_path  # the nearest existing folder of the destination
    assert not (tmp_path / "new").exists()  # nothing was created

    # What is already there (identical) needs no space; what .part files hold is not fetched again.
    monkeypatch.undo()
    served_job.download(dest)
    (dest / "adapter.bin").unlink()
    (dest / ".adapter.bin.part").write_bytes(ADAPTER[: len(ADAPTER) - 500])
    monkeypatch.setattr(artifacts.shutil, "disk_usage", disk_usage)
    infos = served_job.download(dest)  # needs 500 bytes: fits in 1000
    assert {i.name: i.path.read_bytes() for i in infos} == JOB_FILES


def test_untrusted_manifests_are_bounded(served_job: ServedJob, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    good = served_job.manifest
    dest = tmp_path / "d"
    bad_total = {**good, "total_size": good["total_size"] + 1}
    with pytest.raises(IntegrityError, match="total_size"):
        artifacts.manifest_entries(bad_total)
    long_name = {"files": [{"path": "x" * 256, "size": 0, "sha256": sha(b"")}]}
    with pytest.raises(IntegrityError, match="longer than"):
        artifacts.manifest_entries(long_name)
    deep = {"files": [{"path": "/".join(["d" * 200] * 21), "size": 0, "sha256": sha(b"")}]}
    with pytest.raises(IntegrityError, match="longer than"):
        artifacts.manifest_entries(deep)
    monkeypatch.setattr(artifacts, "MAX_MANIFEST_FILES", 2)
    with pytest.raises(IntegrityError, match="lists 3 files"):
        served_job.download(dest)
    assert not dest.exists()
    monkeypatch.undo()
    many = {"files": [{"path": f"f{i}", "size": 0, "sha256": sha(b"")} for i in range(artifacts.MAX_MANIFEST_FILES + 1)]}
    with pytest.raises(IntegrityError, match="more than"):
        artifacts.manifest_entries(many)
    for bad in (bad_total, long_name):  # refused by download_manifest before anything is written
        with pytest.raises(IntegrityError):
            ServedJob(served_job.url, served_job.token, bad).download(dest)
    assert not dest.exists()


def test_job_download_to_a_folder_never_replaces_a_users_file(tmp_path: Path) -> None:
    """Issue 7 item 1 as a new user met it: ``--to mine`` replaced ``mine/README.md`` (their notes)."""
    from tests.helpers import orchestrator, py_command
    from trainorch_jupyter.model import JobState

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_bytes(b"my own notes\n")
    with orchestrator(tmp_path / "ws") as orch:
        job = orch.submit({"name": "card", "auto_download": False, "command": py_command(WRITE_JOB_FILES)})
        assert job.wait(60).state is JobState.COMPLETED
        own = tmp_path / "ws" / "artifacts" / job.id
        with pytest.raises(DestinationConflict, match=r"README\.md.*--overwrite"):
            job.download(mine).result(60)
        assert tree(mine) == {"README.md": b"my own notes\n"}
        assert not own.exists()  # refused before the first byte was fetched, anywhere

        infos = job.download(mine, overwrite=True).result(60)
        assert {i.name: i.path.read_bytes() for i in infos} == JOB_FILES
        assert all(i.path.parent.is_relative_to(mine) for i in infos)
        assert tree(own).keys() == {*JOB_FILES, ARTIFACT_INDEX}  # the workspace keeps the original
        assert [a.name for a in job.record.artifacts] == sorted(JOB_FILES)
        assert job.download(mine).result(60) == infos  # idempotent: identical files are fine

        # From the local copy too (no runner involved now): the user's edit is not replaced silently.
        (mine / "sub" / "notes.txt").write_bytes(b"edited by the user\n")
        with pytest.raises(DestinationConflict, match=r"notes\.txt"):
            job.download(mine).result(60)
        assert (mine / "sub" / "notes.txt").read_bytes() == b"edited by the user\n"

        # The job's own folder: its damaged file is fetched again, a file of the user's there is left alone.
        (own / "adapter.bin").write_bytes(b"damaged")
        (own / "mine.txt").write_bytes(b"not the job's")
        again = job.download().result(60)
        assert {i.name: i.path.read_bytes() for i in again} == JOB_FILES
        assert (own / "mine.txt").read_bytes() == b"not the job's"


def test_seed_api_download_artifact_never_replaces_a_file_in_output_dir(tmp_path: Path) -> None:
    from tests.helpers import orchestrator, py_command
    from trainorch_jupyter.compat import TrainingConfig, TrainingOrchestrator

    out = tmp_path / "output"
    out.mkdir()
    (out / "adapter.bin").write_bytes(b"the adapter of an earlier run")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "x"}\n')
    with orchestrator(tmp_path / "ws") as orch:
        facade = TrainingOrchestrator(orch)
        facade.create_job(TrainingConfig(job_id="seed", model_name="tiny", dataset_path=str(data),
                                         output_dir=str(out)))
        # A command job stands in for the training run (the download path is the same).
        job = orch.submit({"name": "seed", "command": py_command(WRITE_JOB_FILES)})
        facade._ids["seed"] = job.id
        job.wait(60)
        with pytest.raises(DestinationConflict, match=r"adapter\.bin"):
            asyncio.run(facade.download_artifact("seed"))
        assert tree(out) == {"adapter.bin": b"the adapter of an earlier run"}
        info = asyncio.run(facade.download_artifact("seed", overwrite=True))
        assert (out / "adapter.bin").read_bytes() == ADAPTER and info.path.parent == out.resolve()
