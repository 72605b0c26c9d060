"""The trainorch runner: the agent that runs one job's command on the training machine.

This file is self-contained and uses only the standard library (Python 3.9+: no ``match``, no ``X | Y``
outside annotations): it is shipped inline to bare images and run as ``python runner.py --state-dir DIR``.
It also runs as ``python -m trainorch_jupyter.runner``. The HTTP protocol it serves is ``docs/PROTOCOL.md``
section 2; with ``--tls-cert``/``--tls-key`` it serves it over TLS (stdlib ``ssl``), the pinned channel of a
remote machine (section 4). ``make lint`` checks that this file stays Python 3.9-compatible (ruff, vermin).

Threads: the HTTP server (one thread per connection), one reader thread that copies the command's
stdout+stderr into ``job.log`` (and metrics lines into ``metrics.jsonl``), one supervisor thread that
waits for the command, enforces the cancel grace period and ``max_runtime_s``, hashes the output and
marks the job exited, and one life watchdog (the runner's own end: idle before a start, retention after the
command exited; it also closes connections that do not authenticate in time). Everything shared lives in
:class:`Runner`, guarded by one ``threading.Condition`` that also wakes the long-polls.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import hmac
import json
import os
import re
import select
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSION = "1"
TOKEN_ENV = "TRAINORCH_RUNNER_TOKEN"  # legacy way in for the token (see _read_token); never reaches the job
METRIC_PREFIX = b"TRAINORCH_METRIC "
_SEGMENT_END = re.compile(rb"[\r\n]")

MAX_WAIT_S = 25.0
DEFAULT_LOG_LIMIT = 1 << 20  # 1 MiB
MAX_LOG_LIMIT = 16 << 20
METRICS_LIMIT = 1 << 20  # bytes of metrics.jsonl per response
MAX_METRIC_LINE = 1 << 20  # longer lines are never parsed as metrics (they stay in the log)
MAX_JSON_BODY = 1 << 20
CHUNK = 1 << 20  # upload / hashing chunk
PIPE_READ = 1 << 16
DEFAULT_GRACE_S = 10.0
EOF_WAIT_S = 2.0  # after the command exits: how long its leftovers may hold the pipe open
GROUP_GONE_WAIT_S = 5.0
HANDLER_SOCKET_TIMEOUT_S = 120.0  # per read/write, once a request is authenticated (long-polls, big bodies)
DEFAULT_AUTH_TIMEOUT_S = 15.0  # a connection must send a complete, authenticated request head within this
DEFAULT_MAX_UPLOAD_BYTES = 64 << 30  # one input file; --max-upload-bytes
DISK_MARGIN_BYTES = 64 << 20  # an upload must leave this much free on the state dir's file system
LINGER_MAX_BYTES = 16 << 20  # after refusing a body: how much of it is read (and dropped) so the client sees why
LINGER_S = 5.0
SIGNAL_GRACE_S = 5.0  # grace for the command when the runner itself gets SIGTERM/SIGINT
ON_EXIT_TIMEOUT_S = 300.0  # the --on-exit hook may run this long

# Why the runner process ended (status.json "runner_exit_reason", env TRAINORCH_EXIT_REASON of the hook).
EXIT_IDLE_BEFORE_START = "idle-before-start"  # no authenticated request for --idle-timeout before any start
EXIT_RETENTION_EXPIRED = "retention-expired"  # no authenticated request for --retention after the command exited
EXIT_SHUTDOWN_REQUEST = "shutdown-request"  # POST /v1/shutdown
EXIT_SIGNAL = "signal"  # SIGTERM/SIGINT from outside (a provider's terminate, the machine going down)
EXIT_ERROR = "error"  # the HTTP server failed
#: Reasons that run the --on-exit hook: the runner's life ended and nobody outside is taking the machine down.
ON_EXIT_REASONS = frozenset({EXIT_IDLE_BEFORE_START, EXIT_RETENTION_EXPIRED, EXIT_SHUTDOWN_REQUEST, EXIT_ERROR})

# The job's environment: the runner's own, less anything that looks like a secret, plus what the start
# request sets explicitly. One rule for the whole package (trainorch_jupyter._env re-exports it).
SECRET_ENV_PATTERNS_ENV = "TRAINORCH_SECRET_ENV_PATTERNS"
DEFAULT_SECRET_ENV_PATTERNS = ("*_KEY", "*_TOKEN", "*_SECRET", "*PASSWORD*", "*_CREDENTIALS")
#: Always dropped, whatever the patterns say: provider keys, the notification URL, the runner's own token.
SECRET_ENV_NAMES = frozenset({"RUNPOD_API_KEY", "LAMBDA_API_KEY", "VAST_API_KEY", "TRAINORCH_WEBHOOK_URL", TOKEN_ENV})


def secret_env_patterns(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The glob patterns (case-insensitive) of secret-looking variable names.

    ``TRAINORCH_SECRET_ENV_PATTERNS`` (comma-separated globs, in ``environ`` or ``os.environ``) replaces
    :data:`DEFAULT_SECRET_ENV_PATTERNS` when set; set it empty to keep only :data:`SECRET_ENV_NAMES` out.
    """
    raw = (os.environ if environ is None else environ).get(SECRET_ENV_PATTERNS_ENV)
    if raw is None:
        return DEFAULT_SECRET_ENV_PATTERNS
    return tuple(p.strip().upper() for p in raw.split(",") if p.strip())


def is_secret_env_name(name: str, patterns: tuple[str, ...] | None = None) -> bool:
    """Whether an environment variable called ``name`` must be kept from a job."""
    upper = name.upper()
    if upper in SECRET_ENV_NAMES:
        return True
    pats = secret_env_patterns() if patterns is None else patterns
    return any(fnmatch.fnmatchcase(upper, p.upper()) for p in pats)


def job_environment(base: Mapping[str, str], explicit: Mapping[str, str] | None = None,
                    patterns: tuple[str, ...] | None = None) -> dict[str, str]:
    """``base`` without its secret-looking variables, then ``explicit`` (what the job's spec sets) on top.

    The runner's token is never passed, not even when ``explicit`` names it.
    """
    pats = secret_env_patterns(base) if patterns is None else patterns
    env = {k: v for k, v in base.items() if not is_secret_env_name(k, pats)}
    env.update(explicit or {})
    env.pop(TOKEN_ENV, None)
    return env


def _log(msg: str) -> None:
    """Runner diagnostics go to stderr; never pass request headers or the token here."""
    try:
        sys.stderr.write(f"trainorch-runner: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _open_private(path: str, flags: int) -> int:
    """``os.open`` of a file only this user may read (0600), whatever the umask."""
    fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o600)
    return fd


def _private_dir(path: str) -> None:
    """Make ``path`` (and missing parents) and keep it to this user (0700)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)


def _atomic_write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with os.fdopen(_open_private(tmp, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``.

    Zombies are ignored: in a container whose PID 1 does not reap, orphans stay zombies forever and
    ``killpg(pgid, 0)`` keeps succeeding on them.
    """
    if os.path.isdir("/proc/self"):
        try:
            entries = os.listdir("/proc")
        except OSError:
            entries = []
        for name in entries:
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            rest = data[data.rfind(b")") + 2 :].split()
            # rest: state ppid pgrp ...
            if len(rest) >= 3 and int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


#: A socket read or write that timed out: on Python 3.9 ``socket.timeout`` is not yet ``TimeoutError``.
_TIMEOUTS = (TimeoutError, getattr(socket, "timeout", TimeoutError))


class HTTPError(Exception):
    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def build_manifest(output_dir: str) -> list[dict[str, Any]]:
    """Every regular file under ``output_dir`` (symlinks skipped), sorted by relative POSIX path."""
    files: list[dict[str, Any]] = []
    for root, dirs, names in os.walk(output_dir, followlinks=False):
        dirs.sort()
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, output_dir).replace(os.sep, "/")
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                _log(f"manifest: skipping a file whose name is not UTF-8: {rel!r}")
                continue
            try:
                st = os.lstat(full)
                if not stat.S_ISREG(st.st_mode):
                    continue
                fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            with os.fdopen(fd, "rb") as f:
                h = hashlib.sha256()
                size = 0
                while True:
                    block = f.read(CHUNK)
                    if not block:
                        break
                    h.update(block)
                    size += len(block)
            files.append({"path": rel, "size": size, "sha256": h.hexdigest()})
    files.sort(key=lambda e: e["path"])
    return files


def parse_metric(segment: bytes, after_cr: bool) -> bytes | None:
    """The metric in one output segment (text between two "\\r"/"\\n"), as one compact JSON line, or None.

    A metric segment starts with ``TRAINORCH_METRIC `` and the rest is one JSON object. A segment that a
    "\\r" opened may hold a progress-bar frame first: tqdm draws "\\r<bar>" without a line end, so a metric
    printed next (on stdout, the frame on stderr: one pipe) lands behind the frame. There, the first
    occurrence of the prefix whose rest is a JSON object counts.
    """
    if len(segment) > MAX_METRIC_LINE:
        return None
    if segment.startswith(METRIC_PREFIX):
        starts = [0]
    elif after_cr:
        starts = []
        i = segment.find(METRIC_PREFIX)
        while i >= 0:
            starts.append(i)
            i = segment.find(METRIC_PREFIX, i + 1)
    else:
        return None
    for i in starts:
        try:
            obj = json.loads(segment[i + len(METRIC_PREFIX) :].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"
    return None


class _SegmentScanner:
    """Splits the command's output into segments ended by "\\n" or "\\r" and picks the metrics out."""

    def __init__(self) -> None:
        self.pending = bytearray()  # the current, unfinished segment
        self.overflow = False  # the current segment is longer than MAX_METRIC_LINE: not a metric
        self.after_cr = False  # the current segment was opened by a "\\r"

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        pos = 0
        for m in _SEGMENT_END.finditer(data):
            i = m.start()
            if self.overflow:
                self.overflow = False
            else:
                segment = bytes(self.pending) + data[pos:i] if self.pending else data[pos:i]
                if METRIC_PREFIX in segment:
                    metric = parse_metric(segment, self.after_cr)
                    if metric is not None:
                        out.append(metric)
            self.pending.clear()
            self.after_cr = data[i] == 13  # b"\r"
            pos = i + 1
        if not self.overflow:
            self.pending += data[pos:]
            if len(self.pending) > MAX_METRIC_LINE:
                self.pending.clear()
                self.overflow = True
        return out


class Runner:
    """The job and its state on disk. One job per runner (per state dir)."""

    def __init__(self, state_dir: str, token: str, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self._token = token.encode("utf-8")
        self.max_upload_bytes = max_upload_bytes
        self.inputs_dir = os.path.join(self.state_dir, "inputs")
        self.output_dir = os.path.join(self.state_dir, "output")
        self.work_dir = os.path.join(self.state_dir, "work")
        self.tmp_dir = os.path.join(self.state_dir, "tmp")
        self.log_path = os.path.join(self.state_dir, "job.log")
        self.metrics_path = os.path.join(self.state_dir, "metrics.jsonl")
        self.status_path = os.path.join(self.state_dir, "status.json")
        self.manifest_path = os.path.join(self.state_dir, "manifest.json")
        for d in (self.state_dir, self.inputs_dir, self.output_dir, self.work_dir, self.tmp_dir):
            _private_dir(d)

        self.cond = threading.Condition()
        self.state = "idle"
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.cancelled = False
        self.timed_out = False
        self.error: str | None = None
        self.log_size = 0
        self.log_whole_end = 0  # offset just past the last b"\n" or b"\r" in job.log
        self.metrics_size = 0
        self.manifest: dict[str, Any] | None = None
        self._manifest_index: dict[str, dict[str, Any]] = {}

        self._proc: subprocess.Popen[bytes] | None = None
        self._grace_s = DEFAULT_GRACE_S
        self._max_runtime_s: float | None = None
        self._start_mono = 0.0
        self._term_sent = False
        self._kill_at: float | None = None  # monotonic deadline for SIGKILL after SIGTERM
        self._reader_abandon = threading.Event()
        self._reader_done = threading.Event()

        self.last_activity = time.monotonic()  # last authenticated request, or the command's exit
        self.active_requests = 0
        self.shutting_down = False
        self.exit_reason: str | None = None  # why this runner process ends (set once, when it starts to)

        self._load_previous_state()

    # ---------------------------------------------------------------- auth

    def check_token(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), self._token)

    # ---------------------------------------------------------------- persistence

    def _load_previous_state(self) -> None:
        """Serve what a previous runner process left in this state dir."""
        self.log_size = self.log_whole_end = _file_size(self.log_path)
        self.metrics_size = _file_size(self.metrics_path)
        saved = _read_json(self.status_path)
        if not isinstance(saved, dict) or saved.get("state") not in ("running", "exited"):
            return
        self.pid = saved.get("pid")
        self.exit_code = saved.get("exit_code")
        self.signal = saved.get("signal")
        self.started_at = saved.get("started_at")
        self.ended_at = saved.get("ended_at")
        self.cancelled = bool(saved.get("cancelled"))
        self.timed_out = bool(saved.get("timed_out"))
        self.error = saved.get("error")
        if saved["state"] == "running":
            # The previous runner died while the command ran: its output pipe is gone, so the command
            # can no longer be followed. Stop what is left of it and record that the exit status is lost.
            pid = self.pid
            if isinstance(pid, int) and pid > 1:
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pid:
                        _killpg(pid, signal.SIGKILL)
                deadline = time.monotonic() + GROUP_GONE_WAIT_S
                while group_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.exit_code = None
            self.ended_at = time.time()
            self.error = "the runner restarted while the command was running; its exit status is lost"
        manifest = _read_json(self.manifest_path)
        if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), list)):
            manifest = self._compute_manifest()
        self._set_manifest(manifest)
        self.state = "exited"
        self._persist_status()

    def _status_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "cancelled": self.cancelled,
            "timed_out": self.timed_out,
            "log_size": self.log_size,
            "metrics_size": self.metrics_size,
            "error": self.error,
            "runner_exit_reason": self.exit_reason,
        }

    def status(self) -> dict[str, Any]:
        with self.cond:
            return self._status_dict()

    def _persist_status(self) -> None:
        """Write status.json (call with the lock held, or before threads exist)."""
        try:
            _atomic_write_json(self.status_path, self._status_dict())
        except OSError as exc:
            _log(f"could not write status.json: {exc}")

    def _compute_manifest(self) -> dict[str, Any]:
        try:
            files = build_manifest(self.output_dir)
        except OSError as exc:
            _log(f"could not hash the output: {exc}")
            files = []
        manifest = {"files": files, "total_size": sum(f["size"] for f in files), "exit_code": self.exit_code}
        try:
            _atomic_write_json(self.manifest_path, manifest)
        except OSError as exc:
            _log(f"could not write manifest.json: {exc}")
        return manifest

    def _set_manifest(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self._manifest_index = {
            e["path"]: e for e in manifest.get("files", []) if isinstance(e, dict) and isinstance(e.get("path"), str)
        }

    # ---------------------------------------------------------------- start

    def start(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        command = body.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(a, str) and "\x00" not in a for a in command)
        ):
            raise HTTPError(400, "command must be a non-empty list of strings")
        env = body.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\x00" not in k + v
            for k, v in env.items()
        ):
            raise HTTPError(400, "env must be an object of string names to string values")
        cwd = body.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or "\x00" in cwd):
            raise HTTPError(400, "cwd must be a string or null")
        max_runtime_s = body.get("max_runtime_s")
        if max_runtime_s is not None and (
            not isinstance(max_runtime_s, (int, float)) or isinstance(max_runtime_s, bool) or not max_runtime_s > 0
        ):
            raise HTTPError(400, "max_runtime_s must be a positive number or null")
        grace_s = body.get("grace_s", DEFAULT_GRACE_S)
        if grace_s is None:
            grace_s = DEFAULT_GRACE_S
        if not isinstance(grace_s, (int, float)) or isinstance(grace_s, bool) or not 0 <= grace_s <= 3600:
            raise HTTPError(400, "grace_s must be a number of seconds from 0 to 3600")

        # Nothing secret-looking of the runner's own environment reaches the command (a cloud machine's
        # API key stays with the runner and its --on-exit hook); what the start request sets does.
        full_env = job_environment(os.environ, env)
        full_env["TRAINORCH_OUTPUT_DIR"] = self.output_dir
        full_env["TRAINORCH_INPUT_DIR"] = self.inputs_dir
        full_env["PYTHONUNBUFFERED"] = "1"
        run_cwd = self.work_dir if cwd is None else os.path.join(self.work_dir, os.path.expanduser(cwd))
        # The only expansion: the two dirs a command cannot know before it lands on this machine.
        command = [
            a.replace("${TRAINORCH_INPUT_DIR}", self.inputs_dir).replace("${TRAINORCH_OUTPUT_DIR}", self.output_dir)
            for a in command
        ]

        with self.cond:
            if self.state != "idle":
                raise HTTPError(409, f"a command was already started (state {self.state})")
            self._grace_s = float(grace_s)
            self._max_runtime_s = None if max_runtime_s is None else float(max_runtime_s)
            self.started_at = time.time()
            self._start_mono = time.monotonic()
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=run_cwd,
                    env=full_env,
                    start_new_session=True,
                    close_fds=True,
                    bufsize=0,
                )
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                message = f"could not start the command: {exc}"
                line = f"trainorch-runner: {message}\n".encode("utf-8", "replace")
                with os.fdopen(_open_private(self.log_path, os.O_WRONLY | os.O_APPEND), "ab") as f:
                    f.write(line)
                self.log_size = self.log_whole_end = _file_size(self.log_path)
                self.exit_code = 127
                self.ended_at = time.time()
                self.error = message
                self._set_manifest(self._compute_manifest())
                self.state = "exited"
                self.last_activity = time.monotonic()  # the retention after the exit starts now
                self._persist_status()
                self.cond.notify_all()
                raise HTTPError(400, message) from None
            self._proc = proc
            self.pid = proc.pid
            self.state = "running"
            self._persist_status()
            self.cond.notify_all()
        threading.Thread(target=self._read_output, args=(proc,), name="runner-reader", daemon=True).start()
        threading.Thread(target=self._supervise, args=(proc,), name="runner-supervisor", daemon=True).start()
        return {"state": "running", "pid": proc.pid}

    # ---------------------------------------------------------------- output reader

    def _read_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        seg = _SegmentScanner()
        log_broken = False
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            log_fd = _open_private(self.log_path, os.O_WRONLY | os.O_APPEND)
            metrics_fd = _open_private(self.metrics_path, os.O_WRONLY | os.O_APPEND)
            with os.fdopen(log_fd, "ab") as log, os.fdopen(metrics_fd, "ab") as metrics:
                while not self._reader_abandon.is_set():
                    try:
                        if not poller.poll(500):
                            continue
                    except InterruptedError:
                        continue
                    try:
                        data = os.read(fd, PIPE_READ)
                    except InterruptedError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    if log_broken:
                        continue  # keep draining the pipe: a full pipe would block the command
                    try:
                        log.write(data)
                        log.flush()
                    except OSError as exc:
                        log_broken = True
                        with self.cond:
                            self.log_size = max(self.log_size, _file_size(self.log_path))
                            self.error = self.error or f"could not write job.log ({exc}); later output was lost"
                            self._persist_status()
                            self.cond.notify_all()
                        continue
                    new_metrics = seg.feed(data)
                    if new_metrics:
                        try:
                            metrics.write(b"".join(new_metrics))
                            metrics.flush()
                        except OSError:
                            new_metrics = []
                    # A carriage return ends a line too for readers: progress bars (tqdm) redraw one line
                    # with "\r" and would otherwise show nothing until their final newline.
                    last_end = max(data.rfind(b"\n"), data.rfind(b"\r"))
                    with self.cond:
                        if last_end >= 0:
                            self.log_whole_end = self.log_size + last_end + 1
                        self.log_size += len(data)
                        if new_metrics:
                            self.metrics_size = metrics.tell()
                        self.cond.notify_all()
        except Exception:  # never let the reader die silently: the job would hang
            _log("log reader failed:\n" + traceback.format_exc())
        finally:
            with contextlib.suppress(OSError):
                proc.stdout.close()
            self._reader_done.set()

    # ---------------------------------------------------------------- supervisor

    def _supervise(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            self._supervise_inner(proc)
        except Exception:
            _log("supervisor failed:\n" + traceback.format_exc())
            with self.cond:
                if self.state != "exited":  # never leave a job "running" forever
                    _killpg(proc.pid, signal.SIGKILL)
                    self.exit_code = proc.poll()
                    self.ended_at = time.time()
                    self.error = self.error or "the runner failed while wrapping up the command"
                    self._set_manifest(self.manifest or {"files": [], "total_size": 0, "exit_code": self.exit_code})
                    self.state = "exited"
                    self.last_activity = time.monotonic()  # the retention after the exit starts now
                    self._persist_status()
                    self.cond.notify_all()

    def _supervise_inner(self, proc: subprocess.Popen[bytes]) -> None:
        pgid = proc.pid
        while True:
            try:
                rc = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            with self.cond:
                if (
                    self._max_runtime_s is not None
                    and not self._term_sent
                    and now - self._start_mono >= self._max_runtime_s
                ):
                    self.timed_out = True
                    self._persist_status()
                    self._terminate_locked(self._grace_s)
                kill_at = self._kill_at
            if kill_at is not None and now >= kill_at:
                _killpg(pgid, signal.SIGKILL)
        # The leader exited. Make sure nothing of its process group is left, then drain the pipe.
        with self.cond:
            kill_at = self._kill_at if self._term_sent else None
        if kill_at is not None:
            # Cancelled: the rest of the group gets the same grace period (a later cancel may shorten it), then SIGKILL.
            while group_alive(pgid) and time.monotonic() < kill_at:
                time.sleep(0.05)
                with self.cond:
                    kill_at = min(kill_at, self._kill_at or kill_at)
        else:
            # Exited by itself: leftovers (background children) may hold the pipe a moment.
            self._reader_done.wait(EOF_WAIT_S)
        if group_alive(pgid):
            _killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + GROUP_GONE_WAIT_S
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.02)
        if not self._reader_done.wait(GROUP_GONE_WAIT_S):
            # Something outside the group (it called setsid) still holds the pipe: stop following it.
            self._reader_abandon.set()
            self._reader_done.wait(2.0)
        with self.cond:
            self.exit_code = rc
            self.signal = -rc if rc < 0 else None
            self.ended_at = time.time()
        manifest = self._compute_manifest()
        with self.cond:
            self._set_manifest(manifest)
            self.log_size = max(self.log_size, _file_size(self.log_path))
            self.state = "exited"
            self.last_activity = time.monotonic()  # the retention after the exit starts now
            self._persist_status()
            self.cond.notify_all()

    def _terminate_locked(self, grace_s: float) -> None:
        """SIGTERM the group now, SIGKILL it after ``grace_s`` (lock held)."""
        proc = self._proc
        if proc is None:
            return
        kill_at = time.monotonic() + max(0.0, grace_s)
        if not self._term_sent:
            self._term_sent = True
            _killpg(proc.pid, signal.SIGTERM)
            self._kill_at = kill_at
        elif self._kill_at is None or kill_at < self._kill_at:
            self._kill_at = kill_at
        self.cond.notify_all()

    def cancel(self, grace_s: float | None, shutdown: str | None = None) -> dict[str, Any]:
        """Stop the command (a user's cancel). With ``shutdown`` (why the machine is going away), the command
        is stopped the same way but not marked cancelled: the job did not end by anyone's wish, it failed."""
        with self.cond:
            if shutdown is not None and self.state == "running" and self._proc is not None \
                    and self._proc.returncode is None:
                if not self.cancelled and not self.timed_out and not self.error:
                    self.error = shutdown
                    self._persist_status()
                self._terminate_locked(self._grace_s if grace_s is None else grace_s)
                return self._status_dict()
            if self.state == "idle":
                self.cancelled = True
                self.ended_at = time.time()
                self.error = "cancelled before the command was started"
                self._set_manifest(self._compute_manifest())
                self.state = "exited"
                self.last_activity = time.monotonic()  # the retention after the exit starts now
                self._persist_status()
                self.cond.notify_all()
            elif self.state == "running" and self._proc is not None and self._proc.returncode is None:
                if not self.cancelled and not self.timed_out:
                    self.cancelled = True
                    self._persist_status()
                self._terminate_locked(self._grace_s if grace_s is None else grace_s)
            # else: the command already exited (or is being wrapped up): nothing to cancel
            return self._status_dict()

    def wait_exited(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.state != "exited":
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    # ---------------------------------------------------------------- logs and metrics

    def read_logs(self, offset: int, wait: float, limit: int) -> tuple[bytes, int, bool]:
        deadline = time.monotonic() + wait
        with self.cond:
            if offset > self.log_size:
                raise HTTPError(400, f"offset {offset} is beyond the end of the log ({self.log_size} bytes)")
            while True:
                exited = self.state == "exited"
                size = self.log_size
                if exited and offset < size:
                    break
                if exited:
                    return b"", offset, True
                if self.log_whole_end > offset or size - offset >= limit:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return b"", offset, False
                self.cond.wait(left)
        end = min(size, offset + limit)
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            data = f.read(end - offset)
        end = offset + len(data)  # shorter only if the file was truncated under us
        if not (exited and end == size):
            # Whole lines only (ended by "\n" or a progress bar's "\r"); a line longer than ``limit``
            # comes in ``limit``-sized pieces.
            nl = max(data.rfind(b"\n"), data.rfind(b"\r"))
            if nl >= 0:
                end = offset + nl + 1
                data = data[: nl + 1]
        return data, end, exited and end == size

    def read_metrics(self, offset: int, wait: float) -> tuple[list[Any], int, bool]:
        deadline = time.monotonic() + wait
        with self.cond:
            if offset > self.metrics_size:
                raise HTTPError(400, f"offset {offset} is beyond the end of the metrics ({self.metrics_size} bytes)")
            while True:
                exited = self.state == "exited"
                size = self.metrics_size
                if size > offset or exited:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], offset, False
                self.cond.wait(left)
        if offset == size:
            return [], offset, exited
        with open(self.metrics_path, "rb") as f:
            if offset > 0:
                f.seek(offset - 1)
                if f.read(1) != b"\n":
                    raise HTTPError(400, f"offset {offset} is not at the start of a metrics line")
            data = f.read(min(size - offset, METRICS_LIMIT))
        nl = data.rfind(b"\n")
        if nl < 0:
            if size - offset > METRICS_LIMIT:  # one absurdly long line: skip it whole
                with open(self.metrics_path, "rb") as f:
                    f.seek(offset)
                    pos = offset
                    while pos < size:
                        block = f.read(CHUNK)
                        i = block.find(b"\n")
                        if i >= 0:
                            return [], pos + i + 1, False
                        pos += len(block)
                        if not block:
                            break
            return [], offset, False
        data = data[: nl + 1]
        metrics: list[Any] = []
        for line in data.split(b"\n")[:-1]:
            try:
                metrics.append(json.loads(line))
            except ValueError:
                continue
        end = offset + nl + 1
        return metrics, end, exited and end == size

    # ---------------------------------------------------------------- inputs

    def check_input_name(self, name: str) -> None:
        if (
            not name
            or name in (".", "..")
            or "/" in name
            or "\\" in name
            or "\x00" in name
            or len(name.encode("utf-8", "surrogateescape")) > 255
            or any(ord(c) < 32 for c in name)
        ):
            raise HTTPError(400, "an input name must be one plain path segment")

    def can_upload(self) -> None:
        with self.cond:
            if self.state != "idle":
                raise HTTPError(409, f"inputs can only be uploaded before the command starts (state {self.state})")

    # ---------------------------------------------------------------- files

    def resolve_output_file(self, rel: str) -> tuple[str, dict[str, Any]]:
        """The real path of manifest file ``rel``; 404 for anything else."""
        with self.cond:
            if self.state != "exited" or self.manifest is None:
                raise HTTPError(409, "the command has not exited yet")
            entry = self._manifest_index.get(rel)
        if entry is None:
            raise HTTPError(404, "no such file in the manifest")
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in rel or "\\" in rel:
            raise HTTPError(404, "no such file in the manifest")
        base = os.path.realpath(self.output_dir)
        candidate = os.path.join(base, *parts)
        real = os.path.realpath(candidate)
        if real != candidate or not real.startswith(base + os.sep):
            raise HTTPError(404, "no such file in the manifest")
        return real, entry


# -------------------------------------------------------------------- HTTP


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` for one ``bytes=`` range, None to serve the whole file.

    Raises HTTPError(416) when the range is valid but unsatisfiable. Malformed or multi-range
    headers are ignored (RFC 9110 allows a server to ignore Range).
    """
    header = header.strip()
    if not header.lower().startswith("bytes="):
        return None
    spec = header[6:].strip()
    if "," in spec:
        return None
    first, sep, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if not sep or (first and not first.isdigit()) or (last and not last.isdigit()) or (not first and not last):
        return None
    unsatisfiable = HTTPError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - n), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise unsatisfiable
    end = size if not last else min(size, int(last) + 1)
    return start, end


class RunnerServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], runner: Runner, *,
                 auth_timeout: float = DEFAULT_AUTH_TIMEOUT_S, ssl_context: ssl.SSLContext | None = None) -> None:
        self.runner = runner
        self.auth_timeout = auth_timeout
        self.ssl_context = ssl_context  # serve HTTPS (--tls-cert/--tls-key) when set
        # Connections waiting for (or reading) a request head that is not authenticated yet: deadline, socket.
        self._unauthenticated: dict[int, tuple[float, socket.socket]] = {}
        self._unauthenticated_lock = threading.Lock()
        super().__init__(address, RunnerHandler)

    def expect_auth(self, key: int, sock: socket.socket) -> None:
        with self._unauthenticated_lock:
            self._unauthenticated[key] = (time.monotonic() + self.auth_timeout, sock)

    def authenticated(self, key: int) -> None:
        with self._unauthenticated_lock:
            self._unauthenticated.pop(key, None)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """With TLS: the handshake, in this connection's own thread (never in the accept loop), within the auth
        timeout (per read, and in all: the life watchdog closes the socket at the deadline)."""
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        key = id(request)
        self.expect_auth(key, request)
        try:
            request.settimeout(self.auth_timeout)
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError):
            return  # not TLS, not our client, too slow: nothing to answer
        finally:
            self.authenticated(key)
        try:
            RunnerHandler(conn, client_address, self)
        finally:
            self.shutdown_request(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a connection that broke (a reset, a TLS error): one line, no traceback
            _log(f"connection error: {type(exc).__name__}")
        else:
            _log("request failed:\n" + traceback.format_exc())

    def reap_unauthenticated(self) -> None:
        """Close the connections whose request head did not authenticate in time (a slow or silent client
        cannot hold a thread: per-read timeouts alone let a trickle of bytes keep one for ever)."""
        now = time.monotonic()
        with self._unauthenticated_lock:
            expired = [k for k, (deadline, _) in self._unauthenticated.items() if deadline <= now]
            socks = [self._unauthenticated.pop(k)[1] for k in expired]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class RunnerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "trainorch-runner/" + VERSION
    sys_version = ""
    timeout = HANDLER_SOCKET_TIMEOUT_S
    server: RunnerServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms per answer.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self) -> None:
        # Until its head is in and its token checked, a request gets the short auth timeout (per read, and
        # in all: the life watchdog closes it at the deadline); then the long one (long-polls, big bodies).
        self.server.expect_auth(id(self), self.connection)
        with contextlib.suppress(OSError):
            self.connection.settimeout(self.server.auth_timeout)
        try:
            super().handle_one_request()
        finally:
            self.server.authenticated(id(self))

    def finish(self) -> None:
        self.server.authenticated(id(self))
        super().finish()

    def version_string(self) -> str:
        return self.server_version

    # quiet: no access log; errors only, without headers
    def log_message(self, format: str, *args: Any) -> None:
        return

    def log_error(self, format: str, *args: Any) -> None:
        with contextlib.suppress(Exception):
            _log("http: " + (format % args))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # ------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        runner = self.server.runner
        self._body_consumed = self.headers.get("Content-Length") in (None, "0") and not self._chunked()
        self._head = method == "HEAD"
        self._headers_sent = False
        if not runner.check_token(self.headers.get("Authorization")):
            self.close_connection = True  # nothing more from a client without the token
            self._send_error(HTTPError(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"}))
            return
        self.server.authenticated(id(self))
        with contextlib.suppress(OSError):
            self.connection.settimeout(HANDLER_SOCKET_TIMEOUT_S)
        with runner.cond:
            runner.active_requests += 1
            runner.last_activity = time.monotonic()
        try:
            self._route(method)
        except HTTPError as exc:
            self._send_error(exc)
            if not self._body_consumed:
                self._linger()
        except (BrokenPipeError, ConnectionResetError, *_TIMEOUTS):
            self.close_connection = True
        except Exception:
            _log("internal error:\n" + traceback.format_exc())
            if self._headers_sent:
                self.close_connection = True
            else:
                with contextlib.suppress(Exception):
                    self._send_error(HTTPError(500, "internal error"))
        finally:
            with runner.cond:
                runner.active_requests -= 1
                runner.last_activity = time.monotonic()

    def _linger(self) -> None:
        """After an early answer (413, 507, 409 ...) to a request whose body was not read: read and drop
        some of it, so the client, still sending, gets to read the answer instead of a connection reset."""
        deadline = time.monotonic() + LINGER_S
        left = LINGER_MAX_BYTES
        with contextlib.suppress(OSError, ValueError):
            self.connection.shutdown(socket.SHUT_WR)
            while left > 0:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                self.connection.settimeout(wait)
                block = self.connection.recv(min(left, CHUNK))
                if not block:
                    break
                left -= len(block)

    def _chunked(self) -> bool:
        return "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()

    def _route(self, method: str) -> None:
        runner = self.server.runner
        split = urllib.parse.urlsplit(self.path)
        path = split.path
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        get = method in ("GET", "HEAD")
        if path == "/v1/health" and get:
            self._send_json(200, {"ok": True, "version": VERSION, "state": runner.status()["state"],
                                  "max_upload_bytes": runner.max_upload_bytes})
        elif path == "/v1/status" and get:
            self._send_json(200, runner.status())
        elif path.startswith("/v1/inputs/") and method == "PUT":
            self._put_input(urllib.parse.unquote(path[len("/v1/inputs/") :], errors="surrogateescape"))
        elif path == "/v1/start" and method == "POST":
            self._send_json(200, runner.start(self._read_json_body()))
        elif path == "/v1/logs" and get:
            self._get_logs(query)
        elif path == "/v1/metrics" and get:
            offset = _int_param(query, "offset", 0)
            metrics, next_offset, complete = runner.read_metrics(offset, _wait_param(query))
            self._send_json(200, {"metrics": metrics, "next_offset": next_offset, "complete": complete})
        elif path == "/v1/cancel" and method == "POST":
            body = self._read_json_body(optional=True)
            grace = body.get("grace_s") if isinstance(body, dict) else None
            if grace is not None and (
                not isinstance(grace, (int, float)) or isinstance(grace, bool) or not 0 <= grace <= 3600
            ):
                raise HTTPError(400, "grace_s must be a number of seconds from 0 to 3600")
            self._send_json(200, runner.cancel(grace))
        elif path == "/v1/manifest" and get:
            with runner.cond:
                manifest = runner.manifest if runner.state == "exited" else None
            if manifest is None:
                raise HTTPError(409, "the command has not exited yet")
            self._send_json(200, manifest)
        elif path.startswith("/v1/files/") and get:
            self._get_file(path[len("/v1/files/") :])
        elif path == "/v1/shutdown" and method == "POST":
            body = self._read_json_body(optional=True)
            grace = body.get("grace_s") if isinstance(body, dict) else None
            if grace is not None and (not isinstance(grace, (int, float)) or isinstance(grace, bool) or grace < 0):
                grace = None
            status = runner.cancel(grace) if runner.status()["state"] == "running" else runner.status()
            self._send_json(200, {"ok": True, "state": status["state"]})
            self.close_connection = True
            threading.Thread(target=request_shutdown, args=(self.server,), daemon=True).start()
        else:
            known = ("/v1/health", "/v1/status", "/v1/start", "/v1/logs", "/v1/metrics", "/v1/cancel", "/v1/manifest",
                     "/v1/shutdown")
            if path in known or path.startswith(("/v1/inputs/", "/v1/files/")):
                raise HTTPError(405, f"method {method} not allowed here")
            raise HTTPError(404, "not found")

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        self._send(status, body, "application/json", headers)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        if not self._body_consumed:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not self._head:
            self.wfile.write(body)
        self.wfile.flush()

    def _send_error(self, exc: HTTPError) -> None:
        try:
            self._send_json(exc.status, {"error": exc.message}, exc.headers)
        except (BrokenPipeError, ConnectionResetError, ValueError, *_TIMEOUTS):
            self.close_connection = True

    # ------------------------------------------------------------ bodies

    def _iter_body(self) -> Iterator[bytes]:
        """The request body in chunks of at most CHUNK bytes (Content-Length or chunked)."""
        if self._chunked():
            while True:
                line = self.rfile.readline(1024)
                if not line.endswith(b"\n"):
                    raise HTTPError(400, "malformed chunked body")
                try:
                    n = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HTTPError(400, "malformed chunked body") from None
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                while n > 0:
                    block = self.rfile.read(min(n, CHUNK))
                    if not block:
                        raise HTTPError(400, "body ended early")
                    n -= len(block)
                    yield block
                self.rfile.readline(8)
            self._body_consumed = True
            return
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._body_consumed = True
            return
        try:
            left = int(raw)
            if left < 0:
                raise ValueError
        except ValueError:
            raise HTTPError(400, "bad Content-Length") from None
        while left > 0:
            block = self.rfile.read(min(left, CHUNK))
            if not block:
                raise HTTPError(400, "body ended early")
            left -= len(block)
            yield block
        self._body_consumed = True

    def _read_json_body(self, optional: bool = False) -> Any:
        raw = self.headers.get("Content-Length")
        if raw is not None and raw.isdigit() and int(raw) > MAX_JSON_BODY:
            raise HTTPError(413, "body too large")
        buf = bytearray()
        for block in self._iter_body():
            buf += block
            if len(buf) > MAX_JSON_BODY:
                raise HTTPError(413, "body too large")
        if not buf.strip():
            if optional:
                return {}
            raise HTTPError(400, "a JSON body is required")
        try:
            return json.loads(bytes(buf))
        except (ValueError, RecursionError):
            raise HTTPError(400, "the body is not valid JSON") from None

    # ------------------------------------------------------------ endpoints

    def _put_input(self, name: str) -> None:
        runner = self.server.runner
        runner.check_input_name(name)
        expected = (self.headers.get("X-Sha256") or "").strip().lower()
        if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
            raise HTTPError(400, "header X-Sha256 with the body's hex SHA-256 is required")
        if self.headers.get("Content-Length") is None and not self._chunked():
            raise HTTPError(411, "Content-Length is required")
        runner.can_upload()
        raw_length = self.headers.get("Content-Length")
        length = int(raw_length) if raw_length is not None and raw_length.strip().isdigit() else None
        limit = runner.max_upload_bytes
        if length is not None and length > limit:
            raise HTTPError(413, f"the input is {length} bytes; this runner takes at most {limit} bytes per input "
                            "(its --max-upload-bytes)")
        free = _free_bytes(runner.tmp_dir)
        if length is not None and free is not None and length > free - DISK_MARGIN_BYTES:
            raise HTTPError(507, f"not enough disk space for the {length}-byte input: {free} bytes free")
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=runner.tmp_dir)
        ok = False
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as f:
                for block in self._iter_body():
                    size += len(block)
                    if size > limit:
                        raise HTTPError(413, f"the input is over {limit} bytes, the most this runner takes per "
                                        "input (its --max-upload-bytes)")
                    h.update(block)
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            digest = h.hexdigest()
            if not hmac.compare_digest(digest, expected):
                raise HTTPError(400, f"sha256 mismatch: the body hashes to {digest}, X-Sha256 says {expected}")
            runner.can_upload()
            os.replace(tmp, os.path.join(runner.inputs_dir, name))
            ok = True
        finally:
            if not ok:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self._send_json(200, {"name": name, "size": size, "sha256": digest})

    def _get_logs(self, query: dict[str, list[str]]) -> None:
        offset = _int_param(query, "offset", 0)
        limit = _int_param(query, "limit", DEFAULT_LOG_LIMIT)
        limit = max(1, min(limit, MAX_LOG_LIMIT))
        data, next_offset, complete = self.server.runner.read_logs(offset, _wait_param(query), limit)
        headers = {"X-Next-Offset": str(next_offset), "X-Log-Complete": "1" if complete else "0"}
        self._send(200, data, "application/octet-stream", headers)

    def _get_file(self, raw: str) -> None:
        try:
            rel = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise HTTPError(404, "no such file in the manifest") from None
        real, entry = self.server.runner.resolve_output_file(rel)
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise HTTPError(404, "no such file in the manifest") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise HTTPError(404, "no such file in the manifest")
            size = st.st_size
            headers = {"Accept-Ranges": "bytes", "ETag": f'"{entry["sha256"]}"'}
            rng = self.headers.get("Range")
            start, end = 0, size
            status = 200
            if rng:
                parsed = parse_range(rng, size)
                if parsed is not None:
                    start, end = parsed
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            length = end - start
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            for k, v in headers.items():
                self.send_header(k, v)
            if not self._body_consumed:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            if self._head or length == 0:
                return
            self._headers_sent = True
            sent = self.connection.sendfile(f, start, length) or 0
            if sent < length:  # the file shrank under us: the client sees a short body
                self.close_connection = True

def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _int_param(query: dict[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise HTTPError(400, f"{name} must be an integer") from None
    if value < 0:
        raise HTTPError(400, f"{name} must not be negative")
    return value


def _wait_param(query: dict[str, list[str]]) -> float:
    values = query.get("wait")
    if not values:
        return 0.0
    try:
        value = float(values[-1])
    except ValueError:
        raise HTTPError(400, "wait must be a number of seconds") from None
    if value != value:  # NaN
        raise HTTPError(400, "wait must be a number of seconds")
    return max(0.0, min(value, MAX_WAIT_S))


# -------------------------------------------------------------------- lifecycle

_shutdown_lock = threading.Lock()


def request_shutdown(server: RunnerServer, grace_s: float | None = None, reason: str = EXIT_SHUTDOWN_REQUEST) -> None:
    """Cancel the command if it runs, wait for its process group to be gone, stop serving.

    The first caller's ``reason`` is the runner's exit reason; later calls do nothing."""
    runner = server.runner
    with _shutdown_lock:
        if runner.shutting_down:
            return
        runner.shutting_down = True
        with runner.cond:
            runner.exit_reason = reason
    _log(f"exiting ({reason})")
    if runner.status()["state"] == "running":
        runner.cancel(grace_s, shutdown=f"stopped because the runner is shutting down ({reason}): the machine "
                                        "is going away")
        with runner.cond:
            grace = runner._grace_s if grace_s is None else grace_s
        runner.wait_exited(grace + GROUP_GONE_WAIT_S + EOF_WAIT_S + 30.0)
    server.shutdown()


def life_reason(state: str, idle_for: float, idle_timeout: float | None, retention: float | None) -> str | None:
    """Why a runner in ``state``, with no authenticated request for ``idle_for`` seconds, must end now (or None).

    Before a start: ``idle_timeout``. While the command runs: never here (its ``max_runtime_s`` ends it, and
    then the retention runs). After the command exited: ``retention``, counted from the exit or the last
    request, whichever came later."""
    if state == "idle" and idle_timeout is not None and idle_for >= idle_timeout:
        return EXIT_IDLE_BEFORE_START
    if state == "exited" and retention is not None and idle_for >= retention:
        return EXIT_RETENTION_EXPIRED
    return None


def _life_watchdog(server: RunnerServer, idle_timeout: float | None, retention: float | None) -> None:
    """Ends the runner when its life is over, and closes connections that did not authenticate in time."""
    runner = server.runner
    tick = 0.25
    for limit in (idle_timeout, retention):
        if limit is not None:
            tick = min(tick, max(0.02, limit / 4))
    while not runner.shutting_down:
        time.sleep(tick)
        server.reap_unauthenticated()
        with runner.cond:
            if runner.active_requests:
                continue
            state = runner.state
            idle_for = time.monotonic() - runner.last_activity
        reason = life_reason(state, idle_for, idle_timeout, retention)
        if reason is not None:
            what = "before any command was started" if reason == EXIT_IDLE_BEFORE_START else "after the command exited"
            _log(f"no request for {idle_for:.0f}s {what}")
            request_shutdown(server, reason=reason)
            return


def run_on_exit_hook(command: str, reason: str, state_dir: str) -> int | None:
    """Run the ``--on-exit`` shell command once (a cloud machine destroys itself there); its exit status.

    It gets the runner's environment (less the token) and ``TRAINORCH_EXIT_REASON``, ``TRAINORCH_STATE_DIR``;
    its output goes to the runner's stderr. The command itself is never logged (it may name a credential
    file). It runs in a session of its own, so it survives the runner if the machine starts to go down."""
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    env["TRAINORCH_EXIT_REASON"] = reason
    env["TRAINORCH_STATE_DIR"] = state_dir
    _log(f"running the --on-exit hook (reason {reason})")
    try:
        proc = subprocess.run(command, shell=True, env=env, cwd=state_dir, stdin=subprocess.DEVNULL,
                              start_new_session=True, timeout=ON_EXIT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        _log(f"the --on-exit hook did not finish within {ON_EXIT_TIMEOUT_S:g}s")
        return None
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        _log(f"the --on-exit hook could not run: {exc}")
        return None
    if proc.returncode != 0:
        _log(f"the --on-exit hook exited with status {proc.returncode}")
    return proc.returncode


def read_token_file(path: str) -> str:
    """The token in ``path``, which is deleted. Refused (ValueError) if others may read it or it is a link."""
    try:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ValueError(f"cannot open the token file: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("the token file is not a regular file")
            if st.st_mode & 0o077:
                raise ValueError(f"the token file may be read by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                                 "it must be 0600")
            raw = f.read(4097)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if len(raw) > 4096:
        raise ValueError("the token file is too large")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("the token file is not UTF-8") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError("the token file holds no token (one line, no spaces)")
    return token


def write_token_file(directory: str, token: str) -> str:
    """A new 0600 file in ``directory`` holding ``token``; its path."""
    fd, path = tempfile.mkstemp(prefix=".runner-token-", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    return path


def _reexec_with_token_file(argv: list[str], token: str, state_dir: str) -> None:
    """Start this runner again (same pid) without the token in its environment: a job may read
    ``/proc/<runner pid>/environ``, which keeps the environment the process was started with. Returns only
    if that is not possible (then the caller goes on as it is)."""
    script = globals().get("__file__")
    if not sys.executable or not script or not os.path.isfile(script):
        _log(f"warning: the token came in {TOKEN_ENV} and this runner cannot restart itself without it; "
             "prefer --token-file")
        return
    path = write_token_file(state_dir, token)
    try:
        os.execve(sys.executable, [sys.executable, os.path.abspath(script), *argv, "--token-file", path],
                  dict(os.environ))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        _log(f"warning: could not restart without {TOKEN_ENV} in the environment ({exc}); prefer --token-file")


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The server side of the pinned channel (docs/PROTOCOL.md section 4): TLS 1.2 or later with the job's own
    certificate and key (the client trusts that certificate and nothing else)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _positive_or_none(value: float | None) -> float | None:
    return value if value is not None and value > 0 else None


def main(argv: list[str] | None = None, *, reexec: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="runner.py", description="trainorch runner: runs one job, serves it over HTTP")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-file", default=None,
                        help="read the bearer token from this file (mode 0600), then delete it")
    parser.add_argument("--idle-timeout", type=float, default=None,
                        help="exit after S seconds without an authenticated request before a command was started "
                        "(and after the command exited, unless --retention is given)")
    parser.add_argument("--retention", type=float, default=None,
                        help="after the command exited, keep serving its files until S seconds passed without an "
                        "authenticated request (counted from the exit at the earliest), then exit")
    parser.add_argument("--on-exit", default=None, metavar="CMD",
                        help="shell command run once when the runner ends its own life (idle, retention, shutdown "
                        "request, error; not on SIGTERM/SIGINT), with TRAINORCH_EXIT_REASON set. argv is public: "
                        "no secret in CMD")
    parser.add_argument("--auth-timeout", type=float, default=DEFAULT_AUTH_TIMEOUT_S,
                        help="close a connection that has not sent a whole authenticated request head in S seconds")
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES,
                        help="largest input file accepted (bigger uploads get 413)")
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="serve HTTPS with this certificate (PEM; needs --tls-key): the client pins it")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key (PEM)")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        _log("refusing to start: --tls-cert and --tls-key go together")
        return 2
    ssl_context = None
    if args.tls_cert is not None:
        try:
            ssl_context = server_ssl_context(args.tls_cert, args.tls_key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            _log(f"refusing to start: cannot load --tls-cert/--tls-key: {exc}")
            return 2

    state_dir = os.path.abspath(args.state_dir)
    env_token = os.environ.pop(TOKEN_ENV, None)  # never passed on, whichever way the token came
    if args.token_file:
        try:
            token = read_token_file(args.token_file)
        except ValueError as exc:
            _log(f"refusing to start: {exc}")
            return 2
        if env_token is not None:
            _log(f"warning: {TOKEN_ENV} is set as well as --token-file: ignored, but a job can read it in "
                 "/proc/<runner pid>/environ; do not set it")
    else:
        token = (env_token or "").strip()
        if not token:
            _log(f"refusing to start: give the bearer token with --token-file PATH (a 0600 file the runner "
                 f"deletes) or in the environment variable {TOKEN_ENV}")
            return 2
        if reexec:
            _private_dir(state_dir)
            _reexec_with_token_file(argv, token, state_dir)

    _private_dir(state_dir)
    # One runner per state dir: a second one would take the first one's job for dead and kill it.
    lock_fd = _open_private(os.path.join(state_dir, "runner.lock"), os.O_RDWR)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        _log(f"refusing to start: another runner serves {state_dir}")
        os.close(lock_fd)
        return 3
    info_path = os.path.join(state_dir, "runner.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(info_path)  # never let a reader find the previous runner's address

    idle_timeout = _positive_or_none(args.idle_timeout)
    retention = _positive_or_none(args.retention) if args.retention is not None else idle_timeout
    runner = Runner(state_dir, token, max_upload_bytes=max(0, args.max_upload_bytes))
    server_cls: type[RunnerServer] = RunnerServer
    if ":" in args.host:

        class _Server6(RunnerServer):
            address_family = socket.AF_INET6

        server_cls = _Server6
    server = server_cls((args.host, args.port), runner, auth_timeout=max(0.1, args.auth_timeout),
                        ssl_context=ssl_context)
    host, port = server.server_address[0], server.server_address[1]
    scheme = "https" if ssl_context is not None else "http"
    url = f"{scheme}://{_url_host(args.host if args.host not in ('', '0.0.0.0', '::') else str(host))}:{port}"
    _atomic_write_json(info_path, {"pid": os.getpid(), "host": args.host, "port": port, "url": url})

    def on_signal(signum: int, frame: Any) -> None:
        # A runner told to stop cancels its command with a short grace and exits once the group is gone.
        with runner.cond:
            grace = min(runner._grace_s, SIGNAL_GRACE_S)
        threading.Thread(target=request_shutdown, args=(server, grace, EXIT_SIGNAL), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=_life_watchdog, args=(server, idle_timeout, retention), name="runner-life",
                     daemon=True).start()
    _log(f"listening on {url} (state dir {state_dir})")
    try:
        server.serve_forever(poll_interval=0.1)
    except BaseException:
        _log("the server failed:\n" + traceback.format_exc())
        with runner.cond:
            runner.exit_reason = runner.exit_reason or EXIT_ERROR
    finally:
        server.server_close()
        with contextlib.suppress(OSError):
            os.unlink(info_path)
    with runner.cond:
        reason = runner.exit_reason = runner.exit_reason or EXIT_ERROR
        runner._persist_status()
    _log(f"exited: {reason}")
    if args.on_exit and reason in ON_EXIT_REASONS:
        run_on_exit_hook(args.on_exit, reason, state_dir)
    return 1 if reason == EXIT_ERROR else 0


if __name__ == "__main__":
    sys.exit(main(reexec=True))
