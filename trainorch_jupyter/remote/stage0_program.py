"""Stage-0: the program a remote machine's start command runs (stdlib only, Python 3.9+, like runner.py).

The package never imports it: ``trainorch_jupyter.remote.stage0`` ships its source (docstrings, comments and
annotations dropped, names shortened; zlib + base64) inside the start command, followed by one ``main(...)``
call that holds this job's settings; the dead-man hook comes base64-encoded as the command's second word. Kept small on purpose (the whole command must fit in 3,500 characters), so it speaks just
enough HTTP/1.1 for its two requests, one request per connection:

- every request needs ``Authorization: Bearer <token>``, else ``401`` (and the connection is closed);
- ``GET /v1/health`` -> ``{"ok": true, "stage": 0}``;
- ``PUT /v1/runner`` (``Content-Length`` required, at most 16 MiB) -> ``200 {"ok": true}`` when the body's
  SHA-256 is the expected one: the runner is written, the listener closed, and the runner ``exec``ed in this
  process (same pid) on the same port with the same certificate. Else ``400``, and it keeps waiting;
- anything else -> ``404``; once the runner is written, every request -> ``503``.

After an answer that may have left a body unread, it reads and drops some (at most 16 MiB, 2 s per read), so
that a client still sending reads the answer instead of a connection reset.

The TLS handshake and the request run in a thread per connection, under a 20 s socket timeout. With no
authenticated request for ``idle`` seconds it exits and runs the ``--on-exit`` hook (reason
``idle-before-start``), as the runner would: the dead-man switch covers stage-0 too. See ``docs/PROTOCOL.md``
section 4.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any

PUSHED = b'{"ok": true}'


def write(path: str, data: bytes) -> None:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)


def pem(der: str) -> str:
    return ssl.DER_cert_to_PEM_cert(base64.b64decode(der))


class Stage0:
    def __init__(self, context: ssl.SSLContext, token: str, sha256: str, runner: str) -> None:
        self.context = context
        self.auth = b"Bearer " + token.encode()
        self.sha256 = sha256
        self.runner = runner
        self.lock = threading.Lock()
        self.written = False  # the runner is written: no other request from now on
        self.pushed = threading.Event()  # ... and the connection that wrote it is closed: exec the runner
        self.last = time.monotonic()  # the last authenticated request

    def serve(self, sock: socket.socket) -> None:
        status, body = 0, b""
        try:
            sock.settimeout(20)
            sock = self.context.wrap_socket(sock, server_side=True)
            status, body = self.answer(sock.makefile("rb"))
            sock.sendall(b"HTTP/1.1 %d -\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, len(body), body))
            if status != 200:  # a body may still be coming: drop some, so that the client reads the answer, not a reset
                sock.settimeout(2)
                size = 0
                while size < 1 << 24 and sock.recv(1 << 16):
                    size += 1 << 16
        except Exception:
            pass
        finally:
            sock.close()
            if body == PUSHED:
                self.pushed.set()

    def answer(self, f: Any) -> tuple[int, bytes]:
        request = f.readline(8192).split()
        headers: dict[bytes, bytes] = {}
        for _ in range(100):
            name, _, value = f.readline(8192).partition(b":")
            if not value:
                break
            headers[name.strip().lower()] = value.strip()
        if not hmac.compare_digest(headers.get(b"authorization", b""), self.auth):
            return 401, b'{"error": "unauthorized"}'
        self.last = time.monotonic()
        if self.written:
            return 503, b'{"error": "the runner is starting"}'
        if request[:2] == [b"GET", b"/v1/health"]:
            return 200, b'{"ok": true, "stage": 0}'
        if request[:2] != [b"PUT", b"/v1/runner"]:
            return 404, b'{"error": "not found"}'
        size = headers.get(b"content-length", b"")
        if not size.isdigit() or int(size) > 16 << 20:
            return 413, b'{"error": "Content-Length (at most 16 MiB) required"}'
        data = f.read(int(size))
        digest = hashlib.sha256(data).hexdigest()
        self.last = time.monotonic()
        if digest != self.sha256:  # (the runner's source is public: no need to hide how it differs)
            return 400, b'{"error": "sha256 mismatch: the body hashes to %s"}' % digest.encode()
        with self.lock:
            if self.written:
                return 503, b'{"error": "the runner is starting"}'
            write(self.runner, data)
            self.written = True
        return 200, PUSHED


def main(token: str, cert: str, key: str, sha256: str, args: list[str], idle: float, port: int,
         port_env: str | None, name: str) -> None:
    port = int(os.environ.get(port_env or "-") or port)
    # The dead-man hook (the runner's --on-exit) comes base64-encoded as the command's second word: the shell
    # line has it too, for a machine without Python, and one copy is enough.
    hook = base64.b64decode(sys.argv[2]).decode() if sys.argv[2:] else ""
    if hook:
        args = [*args, "--on-exit", hook]
    base = os.path.join(os.environ.get("HOME") or "/tmp", ".trainorch", name)
    cert_path, key_path, runner, token_path, state_dir = (
        os.path.join(base, n) for n in ("cert.pem", "key.pem", "runner.py", "token", "state"))
    os.makedirs(state_dir, exist_ok=True)
    os.chmod(base, 0o700)
    write(cert_path, pem(cert).encode())
    write(key_path, pem(key).replace("CERTIFICATE", "PRIVATE KEY").encode())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2 at least: the pinned client asks for it
    context.load_cert_chain(cert_path, key_path)
    stage0 = Stage0(context, token, sha256, runner)
    listener = socket.create_server(("0.0.0.0", port))
    listener.settimeout(0.2)
    print(f"trainorch stage-0: port {port}", file=sys.stderr, flush=True)
    while not stage0.pushed.is_set():
        if 0 < idle < time.monotonic() - stage0.last:
            print("trainorch stage-0: idle", file=sys.stderr, flush=True)
            listener.close()
            if hook:
                subprocess.run(hook, shell=True, cwd=state_dir, stdin=subprocess.DEVNULL, start_new_session=True,
                               timeout=300, env=dict(os.environ, TRAINORCH_EXIT_REASON="idle-before-start",
                                                     TRAINORCH_STATE_DIR=state_dir))
            return
        try:
            threading.Thread(target=stage0.serve, args=(listener.accept()[0],), daemon=True).start()
        except socket.timeout:  # noqa: UP041 (on Python 3.9 this is not TimeoutError)
            pass
    listener.close()
    write(token_path, token.encode())
    os.execv(sys.executable, [sys.executable, runner, "--state-dir", state_dir, "--host", "0.0.0.0", "--port",
                              str(port), "--token-file", token_path, "--tls-cert", cert_path, "--tls-key", key_path,
                              *args])
