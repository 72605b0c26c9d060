"""Artifact download: streaming, hashed while written, verified against the runner's manifest, placed atomically.

The runner (``docs/PROTOCOL.md`` §2) hashes every output file on the training machine once the command exited and
lists ``{"path", "size", "sha256"}`` in its manifest. Here each file is fetched from ``/v1/files/{path}`` into a
temporary ``.<basename>.part`` beside its final place, hashed while it is written, compared with the manifest and
only then fsynced and renamed into place. So a file under ``artifacts/<job_id>/`` is always the trainer's bytes.

- A size or hash mismatch removes the ``.part``, is retried once from scratch, then raises :class:`ArtifactMismatch`
  (an :class:`~trainorch_jupyter.model.IntegrityError`) naming the file and both hashes.
- A connection lost mid-body resumes with ``Range: bytes=<have>-`` (a ``200`` answer restarts from zero), a bounded
  number of times, then raises :class:`~trainorch_jupyter.model.RunnerError`; the ``.part`` stays, and a later call
  rehashes it from disk and resumes from its end.
- Writing and hashing happen in one worker thread (``hashlib`` and ``write`` release the GIL), fed in batches of
  ``chunk_size`` bytes with at most :data:`_MAX_PENDING` batches in flight, so the event loop keeps reading the
  socket meanwhile and memory stays flat whatever the file's size. Each batch is joined into one buffer so the
  worker does one hash update and one write per batch, and the download's HTTP/1.1 connection reads up to
  :data:`_READ_SIZE` bytes per socket read instead of httpcore's 64 KiB (``benchmarks/bench_download.py``).
- Request headers (the runner's bearer token) never go into a file, a log line or an exception; URLs are recorded
  without query string or user info.

Destinations. A download never replaces a file it did not place itself. Before the first byte is fetched the whole
destination is checked (:func:`plan_placement`): a file already there with the same SHA-256 is kept as it is (a
re-download is idempotent); one with other bytes stops the download with :class:`DestinationConflict`, which lists
every such file, unless ``overwrite=True``. The one exception is the job's own folder (``artifacts/<job_id>/``,
``own_folder=True``): there the files named in the manifest, and ``trainorch-artifact.json``, are the download's own
and are replaced; any other file in it is never touched. Free disk space on the destination's filesystem is checked
against what is still to be written, also before the first byte (:class:`NotEnoughSpace`). A file that appears in
the destination while the download runs is not replaced either: a new file is placed with ``link()``, which fails
rather than replace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpcore
import httpx

from trainorch_jupyter.model import ArtifactInfo, IntegrityError, RunnerError, TrainorchError, utcnow

try:  # POSIX advisory locks: two downloads of the same file must not write one .part
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ARTIFACT_INDEX",
    "MAX_MANIFEST_FILES",
    "ArtifactMismatch",
    "DestinationConflict",
    "NotEnoughSpace",
    "Placement",
    "check_destination",
    "check_free_space",
    "check_safetensors",
    "copy_artifacts",
    "download_file",
    "download_manifest",
    "manifest_entries",
    "plan_placement",
    "redact_url",
    "safe_relpath",
    "verify_local",
]

log = logging.getLogger(__name__)

ARTIFACT_INDEX = "trainorch-artifact.json"
_PART_SUFFIX = ".part"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_PENDING = 2  # batches handed to the writer thread and not yet done
_HASH_IN_THREAD = True  # False: hash and write on the event loop (benchmarks/bench_download.py compares both)
_MAX_RESUMES = 20  # resumes of one attempt in all
_MAX_STALLED_RESUMES = 3  # resumes in a row that got no new byte
_RESUME_BACKOFF_S = 0.2  # first wait before a resume that follows a stalled one; doubles, capped
_RESUME_BACKOFF_MAX_S = 5.0
_LOCK_POLL_S = 0.2
_LOCK_TIMEOUT_S = 3600.0
_HASH_BLOCK = 1 << 20
_READ_SIZE = 256 << 10  # bytes per socket read asked of httpcore on the download's connection (its default: 64 KiB)
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_MANIFEST_FILES = 100_000  # more files than this in one manifest: refused before anything is written
_MAX_PATH_BYTES = 4096  # a manifest path, UTF-8 (Linux's PATH_MAX)
_MAX_NAME_BYTES = 255  # one component of it (NAME_MAX)
_SECRET_KEY_RE = re.compile(r"(token|secret|password|passwd|api[_-]?key|authorization|credential)", re.IGNORECASE)


class ArtifactMismatch(IntegrityError):
    """A file's bytes do not match the manifest (after the one retry). Carries what was expected and got."""

    def __init__(self, name: str, *, expected_sha256: str, got_sha256: str | None, expected_size: int,
                 got_size: int | None, attempts: int, detail: str = "") -> None:
        self.name = name
        self.expected_sha256 = expected_sha256
        self.got_sha256 = got_sha256
        self.expected_size = expected_size
        self.got_size = got_size
        self.attempts = attempts
        what = "size and SHA-256" if got_size != expected_size else "SHA-256"
        msg = (f"{name}: {what} do not match the manifest after {attempts} attempt(s): "
               f"expected sha256 {expected_sha256} ({expected_size} bytes), "
               f"got sha256 {got_sha256 or '-'} ({'-' if got_size is None else got_size} bytes)")
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)


class DestinationConflict(TrainorchError):
    """Files in the destination would be replaced by a download that did not place them. Nothing was written.

    ``differing``: regular files whose bytes are not the job's (``overwrite=True`` replaces them); ``blocked``:
    folders or special files where a file must go, or files where a folder must go (never replaced);
    ``paths``: both.
    """

    def __init__(self, dest_dir: Path, differing: Sequence[Path] = (), blocked: Sequence[Path] = ()) -> None:
        self.dest_dir = Path(dest_dir)
        self.differing = list(differing)
        self.blocked = list(blocked)
        self.paths = [*self.differing, *self.blocked]
        parts = []
        if self.differing:
            n = len(self.differing)
            parts.append(f"{n} file{'s' if n != 1 else ''} already in {self.dest_dir} "
                         f"{'hold' if n != 1 else 'holds'} other content than the job's: "
                         f"{_list_names(self.dest_dir, self.differing)}; pass --overwrite (overwrite=True) to "
                         f"replace {'them' if n != 1 else 'it'}, or download to another folder")
        if self.blocked:
            parts.append(f"{_list_names(self.dest_dir, self.blocked)} in {self.dest_dir} "
                         "cannot be replaced by a file of the job (a folder or a special file, or a file where the "
                         "job has a folder); move it away or download to another folder")
        super().__init__("download refused, nothing was written: " + "; ".join(parts))


class NotEnoughSpace(TrainorchError):
    """The destination's filesystem has less free space than the download still has to write. Nothing was written."""

    def __init__(self, path: Path, needed: int, free: int) -> None:
        self.path = Path(path)
        self.needed = needed
        self.free = free
        super().__init__(f"not enough free disk space for the download into {self.path}: it needs {needed} bytes "
                         f"({_human(needed)}), {free} bytes ({_human(free)}) are free; free some space or download "
                         "to another folder")


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _list_names(root: Path, paths: Sequence[Path], limit: int = 10) -> str:
    names = []
    for p in paths[:limit]:
        for base in (root, root.resolve()):
            with contextlib.suppress(ValueError):
                names.append(str(Path(p).relative_to(base)))
                break
        else:
            names.append(str(p))
    text = ", ".join(names)
    if len(paths) > limit:
        text += f" and {len(paths) - limit} more"
    return text


class _Mismatch(Exception):
    """One attempt ended with bytes that cannot be the manifest's (internal; becomes ArtifactMismatch)."""

    def __init__(self, got_sha256: str | None, got_size: int | None, detail: str = "") -> None:
        super().__init__(detail)
        self.got_sha256 = got_sha256
        self.got_size = got_size
        self.detail = detail


class _Restart(Exception):
    """The server answered 200 to a Range request: start this attempt again from byte zero."""


# --------------------------------------------------------------------------------------------
# Names, URLs
# --------------------------------------------------------------------------------------------


def safe_relpath(name: str) -> PurePosixPath:
    """The manifest path ``name`` as a relative POSIX path, or IntegrityError if it could leave the folder.

    Rejected: empty, absolute, ``.``/``..`` components, empty components, backslashes, NUL and control characters,
    Windows drive letters, and names that collide with this module's own files (``*.part`` temporaries beginning
    with a dot, the top-level ``trainorch-artifact.json``).
    """
    if not isinstance(name, str) or not name:
        raise IntegrityError(f"manifest path {name!r} is not a non-empty string")
    if any(ord(c) < 32 or c == "\x7f" for c in name) or "\\" in name:
        raise IntegrityError(f"manifest path {name!r} holds a backslash or control character")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise IntegrityError(f"manifest path {name!r} is absolute")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise IntegrityError(f"manifest path {name!r} has an empty, '.' or '..' component")
    base = parts[-1]
    if base.startswith(".") and base.endswith(_PART_SUFFIX):
        raise IntegrityError(f"manifest path {name!r} collides with the download's temporary files")
    if name == ARTIFACT_INDEX:
        raise IntegrityError(f"manifest path {name!r} collides with the artifact index file")
    return PurePosixPath(*parts)


def _target(dest_dir: Path, name: str) -> tuple[Path, Path]:
    """(final path, .part path) for ``name`` under ``dest_dir``; rejects names and symlinks that escape it."""
    rel = safe_relpath(name)
    root = dest_dir.resolve()
    final = root.joinpath(*rel.parts)
    # An existing component that is a symlink could point anywhere: refuse to follow it.
    probe = root
    for part in rel.parts:
        probe = probe / part
        if probe.is_symlink():
            raise IntegrityError(f"{name}: {probe} is a symlink; refusing to write through it")
    if os.path.commonpath([root, final.resolve()]) != str(root):
        raise IntegrityError(f"{name}: resolves outside {root}")
    return final, final.with_name(f".{final.name}{_PART_SUFFIX}")


def redact_url(url: str) -> str:
    """``url`` without user info, query string or fragment (where tokens could hide)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _file_url(base_url: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/v1/files/{quote(name, safe='/')}"


def _check_expected(name: str, expected_size: Any, expected_sha256: Any) -> tuple[int, str]:
    if not isinstance(expected_size, int) or isinstance(expected_size, bool) or expected_size < 0:
        raise IntegrityError(f"{name}: manifest size {expected_size!r} is not a non-negative integer")
    sha = expected_sha256.lower() if isinstance(expected_sha256, str) else ""
    if not _SHA256_RE.match(sha):
        raise IntegrityError(f"{name}: manifest sha256 {expected_sha256!r} is not 64 hex digits")
    return expected_size, sha


# --------------------------------------------------------------------------------------------
# Hashing, fsync, locks
# --------------------------------------------------------------------------------------------


def _hash_file(path: Path, limit: int | None = None) -> tuple[Any, int]:
    """(sha256 object, bytes read) over ``path``'s first ``limit`` bytes (all when None)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_HASH_BLOCK)
        view = memoryview(buf)
        while limit is None or n < limit:
            want = _HASH_BLOCK if limit is None else min(_HASH_BLOCK, limit - n)
            got = f.readinto(view[:want])
            if not got:
                break
            h.update(view[:got])
            n += got
    return h, n


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _try_lock(f: IO[bytes]) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


async def _open_locked(part: Path, name: str) -> IO[bytes]:
    """Open (creating) ``part`` for read/write and hold an exclusive lock on it, waiting for another holder."""
    waited = 0.0
    while True:
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        f = os.fdopen(fd, "r+b")
        if _try_lock(f):
            # The holder we waited for may have renamed or removed the file we opened: use the one at the path.
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(part))
            except FileNotFoundError:
                same = False
            if same:
                return f
            f.close()
            continue
        f.close()
        if waited >= _LOCK_TIMEOUT_S:
            raise RunnerError(f"{name}: another download of this file has held its lock for {waited:.0f}s")
        await asyncio.sleep(_LOCK_POLL_S)
        waited += _LOCK_POLL_S


# --------------------------------------------------------------------------------------------
# Destinations: never replace what the download did not place; enough free space
# --------------------------------------------------------------------------------------------


@dataclass
class Placement:
    """What a download into ``dest_dir`` will do, decided before its first byte (:func:`plan_placement`)."""

    dest_dir: Path
    present: set[str] = field(default_factory=set)  # already there with the same bytes: left as they are
    replace: set[str] = field(default_factory=set)  # there with other bytes, and the download may replace them
    new: set[str] = field(default_factory=set)  # not there yet
    index_exists: bool = False  # trainorch-artifact.json is there (and may be replaced)
    needed_bytes: int = 0  # the sizes of the files still to be written
    resumable_bytes: int = 0  # of which .part files of an earlier download already hold this many


def _same_content(path: Path, size: int, sha256: str) -> bool:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        h, _ = _hash_file(path)
    except OSError:
        return False
    return bool(h.hexdigest() == sha256)


def _index_equivalent(path: Path, job_id: str, entries: Sequence[tuple[str, int, str]]) -> bool:
    """True when ``path`` is this job's artifact index listing exactly ``entries`` (its dates may differ)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64 << 20)
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("job_id") != job_id or not isinstance(data.get("files"), list):
            return False
        listed = {(str(f["metadata"]["name"]), int(f["size_bytes"]), str(f["hash_sha256"])) for f in data["files"]}
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return listed == set(entries)


def plan_placement(dest_dir: Path, entries: Sequence[tuple[str, int, str]], *, job_id: str,
                   own_folder: bool = False, overwrite: bool = False) -> Placement:
    """Check ``dest_dir`` for the files ``entries`` (name, size, sha256) before anything is written.

    A file already there with the same size and SHA-256 is left as it is. One with other bytes may be replaced
    only with ``overwrite`` or in the job's ``own_folder`` (``artifacts/<job_id>/``, where the files named in the
    manifest are the download's own); else it is a conflict. ``trainorch-artifact.json`` is checked the same way
    (an index of this job listing the same files counts as identical). A folder or special file where a file must
    go, or a file where a folder must go, is never replaced. Raises :class:`DestinationConflict` listing every
    conflict at once, or IntegrityError for a name that could leave the folder (symlinks included).
    """
    dest_dir = Path(dest_dir)
    plan = Placement(dest_dir)
    differing: list[Path] = []
    blocked: list[Path] = []
    if os.path.lexists(dest_dir) and not dest_dir.is_dir():
        raise DestinationConflict(dest_dir, blocked=[dest_dir])
    root = dest_dir.resolve()
    for rel, size, sha in entries:
        final, part = _target(dest_dir, rel)
        probe = root
        parent_ok = True
        for comp in PurePosixPath(rel).parts[:-1]:
            probe = probe / comp
            if os.path.lexists(probe) and not probe.is_dir():
                if probe not in blocked:
                    blocked.append(probe)
                parent_ok = False
                break
        if not parent_ok:
            continue
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            plan.new.add(rel)
        else:
            if not stat.S_ISREG(st.st_mode):
                blocked.append(final)
                continue
            if st.st_size == size and _same_content(final, size, sha):
                plan.present.add(rel)
                continue
            if not (own_folder or overwrite):
                differing.append(final)
                continue
            plan.replace.add(rel)
        plan.needed_bytes += size
        with contextlib.suppress(OSError):
            have = os.lstat(part).st_size
            if have <= size:
                plan.resumable_bytes += have
    index = dest_dir / ARTIFACT_INDEX
    try:
        st = os.lstat(index)
    except FileNotFoundError:
        pass
    else:
        plan.index_exists = True
        if not stat.S_ISREG(st.st_mode):
            blocked.append(index)
        elif not (own_folder or overwrite or _index_equivalent(index, job_id, entries)):
            differing.append(index)
    if differing or blocked:
        raise DestinationConflict(dest_dir, differing, blocked)
    return plan


def check_free_space(path: Path, needed: int) -> None:
    """Raise :class:`NotEnoughSpace` when the filesystem of ``path`` (or of its nearest existing parent) has fewer
    than ``needed`` bytes free for this user."""
    if needed <= 0:
        return
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:  # pragma: no cover - an odd filesystem: the write itself will tell
        log.debug("free space of %s unknown: %s", probe, exc)
        return
    if needed > free:
        raise NotEnoughSpace(Path(path), needed, free)


def check_destination(dest_dir: Path, manifest: Mapping[str, Any], *, job_id: str, own_folder: bool = False,
                      overwrite: bool = False) -> Placement:
    """:func:`plan_placement` and :func:`check_free_space` for the runner's ``manifest``; nothing is written."""
    plan = plan_placement(dest_dir, manifest_entries(manifest), job_id=job_id, own_folder=own_folder,
                          overwrite=overwrite)
    check_free_space(dest_dir, plan.needed_bytes - (plan.resumable_bytes if own_folder else 0))
    return plan


def _place(src: Path, final: Path, *, overwrite: bool, dest_dir: Path, size: int, sha256: str) -> None:
    """Move the verified ``src`` to ``final``. Without ``overwrite`` a file that appeared at ``final`` meanwhile
    is not replaced (``link`` fails where ``rename`` would replace): DestinationConflict, unless it holds the same
    bytes (another download of the same file finished first)."""
    if overwrite:
        os.replace(src, final)
    else:
        try:
            os.link(src, final)
        except FileExistsError:
            _unlink(src)
            if _same_content(final, size, sha256):
                return
            raise DestinationConflict(dest_dir, [final]) from None
        except OSError:  # no hard links on this filesystem: check, then rename (a narrow window)
            if os.path.lexists(final):
                _unlink(src)
                if _same_content(final, size, sha256):
                    return
                raise DestinationConflict(dest_dir, [final]) from None
            os.replace(src, final)
        else:
            _unlink(src)
    _fsync_dir(final.parent)


def copy_artifacts(infos: Sequence[ArtifactInfo], dest_dir: Path, *, job_id: str, overwrite: bool = False,
                   index_source: Path | None = None) -> list[ArtifactInfo]:
    """Copy verified files (from ``artifacts/<job_id>/``) into a folder of the user's, with the rules of
    :func:`plan_placement` (not the job's own folder) and the free-space check, both before the first byte.

    Each copy is hashed before it is placed. The index is ``index_source``'s with the new paths.
    """
    dest_dir = Path(dest_dir)
    entries = [(i.name, i.size_bytes, i.hash_sha256) for i in infos]
    plan = plan_placement(dest_dir, entries, job_id=job_id, overwrite=overwrite)
    check_free_space(dest_dir, plan.needed_bytes)
    dest_dir.mkdir(parents=True, exist_ok=True)
    out: list[ArtifactInfo] = []
    for info in infos:
        final, _ = _target(dest_dir, info.name)
        if info.name not in plan.present:
            final.parent.mkdir(parents=True, exist_ok=True)
            # A fresh hidden name (never a file of the user's), created with the usual mode (not mkstemp's 0600).
            tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}{_PART_SUFFIX}")
            try:
                with open(tmp, "xb") as out_f, open(info.path, "rb") as in_f:
                    shutil.copyfileobj(in_f, out_f, _HASH_BLOCK)
                    out_f.flush()
                    os.fsync(out_f.fileno())
                h, n = _hash_file(tmp)
                if n != info.size_bytes or h.hexdigest() != info.hash_sha256:
                    raise ArtifactMismatch(info.name, expected_sha256=info.hash_sha256, got_sha256=h.hexdigest(),
                                           expected_size=info.size_bytes, got_size=n, attempts=1,
                                           detail=f"{info.path} changed after it was verified")
                _place(tmp, final, overwrite=info.name in plan.replace, dest_dir=dest_dir, size=info.size_bytes,
                       sha256=info.hash_sha256)
            finally:
                _unlink(tmp)
        out.append(replace(info, path=final))
    data: dict[str, Any] = {}
    if index_source is not None:
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(Path(index_source).read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                data = loaded
    data.setdefault("job_id", job_id)
    data.setdefault("created_at", utcnow().isoformat())
    data["files"] = [i.to_dict() for i in out]
    _write_json_atomic(dest_dir / ARTIFACT_INDEX, data, overwrite=plan.index_exists)
    return out


# --------------------------------------------------------------------------------------------
# The writer thread
# --------------------------------------------------------------------------------------------


class _Sink:
    """Writes and hashes batches of chunks, in order, in one worker thread; ``done`` counts bytes written."""

    def __init__(self, f: IO[bytes], hasher: Any, executor: ThreadPoolExecutor) -> None:
        self.f = f
        self.hasher = hasher
        self.done = 0
        self._executor = executor
        self._pending: deque[asyncio.Future[None]] = deque()

    def _work(self, chunks: list[bytes]) -> None:
        # One contiguous buffer per batch: one hash update and one write, so this thread gives up and takes back the
        # GIL twice per batch rather than twice per chunk (each take-back waits for the busy event loop thread).
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.hasher.update(data)
        self.f.write(data)
        self.done += len(data)

    async def put(self, chunks: list[bytes]) -> None:
        if not _HASH_IN_THREAD:  # the slower alternative, kept for the benchmark's comparison
            self._work(chunks)
            return
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self._executor, self._work, chunks))
        while len(self._pending) > _MAX_PENDING:
            await self._pending.popleft()

    async def drain(self) -> None:
        while self._pending:
            await self._pending.popleft()

    async def reset(self) -> None:
        """Forget every byte: the server sends the whole file again."""
        await self.drain()
        self.f.seek(0)
        self.f.truncate(0)
        self.hasher = hashlib.sha256()
        self.done = 0

    def drain_blocking(self) -> None:
        """Wait for the worker without the loop (cleanup after a cancel); swallows the worker's errors."""
        fut: Future[None] = self._executor.submit(lambda: None)
        fut.result()
        self._pending.clear()


# --------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------


async def download_file(
    http: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str],
    name: str,
    expected_size: int,
    expected_sha256: str,
    dest_dir: Path,
    chunk_size: int = 1 << 20,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Download ``url`` to ``dest_dir/name``, verified against ``expected_size`` and ``expected_sha256``.

    Returns the final path. Skips the download when the final file is already there with the right hash; a file
    there with other bytes is replaced only with ``overwrite`` (else :class:`DestinationConflict` before anything
    is written), and the free space is checked first (:class:`NotEnoughSpace`).
    Raises IntegrityError for a bad name (before anything is written) and :class:`ArtifactMismatch` when the bytes
    still do not match after one retry from scratch (nothing is left in place then); raises RunnerError when the
    server refuses or the connection keeps failing (the ``.part`` stays for a later resume).
    ``progress(done, total)`` is called from the event loop as bytes are written.
    """
    expected_size, expected_sha256 = _check_expected(name, expected_size, expected_sha256)
    final, part = _target(Path(dest_dir), name)
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    safe_url = redact_url(url)
    loop = asyncio.get_running_loop()

    if os.path.lexists(final):
        if final.is_file() and final.stat().st_size == expected_size:
            h, _ = await loop.run_in_executor(None, _hash_file, final)
            if h.hexdigest() == expected_sha256:
                log.debug("%s: already present and verified", name)
                if progress is not None:
                    progress(expected_size, expected_size)
                return final
        if not final.is_file():
            raise DestinationConflict(Path(dest_dir), blocked=[final])
        if not overwrite:
            raise DestinationConflict(Path(dest_dir), [final])
    have_part = 0
    with contextlib.suppress(OSError):
        have_part = os.lstat(part).st_size
    check_free_space(final.parent, expected_size - (have_part if have_part <= expected_size else 0))

    final.parent.mkdir(parents=True, exist_ok=True)
    last: _Mismatch | None = None
    attempts = 2
    for attempt in range(1, attempts + 1):
        f = await _open_locked(part, name)
        try:
            if attempt == 1 and final.is_file() and final.stat().st_size == expected_size:
                # Another process may have finished this file while we waited for the lock.
                h, _ = await loop.run_in_executor(None, _hash_file, final)
                if h.hexdigest() == expected_sha256:
                    _unlink(part)
                    return final
            if attempt > 1:
                f.truncate(0)
            try:
                await _attempt(http, url, safe_url, headers, name, f, part, expected_size, expected_sha256,
                               chunk_size, progress)
            except _Mismatch as exc:
                last = exc
                log.warning("%s: attempt %d of %d does not match the manifest (%s)", name, attempt, attempts,
                            exc.detail or "hash")
                _unlink(part)
                continue
            f.flush()
            await loop.run_in_executor(None, os.fsync, f.fileno())
            if fcntl is None:  # pragma: no cover - Windows cannot rename an open file
                f.close()
            await loop.run_in_executor(None, functools.partial(
                _place, part, final, overwrite=overwrite, dest_dir=Path(dest_dir), size=expected_size,
                sha256=expected_sha256))
            log.debug("%s: verified and placed (%d bytes)", name, expected_size)
            if progress is not None:
                progress(expected_size, expected_size)
            return final
        finally:
            f.close()
    assert last is not None
    raise ArtifactMismatch(name, expected_sha256=expected_sha256, got_sha256=last.got_sha256,
                           expected_size=expected_size, got_size=last.got_size, attempts=attempts,
                           detail=last.detail)


async def _attempt(http: httpx.AsyncClient, url: str, safe_url: str, headers: Mapping[str, str], name: str,
                   f: IO[bytes], part: Path, expected_size: int, expected_sha256: str, chunk_size: int,
                   progress: Callable[[int, int], None] | None) -> None:
    """Fill the locked ``f`` with the file's bytes and check them; raises _Mismatch, RunnerError."""
    loop = asyncio.get_running_loop()
    have = os.fstat(f.fileno()).st_size
    if have > expected_size:
        f.truncate(0)
        have = 0
    if have:
        # A .part from an earlier call: its bytes count only once hashed again from disk.
        hasher, have = await loop.run_in_executor(None, _hash_file, part, have)
        log.debug("%s: resuming from %d bytes already on disk", name, have)
    else:
        hasher = hashlib.sha256()
    f.seek(have)
    f.truncate(have)

    resumes = stalled = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainorch-download") as executor:
        sink = _Sink(f, hasher, executor)
        sink.done = have
        while sink.done < expected_size:
            start = sink.done
            try:
                await _stream_once(http, url, headers, name, sink, expected_size, chunk_size, progress)
            except _Restart:
                await sink.reset()
                continue
            except (httpx.TransportError, _Transient) as exc:
                try:
                    await sink.drain()
                except BaseException:
                    sink.drain_blocking()
                    raise
                resumes += 1
                stalled = stalled + 1 if sink.done == start else 0
                if resumes > _MAX_RESUMES or stalled > _MAX_STALLED_RESUMES:
                    raise RunnerError(
                        f"{name}: download from {safe_url} failed after {resumes} tries "
                        f"({sink.done} of {expected_size} bytes kept for a later resume): {_describe(exc)}"
                    ) from None
                delay = min(_RESUME_BACKOFF_MAX_S, _RESUME_BACKOFF_S * 2 ** (stalled - 1)) if stalled else 0.0
                log.info("%s: connection lost at %d of %d bytes (%s); resuming", name, sink.done, expected_size,
                         _describe(exc))
                if delay:
                    await asyncio.sleep(delay)
                continue
            except BaseException:
                sink.drain_blocking()
                raise
            await sink.drain()
            if sink.done < expected_size:
                # The server ended the response cleanly with fewer bytes than the manifest's size.
                raise _Mismatch(None, sink.done, f"the server sent {sink.done} of {expected_size} bytes")
        await sink.drain()
    got = sink.hasher.hexdigest()
    if got != expected_sha256:
        raise _Mismatch(got, sink.done)


class _Transient(Exception):
    """A retryable HTTP status (5xx, 429...): treated like a lost connection."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


async def _stream_once(http: httpx.AsyncClient, url: str, headers: Mapping[str, str], name: str, sink: _Sink,
                       expected_size: int, chunk_size: int, progress: Callable[[int, int], None] | None) -> None:
    """One GET from ``sink.done`` on; feeds the sink. Raises _Restart, _Mismatch, _Transient, TransportError."""
    have = sink.done
    req_headers = dict(headers)
    req_headers["Accept-Encoding"] = "identity"
    if have:
        req_headers["Range"] = f"bytes={have}-"
    async with http.stream("GET", url, headers=req_headers) as resp:
        status = resp.status_code
        if status == 416 and have:
            raise _Mismatch(None, None, f"the server refused a range from byte {have} (its file is shorter)")
        if status in _RETRYABLE_STATUS:
            raise _Transient(status)
        if status == 206 and have:
            cr = _parse_content_range(resp.headers.get("content-range"))
            if cr is None or cr[0] != have:
                raise _Restart()  # a range we did not ask for: start over rather than guess
            if cr[2] is not None and cr[2] != expected_size:
                raise _Mismatch(None, cr[2], f"the server's file is {cr[2]} bytes")
        elif status == 200:
            if have:  # the server ignored Range: take this whole answer from byte zero
                log.info("%s: the server ignored Range; downloading again from byte 0", name)
                await sink.reset()
                have = 0
        else:
            raise RunnerError(f"{name}: the runner answered HTTP {status} for {redact_url(url)}"
                              f"{_error_detail(await _read_small(resp))}")
        encoded = resp.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity")
        if status == 200 and not encoded:
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != expected_size:
                raise _Mismatch(None, int(length), f"the server announced {length} bytes")

        batch: list[bytes] = []
        batched = 0
        received = have
        # The loop thread's share per chunk: httpcore reads one socket chunk (up to _READ_SIZE bytes) and h11 copies
        # it a few times; hashing and writing happen in the sink's thread.
        with _larger_reads(resp):
            try:
                async for chunk in resp.aiter_bytes():
                    received += len(chunk)
                    if received > expected_size:
                        raise _Mismatch(None, received, f"the server sent more than {expected_size} bytes")
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= chunk_size:
                        await sink.put(batch)
                        batch, batched = [], 0
                        if progress is not None:
                            progress(received, expected_size)
            except httpx.TransportError:
                # Bytes received before a lost connection are good bytes: keep them for the resume.
                if batch:
                    await sink.put(batch)
                raise
        if batch:
            await sink.put(batch)
        if progress is not None:
            progress(received, expected_size)


def _h11_connection(resp: httpx.Response) -> Any:
    """The httpcore HTTP/1.1 connection that streams ``resp`` (httpx's default transport), else None."""
    obj: Any = resp.stream
    for _ in range(8):
        if isinstance(obj, httpcore.AsyncHTTP11Connection):
            return obj
        obj = next((v for v in (getattr(obj, a, None) for a in ("_stream", "_httpcore_stream", "_connection"))
                    if v is not None), None)
        if obj is None:
            break
    return None


@contextlib.contextmanager
def _larger_reads(resp: httpx.Response) -> Iterator[None]:
    """While the body of ``resp`` is read, let httpcore read up to :data:`_READ_SIZE` bytes per socket read.

    httpcore asks its socket stream for 64 KiB at a time, but asyncio's transport hands over up to 256 KiB per
    ``recv``, which anyio then slices into 64 KiB pieces (copying the rest each time): about 3x the Python work per
    byte on the loop thread. The setting is an instance attribute of the one connection that streams this response
    (an HTTP/1.1 connection serves one request at a time) and is put back afterwards; with any other transport
    (HTTP/2, a mock, a custom one) nothing changes.
    """
    conn = _h11_connection(resp) if _READ_SIZE else None
    if conn is None or not isinstance(conn.READ_NUM_BYTES, int) or conn.READ_NUM_BYTES >= _READ_SIZE:
        yield
        return
    had = vars(conn).get("READ_NUM_BYTES")
    conn.READ_NUM_BYTES = _READ_SIZE
    try:
        yield
    finally:
        if had is None:
            del conn.READ_NUM_BYTES
        else:
            conn.READ_NUM_BYTES = had


async def _read_small(resp: httpx.Response, limit: int = 4096) -> bytes:
    out = b""
    with contextlib.suppress(httpx.HTTPError):
        async for chunk in resp.aiter_raw():
            out += chunk
            if len(out) >= limit:
                break
    return out[:limit]


def _error_detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return f": {data['error'][:300]}"
    return ""


# --------------------------------------------------------------------------------------------
# A whole manifest
# --------------------------------------------------------------------------------------------


async def download_manifest(
    http: httpx.AsyncClient,
    base_url: str,
    *,
    headers: Mapping[str, str],
    manifest: Mapping[str, Any],
    dest_dir: Path,
    job_id: str,
    metadata: Mapping[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
    own_folder: bool = True,
    overwrite: bool = False,
) -> list[ArtifactInfo]:
    """Download every file of the runner's ``manifest`` into ``dest_dir``, verified.

    ``own_folder`` (the default): ``dest_dir`` is the job's own ``artifacts/<job_id>/``, whose files named in the
    manifest (and ``trainorch-artifact.json``) the download replaces when they differ; with ``own_folder=False``
    any file there with other bytes is a :class:`DestinationConflict` unless ``overwrite``. Every name, every
    existing file and the free disk space are checked before anything is written (:func:`plan_placement`);
    files already there with the right hash are not fetched again. ``*.safetensors`` files get their header
    checked. Then ``dest_dir/trainorch-artifact.json`` is written atomically with the job's ``metadata`` (keys that
    look like secrets are dropped) and one :class:`ArtifactInfo` per file, which are also returned.
    """
    entries = manifest_entries(manifest)
    dest_dir = Path(dest_dir)
    loop = asyncio.get_running_loop()
    plan = await loop.run_in_executor(None, functools.partial(
        plan_placement, dest_dir, entries, job_id=job_id, own_folder=own_folder, overwrite=overwrite))
    check_free_space(dest_dir, plan.needed_bytes - plan.resumable_bytes)
    dest_dir.mkdir(parents=True, exist_ok=True)
    infos: list[ArtifactInfo] = []
    for rel, size, sha in entries:
        url = _file_url(base_url, rel)
        cb: Callable[[int, int], None] | None = None
        if progress is not None:
            def cb(done: int, total: int, _rel: str = rel) -> None:
                progress(_rel, done, total)
        if rel in plan.present:  # hashed a moment ago by plan_placement
            path = _target(dest_dir, rel)[0]
            if cb is not None:
                cb(size, size)
        else:
            path = await download_file(http, url, headers=headers, name=rel, expected_size=size,
                                       expected_sha256=sha, dest_dir=dest_dir, progress=cb,
                                       overwrite=rel in plan.replace)
        info_meta: dict[str, Any] = {"name": rel, "verified": True, "source_url": redact_url(url)}
        if path.suffix == ".safetensors":
            loop = asyncio.get_running_loop()
            info_meta["safetensors"] = await loop.run_in_executor(None, _check_safetensors_summary, path)
        infos.append(ArtifactInfo(artifact_id=f"{job_id}:{rel}", job_id=job_id, path=path, size_bytes=size,
                                  hash_sha256=sha, created_at=utcnow(), metadata=info_meta))
    index = {
        "job_id": job_id,
        "created_at": utcnow().isoformat(),
        "metadata": _scrub(dict(metadata)),
        "files": [i.to_dict() for i in infos],
    }
    _write_json_atomic(dest_dir / ARTIFACT_INDEX, index, overwrite=own_folder or plan.index_exists)
    return infos


def manifest_entries(manifest: Mapping[str, Any]) -> list[tuple[str, int, str]]:
    """(path, size, sha256) of every file of the runner's manifest, checked: IntegrityError for a malformed one.

    An untrusted runner's answer is bounded: at most :data:`MAX_MANIFEST_FILES` files, paths of at most 4096
    bytes with components of at most 255, and ``total_size`` (when given) must be the sum of the sizes.
    """
    files = manifest.get("files") if isinstance(manifest, Mapping) else None
    if not isinstance(files, list):
        raise IntegrityError("the runner's manifest has no 'files' list")
    if len(files) > MAX_MANIFEST_FILES:
        raise IntegrityError(f"the runner's manifest lists {len(files)} files, more than the {MAX_MANIFEST_FILES} "
                             "a download accepts")
    out: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
            raise IntegrityError(f"manifest entry {i} has no 'path'")
        rel = entry["path"]
        try:
            encoded = rel.encode("utf-8")
        except UnicodeEncodeError:
            raise IntegrityError(f"manifest entry {i}: path {rel!r} is not valid UTF-8") from None
        if len(encoded) > _MAX_PATH_BYTES or any(len(c) > _MAX_NAME_BYTES for c in encoded.split(b"/")):
            raise IntegrityError(f"manifest entry {i}: path {rel[:80]!r}... is longer than {_MAX_PATH_BYTES} bytes "
                                 f"or has a component longer than {_MAX_NAME_BYTES}")
        safe_relpath(rel)
        size, sha = _check_expected(rel, entry.get("size"), entry.get("sha256"))
        if rel in seen:
            raise IntegrityError(f"manifest lists {rel!r} twice")
        seen.add(rel)
        out.append((rel, size, sha))
    # A file and a folder of the same name cannot both be placed.
    for rel in seen:
        parts = rel.split("/")
        for k in range(1, len(parts)):
            if "/".join(parts[:k]) in seen:
                raise IntegrityError(f"manifest lists {'/'.join(parts[:k])!r} as a file and as a folder")
    total = manifest.get("total_size")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool)
                              or total != sum(size for _, size, _ in out)):
        raise IntegrityError(f"the runner's manifest gives total_size {total!r}, but its files add up to "
                             f"{sum(size for _, size, _ in out)} bytes")
    return out


_manifest_entries = manifest_entries  # the earlier private name


def _scrub(value: Any) -> Any:
    """Drop mapping keys that look like secrets, recursively (belt and braces: callers pass no secrets)."""
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items() if not _SECRET_KEY_RE.search(str(k))}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _write_json_atomic(path: Path, data: Any, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically; without ``overwrite`` an existing file there is not replaced
    (:class:`DestinationConflict`)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        raw = text.encode("utf-8")
        _place(Path(tmp), path, overwrite=overwrite, dest_dir=path.parent, size=len(raw),
               sha256=hashlib.sha256(raw).hexdigest())
    finally:
        _unlink(Path(tmp))


# --------------------------------------------------------------------------------------------
# Local verification
# --------------------------------------------------------------------------------------------


def verify_local(dest_dir: Path) -> list[ArtifactInfo]:
    """Hash again every file listed in ``dest_dir/trainorch-artifact.json``; IntegrityError on any difference.

    Files are found by their manifest name under ``dest_dir`` (so the folder may have moved); the returned
    ArtifactInfo's ``path`` is where the file is now.
    """
    dest_dir = Path(dest_dir)
    index_path = dest_dir / ARTIFACT_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{index_path}: no artifact index (was the download completed?)") from None
    except ValueError as exc:
        raise IntegrityError(f"{index_path}: not valid JSON ({exc})") from None
    if not isinstance(index, dict) or not isinstance(index.get("files"), list):
        raise IntegrityError(f"{index_path}: no 'files' list")
    out: list[ArtifactInfo] = []
    for entry in index["files"]:
        try:
            info = ArtifactInfo.from_dict(entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{index_path}: malformed file entry ({exc!r})") from None
        final, _ = _target(dest_dir, info.name)
        try:
            h, n = _hash_file(final)
        except FileNotFoundError:
            raise IntegrityError(f"{info.name}: listed in {ARTIFACT_INDEX} but missing from {dest_dir}") from None
        got = h.hexdigest()
        if n != info.size_bytes or got != info.hash_sha256:
            raise ArtifactMismatch(info.name, expected_sha256=info.hash_sha256, got_sha256=got,
                                   expected_size=info.size_bytes, got_size=n, attempts=1,
                                   detail="the local file changed after it was verified")
        info.path = final
        out.append(info)
    return out


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

_MAX_HEADER = 100_000_000  # the safetensors library's limit
# Bits per element of every dtype the format defines (sub-byte float types included).
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


def check_safetensors(path: Path) -> None:
    """Raise IntegrityError unless ``path`` is a well-formed safetensors file.

    Checked with the standard library always (header length, JSON object without duplicate keys, every tensor's
    dtype/shape/data_offsets, offsets contiguous from 0 and covering the payload exactly) and, where the maintained
    ``safetensors`` library is importable, also by opening it with that library.
    """
    _check_safetensors_summary(Path(path))


def _check_safetensors_summary(path: Path) -> dict[str, Any]:
    n_tensors = _check_safetensors_stdlib(path)
    checked_by = ["stdlib"]
    if _check_safetensors_lib(path):
        checked_by.append("safetensors")
    return {"tensors": n_tensors, "checked_by": checked_by}


def _lib_safe_open() -> Callable[..., Any] | None:
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    return safe_open


def _check_safetensors_lib(path: Path) -> bool:
    """Open ``path`` with the safetensors library; False when the library could not be used at all."""
    safe_open = _lib_safe_open()
    if safe_open is None:
        return False
    lib_error: type[Exception]
    try:
        from safetensors import SafetensorError as lib_error
    except ImportError:  # pragma: no cover - very old releases
        lib_error = ValueError
    try:
        with safe_open(str(path), framework="numpy") as st:
            keys = list(st.keys())
            st.metadata()
            for key in keys:  # reads each tensor's header entry only, not its data
                st.get_slice(key).get_shape()
    except (lib_error, ValueError, OSError) as exc:
        raise IntegrityError(f"{path.name}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # e.g. the framework (numpy) is missing: the stdlib check stands alone
        log.debug("safetensors library check skipped for %s: %s", path.name, _describe(exc))
        return False
    return True


def _check_safetensors_stdlib(path: Path) -> int:
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{path.name}: not a valid safetensors file ({why})")

    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{file_size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise bad(f"header length {n} exceeds {_MAX_HEADER}")
        if 8 + n > file_size:
            raise bad(f"header length {n} runs past the end of the {file_size}-byte file")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise bad("the header does not start with '{'")

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in pairs:
            if k in d:
                raise bad(f"duplicate key {k!r} in the header")
            d[k] = v
        return d

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_dupes)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, IntegrityError):
            raise
        raise bad(f"the header is not a UTF-8 JSON object: {exc}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict)
                             or not all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"tensor {key!r}: entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise bad(f"tensor {key!r}: no dtype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape):
            raise bad(f"tensor {key!r}: shape must be a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
                or offs[0] > offs[1]):
            raise bad(f"tensor {key!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
        bits = _DTYPE_BITS.get(dtype)
        if bits is not None:  # an unknown (newer) dtype: its size cannot be checked here
            numel = 1
            for d in shape:
                numel *= d
            nbits = numel * bits
            if nbits % 8 or nbits // 8 != offs[1] - offs[0]:
                raise bad(f"tensor {key!r}: {dtype}{shape} needs {nbits / 8:g} bytes, "
                          f"data_offsets give {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], key))
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            raise bad(f"tensor {key!r}: data starts at {begin}, expected {pos} (gap or overlap)")
        pos = end
    payload = file_size - 8 - n
    if pos != payload:
        raise bad(f"the tensors cover {pos} bytes but the file holds {payload} bytes of data")
    return len(spans)
