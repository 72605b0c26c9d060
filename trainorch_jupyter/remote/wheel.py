"""A wheel of the running ``trainorch_jupyter``, to install on a remote machine without a package index.

The remote job must run the same code as the kernel: not "version 0.1.0 from PyPI", but the very files this
kernel imported (an editable checkout with local changes included). :func:`package_wheel` zips the imported
package directory into a pure-Python wheel whose version carries the content hash as a local label
(``0.1.0+<12 hex>``), built once per content into a cache folder, and uploaded to the runner as an input
(hash-checked like any input). ``pip install --no-deps --no-index <wheel>`` installs it; so does unpacking it
onto ``PYTHONPATH`` (a wheel is a zip of the installed layout).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import importlib
import importlib.metadata
import io
import os
import re
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "trainorch_jupyter"
DISTRIBUTION = "trainorch-jupyter"
_EXCLUDED_DIRS = {"__pycache__"}
_EXCLUDED_SUFFIXES = (".pyc", ".pyo")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # reproducible: the same files give the same wheel, byte for byte


def package_dir() -> Path:
    """The directory the running ``trainorch_jupyter`` was imported from."""
    module = importlib.import_module(PACKAGE)
    if module.__file__ is None:
        raise RuntimeError(f"{PACKAGE} was not imported from files")
    return Path(module.__file__).resolve().parent


def _package_files(root: Path) -> list[tuple[str, Path]]:
    """(archive path, file) for every regular file of the package, sorted; caches and symlinks left out."""
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("."))
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(_EXCLUDED_SUFFIXES) or name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            files.append((f"{PACKAGE}/{path.relative_to(root).as_posix()}", path))
    files.sort()
    return files


def _metadata(version: str) -> tuple[str, str | None]:
    """METADATA (from the installed distribution when there is one, with ``version``) and entry_points.txt."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    text = dist.read_text("METADATA") if dist is not None else None
    if not text:
        text = f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {version}\n"
    text = re.sub(r"(?m)^Version: .*$", f"Version: {version}", text, count=1)
    entry_points = dist.read_text("entry_points.txt") if dist is not None else None
    return text, entry_points


def _base_version() -> str:
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(importlib.import_module(PACKAGE), "__version__", "0")
    return version.split("+", 1)[0]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def package_wheel(cache_dir: Path) -> Path:
    """The path of a wheel of the running ``trainorch_jupyter`` in ``cache_dir`` (made when missing).

    Its version is the installed one with the content hash as local label, so its file name changes exactly
    when the package's files (or its metadata) do; an existing file of that name is reused. The wheel is
    pure Python (``py3-none-any``) with ``METADATA`` (the installed distribution's, dependencies included),
    ``WHEEL``, ``entry_points.txt`` when installed with some, and a ``RECORD`` of SHA-256 hashes.
    """
    cache_dir = Path(cache_dir)
    files = [(arc, path.read_bytes()) for arc, path in _package_files(package_dir())]
    base_version = _base_version()
    metadata, entry_points = _metadata(base_version)
    content = hashlib.sha256()
    for arc, data in files:
        content.update(f"{arc}\0{len(data)}\0".encode())
        content.update(data)
    content.update(metadata.encode())
    content.update((entry_points or "").encode())
    version = f"{base_version}+{content.hexdigest()[:12]}"
    metadata = re.sub(r"(?m)^Version: .*$", f"Version: {version}", metadata, count=1)

    name = PACKAGE  # the distribution name, normalized for file names (PEP 427: "-" becomes "_")
    wheel_path = cache_dir / f"{name}-{version}-py3-none-any.whl"
    if wheel_path.is_file():
        return wheel_path
    dist_info = f"{name}-{version}.dist-info"
    wheel_meta = "Wheel-Version: 1.0\nGenerator: trainorch_jupyter.remote.wheel\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entries = [*files, (f"{dist_info}/METADATA", metadata.encode()), (f"{dist_info}/WHEEL", wheel_meta.encode())]
    if entry_points:
        entries.append((f"{dist_info}/entry_points.txt", entry_points.encode()))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for arc, data in entries:
        writer.writerow([arc, _record_hash(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    entries.append((f"{dist_info}/RECORD", record.getvalue().encode()))

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".wheel-", suffix=".part", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            for arc, data in entries:
                info = zipfile.ZipInfo(arc, date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
        os.replace(tmp, wheel_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return wheel_path
