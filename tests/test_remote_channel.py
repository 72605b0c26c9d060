"""The channel to a remote runner (issue 8 item 2): the real runner serving HTTPS with a job's own key
(``--tls-cert/--tls-key``), the client pinned to that certificate (``trainorch_jupyter.remote``).

A man in the middle presenting another key is refused before the token is sent, and nothing is downloaded;
a plain TCP relay (a provider's port mapping) works; connection cuts are ridden out by the client's retries."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import secrets
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.helpers import CuttingProxy, wait_for
from tests.runner_fixtures import PY, RUNNER_PY, RunningRunner, running, start_runner
from trainorch_jupyter.artifacts import download_manifest
from trainorch_jupyter.model import RunnerError
from trainorch_jupyter.remote import (
    ChannelKeys,
    cert_fingerprint,
    new_channel_keys,
    pinned_ssl_context,
    push_runner,
    runner_http_client,
)
from trainorch_jupyter.runner_client import RunnerClient

JOB_CODE = (
    "import os, time\n"
    "for i in range(300):\n"
    "    print(f'line {i:04d}', flush=True)\n"
    "    if i % 30 == 0: time.sleep(0.1)\n"
    "print('TRAINORCH_METRIC {\"step\": 1}')\n"
    "open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/adapter.bin', 'wb').write(os.urandom(6 << 20))\n"
)
EXPECTED_LOG = "".join(f"line {i:04d}\n" for i in range(300)) + 'TRAINORCH_METRIC {"step": 1}\n'


def _write_keys(directory: Path, keys: ChannelKeys) -> tuple[str, str]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_text(keys.cert_pem)
    key.write_text(keys.key_pem)
    key.chmod(0o600)
    return str(cert), str(key)


@pytest.fixture
def keys() -> ChannelKeys:
    return new_channel_keys()


@pytest.fixture
def tls_runner(tmp_path: Path, keys: ChannelKeys) -> Iterator[RunningRunner]:
    cert, key = _write_keys(tmp_path, keys)
    with running(tmp_path / "state", args=("--tls-cert", cert, "--tls-key", key)) as r:
        yield r


async def _follow(client: RunnerClient) -> bytes:
    """Every log byte, riding out failed calls (a follower retries until the log is complete)."""
    log, offset, failures = b"", 0, 0
    while True:
        try:
            chunk = await client.read_logs(offset, wait=1)
        except RunnerError:
            failures += 1
            assert failures < 200
            await asyncio.sleep(0.05)
            continue
        log, offset = log + chunk.data, chunk.next_offset
        if chunk.complete:
            return log


async def _retrying(what: object, attempts: int = 50) -> object:
    for _ in range(attempts - 1):
        try:
            return await what()  # type: ignore[operator]
        except RunnerError:
            await asyncio.sleep(0.05)
    return await what()  # type: ignore[operator]


# ------------------------------------------------------------------------------------------ key material


def test_channel_keys_are_a_fresh_p256_self_signed_certificate_and_hide_the_key() -> None:
    keys, other = new_channel_keys(), new_channel_keys()
    cert = x509.load_pem_x509_certificate(keys.cert_pem.encode())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=trainorch-runner"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc - datetime.timedelta(days=300)
    assert keys.fingerprint_sha256 == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert keys.fingerprint_sha256 == cert_fingerprint(keys.cert_pem) != other.fingerprint_sha256
    assert keys.key_pem not in repr(keys) and "PRIVATE" not in repr(keys)
    # The short DER form of the key (what stage-0 carries) is the same key.
    short = serialization.load_der_private_key(keys.key_der(), password=None)
    assert isinstance(short, ec.EllipticCurvePrivateKey)
    assert short.public_key().public_numbers() == cert.public_key().public_numbers()
    assert len(keys.key_der()) == 67


def test_pinned_context_trusts_only_that_certificate(keys: ChannelKeys) -> None:
    ctx = pinned_ssl_context(keys.cert_pem)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.cert_store_stats()["x509"] == 1  # that one certificate, no system store


# ------------------------------------------------------------------------------------------ the runner over TLS


def test_a_job_runs_over_the_pinned_channel_and_its_output_is_verified(tls_runner: RunningRunner,
                                                                       keys: ChannelKeys, tmp_path: Path) -> None:
    assert tls_runner.url.startswith("https://")
    data = tmp_path / "in.bin"
    data.write_bytes(secrets.token_bytes(100_000))
    dest = tmp_path / "artifacts" / "j"

    async def drive() -> tuple[bytes, dict, str]:
        async with runner_http_client(keys.cert_pem) as http, RunnerClient(tls_runner.url, tls_runner.token,
                                                                           http=http) as client:
            assert (await client.health())["ok"]
            await client.upload_input("in.bin", data)
            await client.start([PY, "-c", JOB_CODE], max_runtime_s=60)
            log = await _follow(client)
            manifest = await client.manifest()
            assert manifest is not None
            infos = await download_manifest(http, tls_runner.url, headers=client.auth_headers(), manifest=manifest,
                                            dest_dir=dest, job_id="j", metadata={})
            stream = await http.get(tls_runner.url + "/v1/health", headers=client.auth_headers())
            return log, manifest, infos[0].hash_sha256 + str(stream.extensions.get("http_version"))

    log, manifest, digest = asyncio.run(drive())
    assert log.decode() == EXPECTED_LOG
    (entry,) = manifest["files"]
    assert hashlib.sha256((dest / "adapter.bin").read_bytes()).hexdigest() == entry["sha256"]
    assert digest.startswith(entry["sha256"])
    assert (tls_runner.state_dir / "inputs" / "in.bin").read_bytes() == data.read_bytes()


def test_a_client_pinned_to_another_certificate_is_refused(tls_runner: RunningRunner) -> None:
    async def drive() -> None:
        async with runner_http_client(new_channel_keys().cert_pem) as http:
            client = RunnerClient(tls_runner.url, tls_runner.token, http=http)
            with pytest.raises(RunnerError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.health()

    asyncio.run(drive())


def test_plain_http_to_the_tls_runner_gets_no_answer(tls_runner: RunningRunner) -> None:
    with socket.create_connection(("127.0.0.1", tls_runner.port), timeout=10) as s:
        s.sendall(f"GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tls_runner.token}\r\n\r\n".encode())
        answer = b""
        with contextlib.suppress(OSError):
            while block := s.recv(4096):
                answer += block
    assert not answer.startswith(b"HTTP"), answer[:100]


def test_a_tls_handshake_must_finish_within_the_auth_timeout(tmp_path: Path, keys: ChannelKeys) -> None:
    """A silent connection cannot hold a runner thread: it is closed at --auth-timeout, handshake included."""
    cert, key = _write_keys(tmp_path, keys)
    with running(tmp_path / "state", args=("--tls-cert", cert, "--tls-key", key, "--auth-timeout", "0.5")) as r, \
            socket.create_connection(("127.0.0.1", r.port), timeout=20) as s:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
        assert time.monotonic() - started < 15
        with httpx.Client(verify=pinned_ssl_context(keys.cert_pem)) as c:  # the runner still serves
            assert c.get(r.url + "/v1/health", headers=r.headers()).status_code == 200
        # An idle keep-alive TLS connection is closed at --auth-timeout too.
        with socket.create_connection(("127.0.0.1", r.port), timeout=20) as raw, \
                pinned_ssl_context(keys.cert_pem).wrap_socket(raw) as tls:
            tls.sendall(f"GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.token}\r\n\r\n".encode())
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            with contextlib.suppress(OSError):
                while tls.recv(4096):
                    pass
            assert time.monotonic() - started < 15


def test_the_runner_refuses_half_a_tls_configuration_or_a_bad_key(tmp_path: Path, keys: ChannelKeys) -> None:
    cert, key = _write_keys(tmp_path, keys)
    for args in (("--tls-cert", cert), ("--tls-key", key), ("--tls-cert", cert, "--tls-key", cert)):
        runner = start_runner(tmp_path / f"state-{len(args)}-{secrets.token_hex(2)}", args=args, wait=False)
        try:
            assert runner.proc.wait(30) == 2
            assert "refusing to start" in runner.stderr_path.read_text()
        finally:
            runner.stop()


def test_runner_http_client_takes_nothing_from_the_environment(tls_runner: RunningRunner, keys: ChannelKeys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a proxy that does not exist
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")

    async def drive() -> None:
        async with runner_http_client(keys.cert_pem) as http:
            assert "authorization" not in http.headers
            assert (await RunnerClient(tls_runner.url, tls_runner.token, http=http).health())["ok"]

    asyncio.run(drive())
    with pytest.raises(TypeError):
        runner_http_client(keys.cert_pem, verify=False)


# ------------------------------------------------------------------------------------------ in the middle


class RecordingRelay:
    """A loopback TCP relay that keeps every byte the client sent (what anyone on the path sees)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._srv.close()


class TlsInterceptor:
    """A man in the middle: terminates TLS with its own (self-signed) key, reads the plaintext, and forwards it to
    the real runner over a TLS connection of its own. ``plaintext`` is what it read from clients."""

    def __init__(self, tmp: Path, target: tuple[str, int]) -> None:
        self.target = target
        self.plaintext = bytearray()
        self.handshakes_failed = 0
        self.handshakes_done = 0
        cert, key = _write_keys(tmp, new_channel_keys())
        self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_ctx.load_cert_chain(cert, key)
        self._client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._client_ctx.check_hostname = False
        self._client_ctx.verify_mode = ssl.CERT_NONE
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            client = self._server_ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            self.handshakes_failed += 1
            raw.close()
            return
        self.handshakes_done += 1
        upstream = self._client_ctx.wrap_socket(socket.create_connection(self.target, timeout=10))
        # One thread per connection (an SSL socket must not be read and written from two threads at once).
        try:
            while True:
                ready = [s for s in (client, upstream) if s.pending()]
                ready = ready or select.select([client, upstream], [], [], 10)[0]
                if not ready:
                    return
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is client:
                        self.plaintext += data
                        upstream.sendall(data)
                    else:
                        client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self._srv.close()


def test_a_man_in_the_middle_with_another_key_is_refused_and_never_sees_the_token(tls_runner: RunningRunner,
                                                                                  keys: ChannelKeys,
                                                                                  tmp_path: Path) -> None:
    """Issue 8, "how it must be shown": a proxy presenting another key is refused, nothing is downloaded, and the
    token never crosses in clear (the pinned client fails the handshake before it sends a request)."""
    # A finished job whose output the attacker would like to replace.
    with tls_runner.client(verify=pinned_ssl_context(keys.cert_pem)) as c:
        assert c.post("/v1/start", json={"command": [PY, "-c", JOB_CODE]}).status_code == 200
        wait_for(lambda: c.get("/v1/status").json()["state"] == "exited", timeout=60, what="the job to end")
        manifest = c.get("/v1/manifest").json()
    mitm = TlsInterceptor(tmp_path, ("127.0.0.1", tls_runner.port))
    wire = RecordingRelay(("127.0.0.1", mitm.port))  # what crosses the network, before the interceptor
    url = f"https://127.0.0.1:{wire.port}"
    dest = tmp_path / "artifacts" / "j"
    token = tls_runner.token.encode()

    async def pinned() -> None:
        async with runner_http_client(keys.cert_pem) as http:
            client = RunnerClient(url, tls_runner.token, http=http)
            with pytest.raises(RunnerError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.health()
            with pytest.raises(RunnerError):
                await push_runner(http, url, tls_runner.token, RUNNER_PY.read_bytes(), timeout=2)
            with pytest.raises(Exception) as caught:
                await download_manifest(http, url, headers=client.auth_headers(), manifest=manifest, dest_dir=dest,
                                        job_id="j", metadata={})
            assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value) or isinstance(caught.value, RunnerError)

    try:
        asyncio.run(pinned())
        assert mitm.handshakes_failed >= 1 and mitm.handshakes_done == 0
        assert bytes(mitm.plaintext) == b""  # not one byte of a request reached the interceptor in clear
        assert token not in bytes(wire.seen) and len(wire.seen) > 0  # ClientHellos only
        # Nothing downloaded: no adapter, no index; at most the empty ".part" the downloader opened to resume into.
        assert not (dest / "adapter.bin").exists() and not (dest / "trainorch-artifact.json").exists()
        assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) == 0

        # The control: a client that does not pin (verify=False) hands the interceptor the token in clear.
        with httpx.Client(verify=False, timeout=30) as unpinned:
            r = unpinned.get(url + "/v1/health", headers=tls_runner.headers())
            assert r.status_code == 200  # forwarded to the real runner: the MITM works
        assert token in bytes(mitm.plaintext)
    finally:
        wire.close()
        mitm.close()


def test_a_plain_tcp_relay_keeps_the_channel_working_and_pinned(tls_runner: RunningRunner, keys: ChannelKeys) -> None:
    """A provider's port mapping (or any TCP forwarder) is no man in the middle: TLS runs end to end through it."""
    wire = RecordingRelay(("127.0.0.1", tls_runner.port))

    async def drive() -> dict:
        async with runner_http_client(keys.cert_pem) as http:
            return await RunnerClient(f"https://127.0.0.1:{wire.port}", tls_runner.token, http=http).status()

    try:
        assert asyncio.run(drive())["state"] == "idle"
        assert len(wire.seen) > 0 and tls_runner.token.encode() not in bytes(wire.seen)
    finally:
        wire.close()


def test_connection_cuts_are_ridden_out_over_tls(tls_runner: RunningRunner, keys: ChannelKeys,
                                                 tmp_path: Path) -> None:
    """The CuttingProxy closes every connection every 0.15 s: logs lose and double nothing, the download
    resumes and verifies."""
    proxy = CuttingProxy()
    proxy.target = ("127.0.0.1", tls_runner.port)
    url = f"https://127.0.0.1:{proxy.port}"
    dest = tmp_path / "artifacts" / "j"
    stop = threading.Event()

    def cutter() -> None:
        while not stop.wait(0.15):
            proxy.cut()

    async def drive() -> tuple[bytes, dict]:
        async with runner_http_client(keys.cert_pem) as http:
            client = RunnerClient(url, tls_runner.token, http=http)
            await _retrying(lambda: client.start([PY, "-c", JOB_CODE], max_runtime_s=120))
            log = await _follow(client)
            manifest = await _retrying(client.manifest)
            assert isinstance(manifest, dict)
            proxy.delay = 0.002  # a slower link: the 6 MiB download spans several cuts
            await _retrying(lambda: download_manifest(http, url, headers=client.auth_headers(), manifest=manifest,
                                                      dest_dir=dest, job_id="j", metadata={}))
            return log, manifest

    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    try:
        log, manifest = asyncio.run(drive())
    finally:
        stop.set()
        proxy.close()
    assert log.decode() == EXPECTED_LOG
    (entry,) = manifest["files"]
    assert hashlib.sha256((dest / "adapter.bin").read_bytes()).hexdigest() == entry["sha256"]
    assert proxy.cuts > 5 and proxy.accepted > 5


def test_the_runner_serves_tls_on_python_39(tmp_path: Path, keys: ChannelKeys) -> None:
    """runner.py with --tls-cert/--tls-key on the oldest Python it supports (where one is installed)."""
    from tests.test_stage0 import _python

    exe = _python("3.9")
    if exe is None:
        pytest.skip("no Python 3.9 interpreter here")
    cert, key = _write_keys(tmp_path, keys)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    with running(tmp_path / "state", python=exe, env=env, args=("--tls-cert", cert, "--tls-key", key)) as r, \
            httpx.Client(base_url=r.url, headers=r.headers(), verify=pinned_ssl_context(keys.cert_pem)) as c:
        assert c.post("/v1/start", json={"command": [PY, "-c", JOB_CODE]}).status_code == 200
        wait_for(lambda: c.get("/v1/status").json()["state"] == "exited", timeout=60, what="the job to end")
        assert c.get("/v1/logs", params={"offset": 0}).text == EXPECTED_LOG
        (entry,) = c.get("/v1/manifest").json()["files"]
        assert hashlib.sha256(c.get("/v1/files/adapter.bin").content).hexdigest() == entry["sha256"]
        version = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=30).stdout
        assert version.strip() == "(3, 9)"
