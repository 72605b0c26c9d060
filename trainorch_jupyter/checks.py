"""Checks before billing, and the workdir snapshot made at submit.

:func:`prepare` runs in the notebook's process when a job is submitted, before anything is stored, created or
billed: the trainer's data file is read with the trainer's own checker (format, fields, malformed lines with
their line numbers, an empty file, every example longer than the sequence length, too few examples for the eval
split), the model name is checked for shape (a local folder that exists, or a hub id), ``--pip`` entries that
name local files are resolved, the workdir is scanned against its size cap and only then packed
(:mod:`trainorch_jupyter.snapshot`). Every failure is one :class:`~trainorch_jupyter.model.SpecError` line naming
the user's own file (and line). ``%train submit`` calls it; from Python, call it before ``Orchestrator.submit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import snapshot as snap
from .model import JobSpec, SpecError, TrainerConfig

__all__ = ["Prepared", "check_model", "check_trainer_data", "describe", "prepare", "resolve_snapshot"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
TINY = "tiny"


@dataclass
class Prepared:
    """A spec ready to submit (paths resolved, the snapshot's hash set) and what was found on the way."""

    spec: JobSpec
    scan: snap.Scan | None = None
    snapshot: snap.Snapshot | None = None
    requirements: bool = False  # a requirements.txt at the workdir's root
    notes: list[str] = field(default_factory=list)


def _resolve(value: str, workspace: Path) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else workspace / p).resolve()


def _inside(path: Path, root: Path | None) -> bool:
    return root is not None and (path == root or root in path.parents)


def _relative_ref(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return "." if rel == "." else "./" + rel


# --------------------------------------------------------------------------------------------
# The trainer's data and model
# --------------------------------------------------------------------------------------------


def check_trainer_data(train: TrainerConfig, workspace: Path, *, count_tokens: Callable[[str], int] | None = None,
                       field_name: str = "train.data") -> int:
    """Read and check the data file as the trainer will; returns its number of examples. SpecError naming the
    user's file (as they wrote it) and the line."""
    from .trainer.data import DataError, check_for_training, load_records

    shown = train.data
    path = _resolve(train.data, workspace)
    try:
        if not path.is_file():
            raise DataError(shown, 0, "file not found")
        records, fmt = load_records(path)
        check_for_training(shown, records, fmt, seq_len=train.seq_len, eval_fraction=train.eval_fraction,
                           count_tokens=count_tokens)
    except DataError as exc:
        where = f"line {exc.line}: " if exc.line > 0 else ""
        raise SpecError(field_name, f"{shown}: {where}{exc.message}") from None
    except OSError as exc:
        raise SpecError(field_name, f"{shown}: cannot read it ({exc.strerror or exc})") from None
    return len(records)


def check_model(model: str, workspace: Path) -> tuple[str, Path | None]:
    """``("tiny", None)``, ``("hub", None)`` or ``("local", folder)``; SpecError for a name of neither shape."""
    if model == TINY:
        return "tiny", None
    path = _resolve(model, workspace)
    looks_like_path = model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model
    if path.exists():
        if not path.is_dir():
            raise SpecError("train.model", f"{model} is a file; a local model is a folder holding config.json "
                            "(and the weights), or give a hub id such as Qwen/Qwen2.5-0.5B")
        if not (path / "config.json").is_file():
            raise SpecError("train.model", f"the folder {model} has no config.json, so it is not a model "
                            "from_pretrained can load (save one with model.save_pretrained(folder))")
        return "local", path
    if looks_like_path:
        raise SpecError("train.model", f"no such folder: {model} (a local model is a folder holding config.json; a "
                        "hub id looks like ORG/NAME)")
    if not _HUB_ID.fullmatch(model) or "--" in model or ".." in model or model.endswith((".git", "/")):
        raise SpecError("train.model", f"{model!r} is neither a hub id (ORG/NAME, letters, digits, '-', '_', '.') "
                        "nor a local folder, nor 'tiny'")
    return "hub", None


def token_counter(model: str, workspace: Path) -> Callable[[str], int] | None:
    """The model's tokenizer as a token counter, when its ``tokenizer.json`` is on this machine already (a local
    folder, the Hugging Face cache, the built tiny model) and the ``tokenizers`` library is installed; else None.
    Nothing is downloaded or built."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    candidates: list[Path] = []
    if model == TINY:
        with contextlib.suppress(Exception):
            from .trainer.tiny import _cache_key, corpus_texts, default_cache_root

            candidates.append(default_cache_root() / f"tiny-{_cache_key(corpus_texts(None, 0), 0)}" / "tokenizer.json")
    else:
        path = _resolve(model, workspace)
        if path.is_dir():
            candidates.append(path / "tokenizer.json")
        elif "/" in model:
            hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or
                                                                Path.home() / ".cache" / "huggingface") / "hub")
            repo = hub / ("models--" + model.replace("/", "--"))
            ref = repo / "refs" / "main"
            with contextlib.suppress(OSError):
                candidates.append(repo / "snapshots" / ref.read_text().strip() / "tokenizer.json")
    for candidate in candidates:
        if candidate.is_file():
            try:
                tok = Tokenizer.from_file(str(candidate))
            except Exception:
                continue

            def count(text: str, _tok: Tokenizer = tok) -> int:
                return len(_tok.encode(text).ids)

            return count
    return None


# --------------------------------------------------------------------------------------------
# The whole spec
# --------------------------------------------------------------------------------------------


def resolve_snapshot(spec: JobSpec, workspace: Path) -> snap.Snapshot:
    """The stored snapshot a spec names (``%train rerun``), checked against its hash; SpecError when it is gone."""
    assert spec.snapshot is not None
    path = snap.snapshot_path(workspace, spec.snapshot)
    if not path.is_file() or not snap.verify(path, spec.snapshot):
        raise SpecError("snapshot", f"the workdir snapshot {spec.snapshot[:12]} is no longer in .trainorch/snapshots "
                        "(or its bytes changed), so it cannot be sent again; submit the job anew")
    manifest = snap.load_manifest(workspace, spec.snapshot) or {}
    files = [f for f in manifest.get("files", []) if "size" in f]
    return snap.Snapshot(sha256=spec.snapshot, path=path, size=path.stat().st_size, files=len(files),
                         total=sum(int(f["size"]) for f in files), workdir=str(spec.workdir))


def prepare(spec: JobSpec, *, workspace: Path | str, remote: bool, pack: bool = True) -> Prepared:
    """Check ``spec`` before anything is billed and make its workdir snapshot (unless ``pack`` is false: the dry
    run). Raises SpecError (one line) for the first problem; writes nothing but the snapshot (after every check
    passed), which a rerun reuses."""
    workspace = Path(workspace).resolve()
    notes: list[str] = []
    root: Path | None = None
    if spec.workdir is not None:
        root = _resolve(spec.workdir, workspace)
        if not root.is_dir() and spec.snapshot is None:  # a rerun needs only its snapshot
            raise SpecError("workdir", f"not a folder: {spec.workdir}")
    changes: dict[str, object] = {}
    if root is not None:
        changes["workdir"] = str(root)

    # A rerun's spec was prepared before: its "./" paths are inside its snapshot, checked against its file list.
    in_snapshot = _snapshot_files(spec, workspace) if spec.snapshot is not None else None

    if spec.train is not None:
        train = spec.train
        if in_snapshot is not None and train.model.startswith("./"):
            folder = train.model[2:].rstrip("/")
            if f"{folder}/config.json" not in in_snapshot:
                raise SpecError("train.model", f"the snapshot has no model folder {train.model} (no config.json)")
            kind, model_path = "snapshot", None
        else:
            kind, model_path = check_model(train.model, workspace)
        check_trainer_data(train, workspace, count_tokens=token_counter(train.model, workspace))
        if kind == "local" and model_path is not None:
            if _inside(model_path, root):
                train = dataclasses.replace(train, model=_relative_ref(model_path, root))  # type: ignore[arg-type]
            elif remote:
                raise SpecError("train.model", f"the model folder {train.model} is on this computer, not on the "
                                "machine: put it inside the workdir (it is sent with it, within the size cap) or "
                                "give a hub id")
            else:
                train = dataclasses.replace(train, model=str(model_path))
        if train is not spec.train:
            changes["train"] = train

    pip: list[str] = []
    for i, req in enumerate(spec.pip):
        if in_snapshot is not None and req.startswith("./"):
            if req[2:].rstrip("/") not in in_snapshot and not any(f.startswith(req[2:].rstrip("/") + "/")
                                                                  for f in in_snapshot):
                raise SpecError(f"pip[{i}]", f"the snapshot has no {req}")
            pip.append(req)
            continue
        pip.append(_pip_ref(req, i, workspace, root, remote))
    if tuple(pip) != tuple(spec.pip):
        changes["pip"] = tuple(pip)
    if pip and not remote and not spec.isolated:
        raise SpecError("pip", "on the local provider, packages go only into a per-job environment: add --isolated "
                        "(this kernel's environment is never changed)")

    found: snap.Scan | None = None
    made: snap.Snapshot | None = None
    requirements = False
    if root is not None and spec.snapshot is not None:
        made = resolve_snapshot(dataclasses.replace(spec, workdir=str(root)), workspace)
        manifest = snap.load_manifest(workspace, spec.snapshot) or {}
        requirements = any(f.get("path") == "requirements.txt" for f in manifest.get("files", []))
    elif root is not None:
        limit = snap.max_bytes(spec.workdir_max_mb)
        found = snap.scan(root, exclude=[workspace / "artifacts"], max_total=limit)
        found.check_size(limit)
        if remote and found.total_size * 2 > spec.resources.disk_gb * 1_000_000_000:
            raise SpecError("resources.disk_gb", f"the workdir ({snap.human_size(found.total_size)}) does not fit "
                            f"twice (archive and files) on a disk of {spec.resources.disk_gb} GB: ask for more")
        requirements = found.has_file("requirements.txt")
        if pack:
            made = snap.pack(found, workspace, limit=limit)
            changes["snapshot"] = made.sha256
    if requirements and not remote and not spec.isolated:
        notes.append("requirements.txt is not installed on the local provider without --isolated (the job uses "
                     "this kernel's environment)")
    out = dataclasses.replace(spec, **changes) if changes else spec  # type: ignore[arg-type]
    return Prepared(spec=out, scan=found, snapshot=made, requirements=requirements, notes=notes)


def _snapshot_files(spec: JobSpec, workspace: Path) -> set[str]:
    assert spec.snapshot is not None
    manifest = snap.load_manifest(workspace, spec.snapshot) or {}
    return {str(f.get("path")) for f in manifest.get("files", []) if isinstance(f, dict)}


def _pip_ref(req: str, index: int, workspace: Path, root: Path | None, remote: bool) -> str:
    """A ``--pip`` entry as the machine must see it: a local file or folder (a wheel, a project) becomes a path
    relative to the workdir (the command's working directory there) or, on ``local``, an absolute path."""
    value = req.strip()
    if "://" in value or " @ " in value:
        return value
    is_path = value.startswith(("/", "./", "../", "~")) or value.endswith((".whl", ".tar.gz", ".zip"))
    if not is_path:
        return value
    path = _resolve(value, workspace)
    if not path.exists():
        raise SpecError(f"pip[{index}]", f"no such file or folder: {value}")
    if _inside(path, root):
        assert root is not None
        return _relative_ref(path, root)
    if remote:
        raise SpecError(f"pip[{index}]", f"{value} is on this computer, outside the workdir that is sent: put it in "
                        "the workdir, or install a published package")
    return str(path)


# --------------------------------------------------------------------------------------------
# The dry run
# --------------------------------------------------------------------------------------------


def describe(prepared: Prepared, *, provider: str, remote: bool, workspace: Path) -> str:
    """What ``%train submit --dry-run`` prints: what would be sent and what would run, where."""
    spec = prepared.spec
    lines = ["dry run: nothing was created, stored or sent", f"provider   {provider}"]
    found = prepared.scan
    if spec.workdir is None:
        lines.append("workdir    none (--no-workdir): the command runs in an empty folder")
    elif found is not None:
        shown = _shown(Path(spec.workdir), workspace)
        lines.append(f"workdir    {shown}: {len(found.files)} files, {snap.human_size(found.total_size)} to send "
                     f"(cap {snap.human_size(snap.max_bytes(spec.workdir_max_mb))})")
        if found.files:
            lines.append(f"  largest  {found.describe_biggest()}")
        if found.left_out_count:
            shown_out = "; ".join(f"{lo.path} ({lo.reason})" for lo in found.left_out[:8])
            more = f"; and {found.left_out_count - 8} more" if found.left_out_count > 8 else ""
            lines.append(f"  left out {found.left_out_count}: {shown_out}{more}")
    elif prepared.snapshot is not None:
        lines.append(f"workdir    the snapshot {prepared.snapshot.sha256[:12]}: {prepared.snapshot.files} files, "
                     f"{snap.human_size(prepared.snapshot.total)}")
    for name, path in spec.all_inputs():
        size = path.stat().st_size if path.is_file() else 0
        lines.append(f"input      {_shown(path.resolve(), workspace)} ({snap.human_size(size)}) -> "
                     f"$TRAINORCH_INPUT_DIR/{name}")
    installs = []
    if spec.pip:
        installs.append("pip install " + " ".join(shlex.quote(p) for p in spec.pip))
    if prepared.requirements and (remote or spec.isolated):
        installs.append("pip install -r requirements.txt")
    if installs:
        where = "a per-job virtual environment" if spec.isolated else "the machine's Python"
        lines.append(f"packages   {'; '.join(installs)} (into {where})")
    for note in prepared.notes:
        lines.append(f"note       {note}")
    if spec.command is not None:
        lines.append("command    " + " ".join(shlex.quote(a) for a in spec.command))
    elif spec.train is not None:
        lines.append(f"command    the LoRA trainer: --model {spec.train.model} --data {spec.train.data} "
                     f"(seq_len {spec.train.seq_len})")
    if spec.workdir is not None:
        lines.append("runs in    the workdir as it is now, unpacked on the machine (later edits here do not reach it)")
    return "\n".join(lines)


def _shown(path: Path, workspace: Path) -> str:
    with contextlib.suppress(ValueError):
        rel = path.relative_to(workspace).as_posix()
        return "." if rel == "." else rel
    return str(path)
