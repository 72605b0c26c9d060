"""The workdir snapshot: the user's folder as it is at submit, packed into one deterministic ``tar.gz``.

What is sent: every file and folder under the workdir, except

- what the ``.gitignore`` files say (those in the workdir and its subfolders, and those above it up to the git
  repository's root, with git's semantics, through ``pathspec``), and what ``.trainorchignore`` files say; a
  ``.trainorchignore`` wins over every ``.gitignore`` (``!data.csv`` in it sends a file git ignores);
- always: ``.trainorch/`` (the workspace's private store), ``artifacts/`` at the root (downloaded adapters),
  ``.git/``, ``__pycache__/``, ``.ipynb_checkpoints/``, and virtual environments (any folder holding a
  ``pyvenv.cfg``, or a conda env's ``conda-meta/``);
- symbolic links whose target is outside the workdir (or missing): skipped, and listed (the job would not find
  the file: the dry run, the record and a diagnosis name them). Links inside the workdir are kept as relative
  links.

The archive is deterministic (sorted entries, fixed times and owners, gzip without a name or time), so the same
files give the same SHA-256: the snapshot is stored content-addressed as ``.trainorch/snapshots/<sha256>.tar.gz``
beside ``<sha256>.json`` (its manifest: every file with its size and SHA-256, and what was left out and why), and
``%train rerun`` sends it again. Files are copied into the archive as read at that moment, so a later edit of
the notebook folder cannot change a submitted job.

A size cap (``TRAINORCH_WORKDIR_MAX_MB``, default 200 MB of files) and a file-count cap keep a notebook folder
that happens to be a home directory from being sent: the error names the largest files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pathspec

from .model import SNAPSHOT_INPUT_NAME, SpecError

__all__ = [
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_MB",
    "SNAPSHOT_INPUT",
    "LeftOut",
    "Scan",
    "ScanEntry",
    "Snapshot",
    "human_size",
    "load_manifest",
    "max_bytes",
    "pack",
    "scan",
    "snapshot_dir",
    "snapshot_path",
    "verify",
]

DEFAULT_MAX_MB = 200.0
DEFAULT_MAX_FILES = 20_000
MAX_MB_ENV = "TRAINORCH_WORKDIR_MAX_MB"
#: the snapshot's name among a job's inputs (``$TRAINORCH_INPUT_DIR/.trainorch-workdir.tar.gz`` on the machine)
SNAPSHOT_INPUT = SNAPSHOT_INPUT_NAME
MAX_LEFT_OUT_RECORDED = 2000  # entries of the manifest's left-out list (the count is always exact)
_FIXED_MTIME = 1577836800  # 2020-01-01: the same bytes whatever the files' times
_ANYWHERE = {
    ".git": "git's own folder (.git)",
    ".trainorch": "trainorch's private store (.trainorch)",
    "__pycache__": "Python's bytecode cache (__pycache__)",
    ".ipynb_checkpoints": "Jupyter's checkpoints (.ipynb_checkpoints)",
}
_AT_ROOT = {"artifacts": "the downloaded artifacts (artifacts/)"}
_COPY_CHUNK = 1 << 20


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"  # pragma: no cover


def max_bytes(spec_mb: float | None = None) -> int:
    """The size cap in bytes: the spec's ``workdir_max_mb``, else ``$TRAINORCH_WORKDIR_MAX_MB``, else 200 MB."""
    if spec_mb is not None:
        return int(spec_mb * 1_000_000)
    raw = os.environ.get(MAX_MB_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise SpecError(MAX_MB_ENV, f"must be a number of MB, got {raw!r}") from None
        if value <= 0:
            raise SpecError(MAX_MB_ENV, f"must be a positive number of MB, got {raw!r}")
        return int(value * 1_000_000)
    return int(DEFAULT_MAX_MB * 1_000_000)


# --------------------------------------------------------------------------------------------
# Scanning: what would be sent
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanEntry:
    path: str  # relative, with "/"
    kind: str  # "file", "dir" or "link"
    size: int = 0
    executable: bool = False
    target: str = ""  # a link's relative target


@dataclass(frozen=True)
class LeftOut:
    path: str  # relative, with "/"; a folder ends in "/"
    reason: str
    size: int | None = None  # files only (a left-out folder is not walked)


@dataclass
class Scan:
    """What a workdir holds that would be sent (``entries``), and what is left out and why."""

    root: Path
    entries: list[ScanEntry] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    left_out_count: int = 0
    truncated: bool = False  # the walk stopped early (over a cap): totals are lower bounds

    @property
    def files(self) -> list[ScanEntry]:
        return [e for e in self.entries if e.kind == "file"]

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries if e.kind == "file")

    def biggest(self, n: int = 5) -> list[ScanEntry]:
        return sorted(self.files, key=lambda e: (-e.size, e.path))[:n]

    def has_file(self, rel: str) -> bool:
        return any(e.path == rel and e.kind == "file" for e in self.entries)

    def describe_biggest(self, n: int = 5) -> str:
        return ", ".join(f"{e.path} ({human_size(e.size)})" for e in self.biggest(n)) or "none"

    def check_size(self, limit: int, *, max_files: int = DEFAULT_MAX_FILES, field_name: str = "workdir") -> None:
        """SpecError (one line) when the files to send are over ``limit`` bytes or ``max_files`` files."""
        total = self.total_size
        count = len(self.files)
        shown = _shown_dir(self.root)
        if total > limit:
            more = " at least" if self.truncated else ""
            raise SpecError(field_name, f"the workdir {shown} holds{more} {human_size(total)} of files to send, over "
                            f"the cap of {human_size(limit)}; the largest: {self.describe_biggest()}. Leave them "
                            f"out in a .trainorchignore (and send a data file with --input), raise the cap "
                            f"({MAX_MB_ENV}=MB), choose a smaller --workdir, or send nothing with --no-workdir")
        if count > max_files or (self.truncated and count >= max_files):
            raise SpecError(field_name, f"the workdir {shown} holds more than {max_files} files to send; leave "
                            "folders out in a .trainorchignore, choose a smaller --workdir, or send nothing with "
                            "--no-workdir")


def _shown_dir(root: Path) -> str:
    with contextlib.suppress(ValueError):
        rel = root.relative_to(Path.cwd())
        return "." if str(rel) == "." else str(rel)
    home = Path.home()
    with contextlib.suppress(ValueError):
        return "~/" + str(root.relative_to(home))
    return str(root)


@dataclass(frozen=True)
class _IgnoreFile:
    """One ignore file: ``base`` is its folder relative to the workdir ("" for the root); for a .gitignore above
    the workdir, ``above`` is the workdir's path relative to that file's folder."""

    base: str
    above: str | None
    shown: str
    spec: pathspec.GitIgnoreSpec
    lines: tuple[str, ...]

    def relative(self, rel: str) -> str | None:
        if self.above is not None:
            return f"{self.above}/{rel}"
        if not self.base:
            return rel
        return rel[len(self.base) + 1:] if rel.startswith(self.base + "/") else None


class _Rules:
    """The ignore files that apply in one folder, deepest first: the .trainorchignore files, then the .gitignore
    files. The first file with a pattern that matches decides (git's precedence; a .trainorchignore wins)."""

    def __init__(self, trainorch: list[_IgnoreFile], git: list[_IgnoreFile]) -> None:
        self.trainorch = trainorch
        self.git = git

    def extended(self, rel_dir: str, directory: Path) -> _Rules:
        trainorch, git = list(self.trainorch), list(self.git)
        for name, into in ((".trainorchignore", trainorch), (".gitignore", git)):
            loaded = _load_ignore(directory / name)
            if loaded is not None:
                shown = f"{rel_dir}/{name}" if rel_dir else name
                into.insert(0, _IgnoreFile(rel_dir, None, shown, *loaded))
        return _Rules(trainorch, git)

    def ignored_by(self, rel: str, is_dir: bool) -> str | None:
        """Why ``rel`` is left out (the ignore file and its pattern), or None when it is sent."""
        for group in (self.trainorch, self.git):
            for f in group:
                sub = f.relative(rel)
                if sub is None:
                    continue
                result = f.spec.check_file(sub + "/" if is_dir else sub)
                if result.include is None:
                    continue
                if result.include:
                    index = result.index
                    pattern = f.lines[index] if index is not None and index < len(f.lines) else "?"
                    return f"ignored by {f.shown} (pattern '{pattern.strip()}')"
                return None  # a negated pattern ("!name") sends it
        return None


def _load_ignore(path: Path) -> tuple[pathspec.GitIgnoreSpec, tuple[str, ...]] | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise SpecError("workdir", f"cannot read {path}: {exc.strerror or exc}") from None
    lines = tuple(text.splitlines())
    return pathspec.GitIgnoreSpec.from_lines(lines), lines


def _rules_above(root: Path) -> _Rules:
    """The .gitignore files between the root of the git repository holding the workdir (if any) and the workdir."""
    if (root / ".git").exists():
        return _Rules([], [])  # the workdir is the repository's root
    parents: list[Path] = []
    d = root.parent
    while True:
        parents.append(d)
        if (d / ".git").exists():
            break
        if d.parent == d:
            return _Rules([], [])  # not inside a git repository: only the workdir's own ignore files apply
        d = d.parent
    git = []
    for directory in parents:  # nearest first
        loaded = _load_ignore(directory / ".gitignore")
        if loaded is not None:
            git.append(_IgnoreFile("", root.relative_to(directory).as_posix(), str(directory / ".gitignore"),
                                   *loaded))
    return _Rules([], git)


def _is_venv(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file() or (path / "conda-meta").is_dir()


def scan(workdir: Path | str, *, exclude: Iterable[Path] = (), max_total: int | None = None,
         max_files: int = DEFAULT_MAX_FILES) -> Scan:
    """Walk ``workdir`` and say what would be sent. Ignored folders are not walked. The walk stops (``truncated``)
    once the files are over ``max_total`` bytes by a margin or over ``max_files``, so a huge folder costs little.
    ``exclude``: more folders left out (the workspace's own artifacts folder when the workdir is above it)."""
    root = Path(workdir).expanduser().resolve()
    if not root.is_dir():
        raise SpecError("workdir", f"not a folder: {workdir}")
    excluded = {Path(p).resolve() for p in exclude}
    out = Scan(root)
    total = 0
    stop_at = None if max_total is None else max_total * 2

    def leave(rel: str, reason: str, size: int | None = None) -> None:
        out.left_out_count += 1
        if len(out.left_out) < MAX_LEFT_OUT_RECORDED:
            out.left_out.append(LeftOut(rel, reason, size))

    def walk(directory: Path, rel_dir: str, rules: _Rules) -> bool:
        nonlocal total
        rules = rules.extended(rel_dir, directory)
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise SpecError("workdir", f"cannot list {directory}: {exc.strerror or exc}") from None
        for child in children:
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            path = Path(child.path)
            try:
                st = child.stat(follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISLNK(st.st_mode):
                why = rules.ignored_by(rel, False)
                if why:
                    leave(rel, why)
                    continue
                target = _inside_link(path, root)
                if target is None:
                    leave(rel, f"a symbolic link to outside the workdir ({os.readlink(path)}): skipped")
                    continue
                out.entries.append(ScanEntry(rel, "link", target=target))
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir:
                reason = _ANYWHERE.get(child.name) or (_AT_ROOT.get(child.name) if not rel_dir else None)
                if reason is None and path.resolve() in excluded:
                    reason = "the workspace's artifacts folder"
                if reason is None and _is_venv(path):
                    reason = "a virtual environment"
                reason = reason or rules.ignored_by(rel, True)
                if reason:
                    leave(rel + "/", reason)
                    continue
                out.entries.append(ScanEntry(rel, "dir"))
                if not walk(path, rel, rules):
                    return False
                continue
            if child.name == ".git":  # a submodule's or worktree's .git file
                leave(rel, _ANYWHERE[".git"])
                continue
            if not stat.S_ISREG(st.st_mode):
                leave(rel, "not a regular file (a socket, a pipe or a device)")
                continue
            why = rules.ignored_by(rel, False)
            if why:
                leave(rel, why, st.st_size)
                continue
            out.entries.append(ScanEntry(rel, "file", st.st_size, bool(st.st_mode & 0o111)))
            total += st.st_size
            if (stop_at is not None and total > stop_at) or len(out.entries) > max_files * 2:
                out.truncated = True
                return False
        return True

    walk(root, "", _rules_above(root))
    return out


def _inside_link(path: Path, root: Path) -> str | None:
    """A link's target relative to the link's folder when it resolves inside ``root`` (and exists), else None."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if resolved != root and root not in resolved.parents:
        return None
    return os.path.relpath(resolved, path.parent.resolve())


# --------------------------------------------------------------------------------------------
# Packing: the archive, content-addressed
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    sha256: str
    path: Path  # .trainorch/snapshots/<sha256>.tar.gz
    size: int  # the archive's bytes
    files: int
    total: int  # the files' bytes
    workdir: str

    def summary(self) -> dict[str, Any]:
        """What a job's record keeps (the file list is in the manifest beside the archive)."""
        return {"sha256": self.sha256, "files": self.files, "size": self.total, "archive_size": self.size,
                "workdir": self.workdir, "manifest": str(self.path.with_suffix("").with_suffix(".json"))}


def snapshot_dir(workspace: Path) -> Path:
    return Path(workspace) / ".trainorch" / "snapshots"


def snapshot_path(workspace: Path, sha256: str) -> Path:
    return snapshot_dir(workspace) / f"{sha256}.tar.gz"


def _private_mkdir(path: Path) -> None:
    missing = []
    d = path
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)


class _HashingWriter(io.RawIOBase):
    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.h = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.raw.write(data)
        self.h.update(data)
        self.n += len(data)
        return len(data)


def pack(found: Scan, workspace: Path, *, limit: int | None = None) -> Snapshot:
    """Pack the scanned files into ``.trainorch/snapshots/<sha256>.tar.gz`` (kept if it is there already) with
    its manifest. Each file is copied as read now; a file that grew past the cap meanwhile fails the pack."""
    root = found.root
    dest_dir = snapshot_dir(workspace)
    _private_mkdir(dest_dir)
    fd, tmp_name = tempfile.mkstemp(prefix=".pack-", suffix=".part", dir=dest_dir)
    manifest_files: list[dict[str, Any]] = []
    total = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _HashingWriter(raw)
            with gzip.GzipFile(filename="", mode="wb", fileobj=writer, mtime=0, compresslevel=6) as gz, \
                    tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for entry in found.entries:
                    info = tarfile.TarInfo(entry.path)
                    info.mtime = _FIXED_MTIME
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    if entry.kind == "dir":
                        info.type = tarfile.DIRTYPE
                        info.mode = 0o755
                        tar.addfile(info)
                    elif entry.kind == "link":
                        info.type = tarfile.SYMTYPE
                        info.mode = 0o777
                        info.linkname = entry.target
                        tar.addfile(info)
                        manifest_files.append({"path": entry.path, "link": entry.target})
                    else:
                        with _read_copy(root / entry.path, entry.path) as (copy, size, digest):
                            total += size
                            if limit is not None and total > limit:
                                raise SpecError("workdir", f"the workdir {_shown_dir(root)} grew past the cap of "
                                                f"{human_size(limit)} while it was packed")
                            info.size = size
                            info.mode = 0o755 if entry.executable else 0o644
                            tar.addfile(info, copy)
                        manifest_files.append({"path": entry.path, "size": size, "sha256": digest})
        sha = writer.h.hexdigest()
        archive_size = writer.n
        final = dest_dir / f"{sha}.tar.gz"
        if final.exists():
            os.unlink(tmp_name)
        else:
            os.chmod(tmp_name, 0o600)
            os.replace(tmp_name, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    manifest = {
        "sha256": sha, "workdir": str(root), "archive_size": archive_size, "size": total,
        "files": manifest_files,
        "left_out": [{"path": lo.path, "reason": lo.reason, **({"size": lo.size} if lo.size is not None else {})}
                     for lo in found.left_out],
        "left_out_count": found.left_out_count,
    }
    manifest_path = dest_dir / f"{sha}.json"
    if not manifest_path.exists():
        fd2, tmp2 = tempfile.mkstemp(prefix=".manifest-", suffix=".part", dir=dest_dir)
        with os.fdopen(fd2, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
        os.replace(tmp2, manifest_path)
    return Snapshot(sha256=sha, path=final, size=archive_size,
                    files=sum(1 for f in manifest_files if "size" in f), total=total, workdir=str(root))


@contextlib.contextmanager
def _read_copy(path: Path, rel: str) -> Iterator[tuple[Any, int, str]]:
    """A private copy of the file as it is now (its size and SHA-256): the archive's header says the size of
    what was read, whatever the file does meanwhile."""
    h = hashlib.sha256()
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as copy:
        try:
            with open(path, "rb") as src:
                while block := src.read(_COPY_CHUNK):
                    copy.write(block)
                    h.update(block)
        except OSError as exc:
            raise SpecError("workdir", f"cannot read {rel}: {exc.strerror or exc} (leave it out in a "
                            ".trainorchignore)") from None
        size = copy.tell()
        copy.seek(0)
        yield copy, size, h.hexdigest()


def load_manifest(workspace: Path | None, sha256: str, manifest_path: str | None = None) -> dict[str, Any] | None:
    """A snapshot's manifest (its files and what was left out), or None when it is gone."""
    candidates = []
    if manifest_path:
        candidates.append(Path(manifest_path))
    if workspace is not None:
        candidates.append(snapshot_dir(workspace) / f"{sha256}.json")
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("sha256") == sha256:
            return data
    return None


def verify(path: Path, sha256: str) -> bool:
    """Whether the archive at ``path`` still hashes to ``sha256``."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(_COPY_CHUNK):
                h.update(block)
    except OSError:
        return False
    return h.hexdigest() == sha256
