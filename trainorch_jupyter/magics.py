"""The ``%train`` magics: the notebook's face over the orchestrator.

``%train SUBCOMMAND ...`` with subcommands submit, status, logs, cancel, list, download, panel,
dashboard, keys, cleanup; ``%%train submit`` takes a YAML or TOML spec in the cell body. Bad input raises
IPython's ``UsageError`` (printed as one line, no traceback) before anything is written or billed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import shlex
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .model import (
    Job,
    JobSpec,
    JobState,
    Resources,
    SpecError,
    TrainerConfig,
    TrainorchError,
    parse_duration,
)
from .orchestrator import JobHandle, Orchestrator, get_orchestrator
from .store import tail_lines

SUBCOMMANDS = ("submit", "rerun", "status", "logs", "cancel", "list", "download", "panel", "dashboard", "keys",
               "cleanup", "offers")
DOWNLOAD_TIMEOUT_S = 600.0  # %train download gives up (and stops the download) after this long by default
_WAIT_SLICE_S = 0.25  # a wait in the kernel's main thread is cut in slices like this (Ctrl-C is seen at once)


def _trainer_arguments(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The built-in LoRA trainer's options, shared by ``%train submit`` and ``%%train submit``."""
    opts: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--model",), {"help": "base model: a from_pretrained name or path, or 'tiny' (built offline)"}),
        (("--data",), {"help": "training data: JSONL or CSV (prompt/response, text, or messages)"}),
        (("--steps",), {"type": int, "help": "optimizer steps (or --epochs)"}),
        (("--epochs",), {"type": float, "help": "epochs over the data (or --steps)"}),
        (("--lr",), {"type": float, "help": "learning rate (default 2e-4)"}),
        (("--lr-schedule",), {"choices": TrainerConfig.SCHEDULES, "help": "learning-rate schedule"}),
        (("--warmup-steps",), {"type": int, "help": "linear warm-up steps"}),
        (("--batch-size",), {"type": int, "help": "examples per step"}),
        (("--grad-accum",), {"type": int, "help": "gradient accumulation steps"}),
        (("--seq-len",), {"type": int, "help": "max tokens per example (longer ones are truncated)"}),
        (("--lora-r",), {"type": int, "help": "LoRA rank"}),
        (("--lora-alpha",), {"type": int, "help": "LoRA alpha"}),
        (("--lora-dropout",), {"type": float, "help": "LoRA dropout"}),
        (("--target-modules",), {"help": "comma-separated module names (default: per architecture)"}),
        (("--eval-fraction",), {"type": float, "help": "share of the data held out for eval loss"}),
        (("--seed",), {"type": int, "help": "random seed"}),
        (("--log-every",), {"type": int, "help": "steps between metrics lines"}),
        (("--gradient-checkpointing",), {"action": "store_true", "default": None, "help": "trade compute for memory"}),
        (("--device",), {"choices": TrainerConfig.DEVICES, "help": "auto (CUDA, MPS, CPU), cpu, cuda, mps"}),
    ]
    for flags, kw in reversed(opts):
        fn = argument(*flags, **kw)(fn)
    return fn


def _common_submit_arguments(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--provider", "-p"), {"default": None, "help": "where to run: local (default), an installed provider "
                                "(runpod, lambda, vast), or auto: the cheapest cloud offer that fits, falling over "
                                "to the next on a capacity error"}),
        (("--name", "-n"), {"default": None, "help": "job name: lowercase letters, digits, '-' (the id adds date and a suffix)"}),
        (("--wait", "-w"), {"action": "store_true", "help": "block this cell until the job ends (Ctrl-C stops waiting, not the job)"}),
        (("--max-runtime",), {"default": None, "help": "stop the job after this long: 3600, 45m, 2h (default 6h)"}),
        (("--env", "-e"), {"action": "append", "default": [], "metavar": "K=V", "help": "environment variable for the job (repeatable)"}),
        (("--input", "-i"), {"action": "append", "default": [], "metavar": "PATH", "help": "file uploaded to $TRAINORCH_INPUT_DIR (repeatable)"}),
        (("--gpu",), {"default": None, "metavar": "NAME",
                      "help": "GPU type for cloud providers, e.g. 'RTX 4090' or 'A100 80GB' (default: the cheapest in stock)"}),
        (("--gpus", "--gpu-count"), {"type": int, "default": None, "dest": "gpu_count", "metavar": "N",
                                     "help": "number of GPUs (default 1)"}),
        (("--max-price",), {"type": float, "default": None, "metavar": "USD/h",
                            "help": "max USD per hour for the whole machine: nothing dearer is rented"}),
        (("--cloud",), {"type": str.lower, "choices": ("secure", "community"), "default": None,
                        "help": "RunPod's cloud: secure (default) or community (cheaper, hosts of others)"}),
        (("--image",), {"default": None, "help": "container image for cloud providers (default: a PyTorch CUDA image)"}),
        (("--no-download",), {"action": "store_true", "help": "do not download the artifacts automatically"}),
        (("--workdir",), {"default": None, "metavar": "DIR",
                          "help": "the folder sent with the job and its working directory on the machine (default for "
                                  "a command: the notebook's folder; .gitignore and .trainorchignore are respected)"}),
        (("--no-workdir",), {"action": "store_true", "help": "send no folder: the command runs in an empty one"}),
        (("--pip",), {"action": "append", "default": [], "metavar": "PKG",
                      "help": "a package to pip-install on the machine before the command (repeatable; a "
                              "requirements.txt in the workdir is installed too); on local only with --isolated"}),
        (("--isolated",), {"action": "store_true",
                           "help": "a virtual environment of the job's own for its packages (on local: never the "
                                   "kernel's environment)"}),
        (("--dry-run",), {"action": "store_true",
                          "help": "check the job and print what would be sent and run; create nothing"}),
    ]
    for flags, kw in reversed(opts):
        fn = argument(*flags, **kw)(fn)
    return fn


# Parsers only: each function holds one subcommand's argparse parser (``fn.parser``).
@magic_arguments()
@_common_submit_arguments
@_trainer_arguments
def _submit_parser(line: str) -> None:
    """%train submit [options] [-- COMMAND ...]

    Start a job and return its handle at once. Without a command after ``--`` it runs the built-in
    LoRA trainer (--model and --data are then required). A command runs in the workdir (the notebook's
    folder, as it is now, sent with the job); it finds its --input files in $TRAINORCH_INPUT_DIR and writes
    what should come back into $TRAINORCH_OUTPUT_DIR. The data, the model name and the workdir's size are
    checked before anything is created or billed.
    """


@magic_arguments()
@argument("job", nargs="?", default=None, help="job id or unique prefix (default: the most recent job)")
@argument("--provider", "-p", default=None, help="run it on another provider (default: the same)")
@argument("--name", "-n", default=None, help="a new job name (default: the same)")
@argument("--wait", "-w", action="store_true", help="block this cell until the job ends")
@argument("--dry-run", action="store_true", help="check and print what would be sent; create nothing")
def _rerun_parser(line: str) -> None:
    """%train rerun [JOB] [--provider P] -- submit a job again from its record: the same workdir snapshot (not
    the folder as it is now), command or trainer options, packages and inputs (refused if an input changed)."""


@magic_arguments()
@argument("job", nargs="?", default=None, help="job id or unique prefix (default: the most recent job)")
def _status_parser(line: str) -> None:
    """%train status [JOB] -- the job's state, exit code, error and artifacts."""


@magic_arguments()
@argument("job", nargs="?", default=None, help="job id or unique prefix (default: the most recent job)")
@argument("--tail", "-t", type=int, default=None, help="only the last N lines")
@argument("--follow", "-f", action="store_true", help="keep printing new lines until the job ends (Ctrl-C stops following)")
def _logs_parser(line: str) -> None:
    """%train logs [JOB] [--tail N] [-f] -- print the job's log."""


@magic_arguments()
@argument("job", nargs="?", default=None, help="job id or unique prefix (default: the most recent job)")
def _cancel_parser(line: str) -> None:
    """%train cancel [JOB] -- stop the job (SIGTERM, then SIGKILL after a grace period) and its machine."""


@magic_arguments()
@argument("--state", "-s", default=None, help="only jobs in this state (e.g. RUNNING, COMPLETED)")
@argument("--provider", "-p", default=None, help="only jobs of this provider")
def _list_parser(line: str) -> None:
    """%train list [--state S] [--provider P] -- every job of the workspace, newest first (live in a notebook)."""


@magic_arguments()
@argument("job", nargs="?", default=None, help="job id or unique prefix (default: the most recent job)")
@argument("--to", default=None, help="folder to put the verified files in (default: artifacts/<job_id>/)")
@argument("--overwrite", action="store_true",
          help="replace files already in --to that hold other bytes (without it the download stops before "
               "writing anything and lists them)")
@argument("--timeout", default=None, metavar="DURATION",
          help=f"give up after this long: 90, 10m, 2h (default {DOWNLOAD_TIMEOUT_S // 60:.0f}m); the download is "
               "then stopped, and the next %%train download resumes it (Ctrl-C stops it at once)")
def _download_parser(line: str) -> None:
    """%train download [JOB] [--to DIR] [--overwrite] [--timeout T] -- fetch the job's files, each verified by SHA-256.

    Never replaces a file it did not place: a file in DIR with other bytes stops it (before anything is
    written) unless --overwrite; identical files are kept. A running job's files come when it ends.
    """


@magic_arguments()
@argument("job", nargs="?", default=None, help="job id or unique prefix (default: the most recent job)")
@argument("--log-lines", type=int, default=200, help="log lines shown in the panel")
def _panel_parser(line: str) -> None:
    """%train panel [JOB] -- the job's live panel (rebuilt from the store after a restart)."""


@magic_arguments()
@argument("--state", "-s", default=None, help="only jobs in this state")
@argument("--provider", "-p", default=None, help="only jobs of this provider")
def _dashboard_parser(line: str) -> None:
    """%train dashboard -- a live table of the workspace's jobs."""


@magic_arguments()
def _keys_parser(line: str) -> None:
    """%train keys -- which providers have an API key (from the environment or the system keyring), redacted."""


@magic_arguments()
@argument("--yes", "-y", action="store_true", help="destroy them (without it, only list them)")
def _cleanup_parser(line: str) -> None:
    """%train cleanup [--yes] -- list the cloud machines made by trainorch that no live job owns, with their $/h;
    destroy them with --yes."""


@magic_arguments()
@argument("--gpu", "-g", default=None, help="a GPU in any spelling: A100-80GB, 'A100 80GB', H100, RTX4090, 'RTX 4090'...")
@argument("--gpus", type=int, default=1, help="GPUs per machine (default 1)")
@argument("--min-vram", type=float, default=None, help="at least this many GB of memory per GPU")
@argument("--max-price", type=float, default=None, help="at most this many USD per hour for the machine")
@argument("--provider", "-p", action="append", default=None, help="ask only this provider (repeatable)")
def _offers_parser(line: str) -> None:
    """%train offers [--gpu NAME] [--gpus N] [--min-vram GB] [--max-price USD/h] [--provider P ...] -- what every
    cloud provider with a key rents now that fits, cheapest first (GPU names in one vocabulary)."""


_PARSERS: dict[str, Callable[..., Any]] = {
    "submit": _submit_parser,
    "rerun": _rerun_parser,
    "status": _status_parser,
    "logs": _logs_parser,
    "cancel": _cancel_parser,
    "list": _list_parser,
    "download": _download_parser,
    "panel": _panel_parser,
    "dashboard": _dashboard_parser,
    "keys": _keys_parser,
    "cleanup": _cleanup_parser,
    "offers": _offers_parser,
}
for _name, _fn in _PARSERS.items():
    # IPython's help formatter puts the "%" before the program name itself.
    _fn.parser.prog = f"train {_name}"  # type: ignore[attr-defined]
    _fn.parser.add_argument("-h", "--help", action="help", help="show this help")  # type: ignore[attr-defined]


def _overview() -> str:
    parts = [
        "Train LoRA adapters and run jobs from the notebook.\n",
        "Usage: %train SUBCOMMAND [options]    (%train SUBCOMMAND -h for one subcommand)\n",
    ]
    for fn in _PARSERS.values():
        parts.append(fn.parser.format_help())  # type: ignore[attr-defined]
    parts.append("%%train submit [options]\n  The cell body is the job spec as YAML or TOML (keys: name, provider, "
                 "command, train, inputs, resources, env, max_runtime, auto_download, workdir, pip, isolated, "
                 "workdir_max_mb).\n")
    return "\n".join(parts)


def _words(sub: str, argstring: str) -> list[str]:
    """Shell-style words (quotes removed), unlike IPython's default non-POSIX split."""
    try:
        return shlex.split(argstring)
    except ValueError as exc:  # unbalanced quotes
        raise UsageError(f"%train {sub}: {exc}") from None


def _parse(sub: str, args: str | list[str]) -> Any:
    fn = _PARSERS[sub]
    words = _words(sub, args) if isinstance(args, str) else args
    try:
        return fn.parser.parse_args(words)  # type: ignore[attr-defined]
    except SystemExit:  # -h / --help printed the help
        return None


def _safe_name(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    while "--" in out:
        out = out.replace("--", "-")
    return (out or "job")[:24].strip("-") or "job"


def spec_from_args(args: Any, command: list[str] | None, base: dict[str, Any] | None = None, *,
                   workspace: Path | str | None = None) -> JobSpec:
    """A JobSpec from parsed ``%train submit`` options (over an optional cell-body spec).

    A command sends ``workspace`` (the notebook's folder) as its workdir unless ``--workdir``/``--no-workdir``
    (or the cell's ``workdir``) say otherwise; the trainer sends one only when asked."""
    data: dict[str, Any] = dict(base or {})
    train: dict[str, Any] = dict(data.get("train") or {})
    for key in ("model", "data", "steps", "epochs", "lr", "lr_schedule", "warmup_steps", "batch_size", "grad_accum",
                "seq_len", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "eval_fraction", "seed",
                "log_every", "gradient_checkpointing", "device"):
        value = getattr(args, key, None)
        if value is not None:
            train[key] = value
    if command:
        data["command"] = command
    if train:
        if data.get("command"):
            raise SpecError("command", "give either a command after -- or trainer options (--model/--data), not both")
        data["train"] = train
    if args.provider:
        data["provider"] = args.provider
    if args.name:
        data["name"] = args.name
    if "name" not in data:
        if data.get("train"):
            model = str(data["train"].get("model", "model"))
            data["name"] = _safe_name("lora-" + Path(model.rstrip("/")).name)
        elif data.get("command"):
            cmd = data["command"]
            first = shlex.split(cmd)[0] if isinstance(cmd, str) else str(cmd[0])
            data["name"] = _safe_name(Path(first).name)
        else:
            data["name"] = "job"
    env = dict(data.get("env") or {})
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError("env", f"expected K=V, got {item!r}")
        env[key] = value
    if env:
        data["env"] = env
    if args.input:
        data["inputs"] = [*list(data.get("inputs") or []), *args.input]
    if args.max_runtime is not None:
        data["max_runtime"] = parse_duration(args.max_runtime, "max_runtime")
    resources = dict(data.get("resources") or {})
    if args.gpu is not None:
        resources["gpu"] = args.gpu
    if args.gpu_count is not None:
        resources["gpu_count"] = args.gpu_count
    if args.max_price is not None:
        resources["max_price_per_hour"] = args.max_price
    if getattr(args, "image", None) is not None:
        resources["image"] = args.image
    if getattr(args, "cloud", None) is not None:
        if "cloud" not in {f.name for f in fields(Resources)}:
            raise SpecError("--cloud", "this version's job spec has no resources.cloud; set the provider's "
                            "config instead (Orchestrator(provider_config={'runpod': {'cloud': 'COMMUNITY'}}))")
        resources["cloud"] = args.cloud.upper()
    if resources:
        data["resources"] = Resources.from_dict(resources).to_dict()
    if args.no_download:
        data["auto_download"] = False
    if not data.get("command") and not data.get("train"):
        raise SpecError("command", "nothing to run: give --model and --data for the LoRA trainer, or a command after --")
    no_workdir = bool(getattr(args, "no_workdir", False))
    workdir = getattr(args, "workdir", None)
    if no_workdir and workdir is not None:
        raise SpecError("--workdir", "give --workdir DIR or --no-workdir, not both")
    if no_workdir:
        data["workdir"] = None
    elif workdir is not None:
        data["workdir"] = workdir
    elif "workdir" not in data and data.get("command") and workspace is not None:
        data["workdir"] = str(workspace)
    pip = list(getattr(args, "pip", None) or [])
    if pip:
        data["pip"] = [*list(data.get("pip") or []), *pip]
    if getattr(args, "isolated", False):
        data["isolated"] = True
    return JobSpec.from_dict(data)


def parse_spec_text(text: str) -> dict[str, Any]:
    """A job spec mapping from YAML or TOML text."""
    yaml_error = toml_error = None
    try:
        data = yaml.safe_load(text)
        if isinstance(data, dict):
            return data
        if data is None:
            return {}
    except yaml.YAMLError as exc:
        yaml_error = exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        toml_error = exc
    raise SpecError("cell", f"the spec is neither a YAML mapping nor TOML (YAML: {yaml_error or 'not a mapping'}; TOML: {toml_error})")


def _format_job(job: Job, workspace: Path | None = None) -> str:
    from .diagnose import PathMap

    paths = PathMap.for_job(job, workspace)
    lines = [f"job       {job.id}", f"provider  {job.provider}", f"state     {job.state.value}"]
    if job.elapsed_s is not None:
        lines.append(f"elapsed   {job.elapsed_s:.1f}s")
    if job.exit_code is not None:
        lines.append(f"exit code {job.exit_code}")
    if job.error:
        lines.append("error     " + paths.map(job.error).replace("\n", "\n          "))
    if job.diagnosis:
        lines.append(f"diagnosis {paths.map(str(job.diagnosis.get('summary', '')))}")
        for s in job.diagnosis.get("suggestions", []):
            lines.append(f"          - {paths.map(str(s))}")
    lines += _format_record(job, workspace)
    for a in job.artifacts:
        lines.append(f"artifact  {a.name}  {a.size_bytes} B  sha256 {a.hash_sha256}  -> {a.path}")
    return "\n".join(lines)


def _format_record(job: Job, workspace: Path | None) -> list[str]:
    """The reproducible record's lines of ``%train status``: what was sent and installed, what ran."""
    from .snapshot import human_size

    spec, lines = job.spec, []
    snap = job.snapshot or ({"sha256": spec.snapshot} if spec.snapshot else None)
    if spec.workdir is not None and snap:
        shown = spec.workdir
        if workspace is not None:
            with contextlib.suppress(ValueError):
                shown = Path(spec.workdir).relative_to(workspace).as_posix()
        size = f", {human_size(int(snap['size']))}" if isinstance(snap.get("size"), int) else ""
        files = f"{snap['files']} files" if "files" in snap else "files"
        lines.append(f"workdir   {shown}: {files}{size}, snapshot sha256 {snap.get('sha256')}")
    if spec.command is not None:
        lines.append("command   " + " ".join(shlex.quote(a) for a in spec.command))
    if job.packages:
        requested = job.packages.get("requested") or []
        installed = job.packages.get("packages") or {}
        pinned = [f"{name}=={installed[name]}" for name in _requested_names(requested, installed)]
        lines.append(f"packages  python {job.packages.get('python', '?')}, {len(installed)} installed"
                     + (f"; asked for: {' '.join(requested)}" if requested else "")
                     + (f" -> {' '.join(pinned)}" if pinned else ""))
    elif spec.pip:
        lines.append("packages  asked for: " + " ".join(spec.pip))
    if job.gpu or job.price_per_hour:
        price = f", ${job.price_per_hour:.2f}/h" if job.price_per_hour else ""
        lines.append(f"machine   {job.gpu or 'no GPU'}{price}")
    return lines


def _requested_names(requested: list[str], installed: dict[str, Any]) -> list[str]:
    """The installed names of what was asked for (``scikit-learn>=1`` -> ``scikit-learn``; a wheel's file name
    -> its project), matched as pip does (case, '-', '_' and '.' alike)."""
    import re

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    by_norm = {norm(k): k for k in installed}
    out = []
    for req in requested:
        base = req.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(".whl"):
            base = base.split("-")[0]
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*?)(?:[<>=!~;\[ ]|$)", base)
        key = by_norm.get(norm(m.group(1))) if m else None
        if key and key not in out:
            out.append(key)
    return out


def _format_table(jobs: list[Job]) -> str:
    if not jobs:
        return "no jobs in this workspace yet"
    rows = [("JOB", "PROVIDER", "STATE", "CREATED", "EXIT")]
    for j in jobs:
        rows.append((j.id, j.provider, j.state.value, j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                     "" if j.exit_code is None else str(j.exit_code)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _format_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain text table of ``rows`` with ``columns`` as (key, heading)."""
    table = [[h for _, h in columns]]
    for r in rows:
        table.append(["" if r.get(k) is None else str(r.get(k)) for k, _ in columns])
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)


def _price(row: dict[str, Any]) -> str:
    value = row.get("$/h", row.get("price_per_hour"))
    return "?" if value is None else f"${float(value):.2f}"


def _widgets() -> Any | None:
    try:
        from . import widgets
    except ImportError:
        return None
    return widgets


@magics_class
class TrainMagics(Magics):
    def __init__(self, shell: Any = None) -> None:
        super().__init__(shell)

    @property
    def orch(self) -> Orchestrator:
        return get_orchestrator()

    # The docstring of the one line magic is what `%train?` shows: give it every subcommand's help.
    @line_magic
    def train(self, line: str) -> Any:
        try:
            return self._dispatch(line, None)
        except (SpecError, TrainorchError) as exc:
            raise UsageError(str(exc)) from None

    train.__doc__ = _overview()

    @cell_magic("train")  # type: ignore[arg-type]
    def train_cell(self, line: str, cell: str) -> Any:
        try:
            return self._dispatch(line, cell)
        except (SpecError, TrainorchError) as exc:
            raise UsageError(str(exc)) from None

    train_cell.__doc__ = _overview()  # type: ignore[assignment]

    def _dispatch(self, line: str, cell: str | None) -> Any:
        head, _, rest = line.strip().partition(" ")
        sub = head.strip()
        if not sub or sub in ("-h", "--help", "help"):
            print(_overview())
            return None
        if sub not in SUBCOMMANDS:
            raise UsageError(f"%train: unknown subcommand {sub!r}; choose one of: {', '.join(SUBCOMMANDS)}")
        if cell is not None and sub != "submit":
            raise UsageError("%%train: only 'submit' takes a cell body (the job spec as YAML or TOML)")
        return getattr(self, f"_do_{sub}")(rest, cell)

    # -- subcommands ----------------------------------------------------------------------

    def _do_submit(self, rest: str, cell: str | None) -> Any:
        command: list[str] | None = None
        # Shell words first, then the first word that is "--" itself splits options from the command: a quoted
        # " -- " inside an option's value (--env 'X=a -- b') is part of that value.
        opts = _words("submit", rest)
        if "--" in opts:
            cut = opts.index("--")
            opts, command = opts[:cut], opts[cut + 1:]
            if not command:
                raise UsageError("%train submit: nothing after --; give the command to run")
        args = _parse("submit", opts)
        if args is None:
            return None
        base = parse_spec_text(cell) if cell is not None else None
        orch = self.orch
        spec = spec_from_args(args, command, base, workspace=orch.workspace)
        return self._submit_checked(spec, wait=args.wait, dry_run=args.dry_run)

    def _submit_checked(self, spec: JobSpec, *, wait: bool, dry_run: bool) -> Any:
        """Check everything that can be checked here before anything is stored, created or billed (the spec, the
        provider's key, the data, the model name, the workdir's size), make the snapshot, then submit."""
        from .checks import describe, prepare

        orch = self.orch
        spec = orch.validate(spec)
        remote = spec.provider == "auto" or bool(getattr(orch.provider(spec.provider), "remote", False))
        prepared = prepare(spec, workspace=orch.workspace, remote=remote, pack=not dry_run)
        if dry_run:
            print(describe(prepared, provider=spec.provider, remote=remote, workspace=orch.workspace))
            return None
        for note in prepared.notes:
            print(f"note: {note}", file=sys.stderr)
        handle = orch.submit(prepared.spec)
        if wait:
            self._wait(handle)
        return handle

    def _do_rerun(self, rest: str, cell: str | None) -> Any:
        import dataclasses

        args = _parse("rerun", rest)
        if args is None:
            return None
        job = self.orch.job(args.job).record
        spec = job.spec
        if spec.workdir is not None and spec.snapshot is None and job.snapshot and job.snapshot.get("sha256"):
            spec = dataclasses.replace(spec, snapshot=str(job.snapshot["sha256"]))
        if args.provider and args.provider != spec.provider:
            resources = spec.resources
            if args.provider == "local":  # what only a cloud machine has does not follow the job here
                resources = Resources(gpu_count=resources.gpu_count, disk_gb=resources.disk_gb)
            spec = dataclasses.replace(spec, provider=args.provider, resources=resources)
        if args.name:
            spec = dataclasses.replace(spec, name=args.name)
        _check_inputs_unchanged(job)
        return self._submit_checked(spec, wait=args.wait, dry_run=args.dry_run)

    def _wait(self, handle: JobHandle) -> None:
        try:
            handle.wait()
        except KeyboardInterrupt:
            print(f"stopped waiting; job {handle.id} goes on (cancel it with %train cancel {handle.id})", file=sys.stderr)

    def _do_status(self, rest: str, cell: str | None) -> Any:
        args = _parse("status", rest)
        if args is None:
            return None
        handle = self.orch.job(args.job)
        print(_format_job(handle.record, self.orch.workspace))
        return None

    def _do_logs(self, rest: str, cell: str | None) -> None:
        args = _parse("logs", rest)
        if args is None:
            return
        if args.tail is not None and args.tail < 0:
            raise UsageError("%train logs: --tail must be 0 or more lines")
        handle = self.orch.job(args.job)
        if not args.follow:
            sys.stdout.write(self._paths(handle).map(handle.logs(tail=args.tail)))
            sys.stdout.flush()
            return
        self._follow(handle, args.tail)

    def _follow(self, handle: JobHandle, tail: int | None) -> None:
        """Print the log as it grows until the job ends; Ctrl-C stops following, not the job."""
        path = handle.log_path
        paths = self._paths(handle)
        # One read of the log as it is now, and follow from exactly where that read ended: lines the
        # job writes in between are printed once (neither lost nor doubled).
        pos = path.stat().st_size if path.exists() else 0
        sys.stdout.write(paths.map(_read_upto(path, pos, tail)))
        sys.stdout.flush()
        try:
            while True:
                done = handle.status.is_terminal
                if path.exists():
                    with open(path, "rb") as fh:
                        fh.seek(pos)
                        data = fh.read()
                    if data:
                        cut = data.rfind(b"\n") + 1 if not done else len(data)
                        if cut:
                            sys.stdout.write(paths.map(data[:cut].decode("utf-8", errors="replace")))
                            sys.stdout.flush()
                            pos += cut
                if done:
                    break
                time.sleep(0.25)
        except KeyboardInterrupt:
            print(f"\n(stopped following; job {handle.id} goes on)", file=sys.stderr)
            return
        print(f"-- job {handle.id} {handle.status.value}", file=sys.stderr)

    def _paths(self, handle: JobHandle) -> Any:
        """How the job's machine paths are shown: as the user's own files."""
        from .diagnose import PathMap

        try:
            record = handle.record
        except (AttributeError, TrainorchError):  # a handle without a record: the runner's layout is still stripped
            return PathMap()
        return PathMap.for_job(record, getattr(self.orch, "workspace", None))

    def _do_cancel(self, rest: str, cell: str | None) -> None:
        args = _parse("cancel", rest)
        if args is None:
            return
        handle = self.orch.job(args.job)
        if handle.status.is_terminal:
            print(f"job {handle.id} is already {handle.status.value}")
            return
        handle.cancel()
        print(f"cancelling job {handle.id}")

    def _do_list(self, rest: str, cell: str | None) -> Any:
        args = _parse("list", rest)
        if args is None:
            return None
        return self._show_jobs(args)

    def _do_dashboard(self, rest: str, cell: str | None) -> Any:
        args = _parse("dashboard", rest)
        if args is None:
            return None
        return self._show_jobs(args)

    def _show_jobs(self, args: Any) -> None:
        """A live dashboard in a notebook, a text table elsewhere."""
        state = _check_state(args.state)
        widgets = _widgets()
        if widgets is not None:
            widgets.display_dashboard(self.orch, state=state, provider=args.provider)
        else:
            print(_format_table(self.orch.jobs(state=state, provider=args.provider)))

    def _do_download(self, rest: str, cell: str | None) -> Any:
        args = _parse("download", rest)
        if args is None:
            return None
        timeout = DOWNLOAD_TIMEOUT_S if args.timeout is None else parse_duration(args.timeout, "--timeout")
        if timeout <= 0:
            raise UsageError("%train download: --timeout must be more than 0 seconds")
        handle = self.orch.job(args.job)
        download = handle.download(args.to, overwrite=args.overwrite)
        try:
            infos = _result_within(download, timeout)
        except KeyboardInterrupt:
            if download.cancel() or not download.done():
                if handle.status.is_live:
                    print(f"\n(stopped waiting for job {handle.id}, which goes on; %train download fetches its "
                          "files once it ends)", file=sys.stderr)
                else:
                    print(f"\n(download of job {handle.id} stopped; the files fetched so far are kept and the "
                          "next %train download resumes it)", file=sys.stderr)
                return None
            infos = download.result()  # it ended just as Ctrl-C came
        except TimeoutError:
            download.cancel()
            state = handle.status
            if state.is_live:
                raise UsageError(f"%train download: job {handle.id} is still {state.value} after {timeout:g}s; its "
                                 "files come when it ends (download stopped: run %train download again then, "
                                 "or give a longer --timeout)") from None
            raise UsageError(f"%train download: the download of job {handle.id} did not finish within {timeout:g}s "
                             "and was stopped; the files fetched so far are kept and the next %train download "
                             "resumes it (give a longer --timeout for a large adapter)") from None
        for a in infos:
            print(f"{a.name}  {a.size_bytes} B  sha256 {a.hash_sha256}  verified  -> {a.path}")
        return infos

    def _do_keys(self, rest: str, cell: str | None) -> None:
        if _parse("keys", rest) is None:
            return
        from .keys import key_status

        rows = [s.as_row() for s in key_status()]
        print(_format_rows(rows, [("provider", "PROVIDER"), ("variable", "VARIABLE"), ("source", "SOURCE"),
                                  ("key", "KEY")]))
        if any(r["source"] == "missing" for r in rows):
            print("\nSet a key in the kernel's environment (e.g. RUNPOD_API_KEY), or store it once in the system "
                  "keyring: keyring set trainorch-jupyter runpod")

    def _do_offers(self, rest: str, cell: str | None) -> Any:
        args = _parse("offers", rest)
        if args is None:
            return None
        if args.gpus < 1:
            raise UsageError("%train offers: --gpus must be at least 1")
        if args.min_vram is not None and args.min_vram <= 0:
            raise UsageError("%train offers: --min-vram must be a positive number of GB")
        resources = {"gpu": args.gpu, "gpu_count": args.gpus, "max_price_per_hour": args.max_price}
        try:
            return self.orch.offers(resources, providers=args.provider, min_vram_gb=args.min_vram)
        except SpecError as exc:
            raise UsageError(f"%train offers: {exc}") from None

    def _do_cleanup(self, rest: str, cell: str | None) -> None:
        args = _parse("cleanup", rest)
        if args is None:
            return
        cleanup = getattr(self.orch, "cleanup", None)
        if cleanup is None:
            raise UsageError("%train cleanup: this version's orchestrator cannot list cloud machines yet")
        rows = list(cleanup(yes=bool(args.yes)))
        for r in [r for r in rows if r.get("machine_id") is None]:
            print(f"{r['provider']}: not asked ({r.get('error')})")
        rows = [r for r in rows if r.get("machine_id") is not None]
        if not rows:
            print("no machine made by trainorch is running without a live job")
            return
        shown = [{**r, "_price": _price(r), "_destroyed": "yes" if r.get("destroyed") else "no"} for r in rows]
        print(_format_rows(shown, [("provider", "PROVIDER"), ("machine_id", "MACHINE"), ("name", "NAME"),
                                   ("job_id", "JOB"), ("_price", "$/H"), ("state", "STATE"),
                                   ("_destroyed", "DESTROYED")]))
        total = sum(float(r.get("$/h", r.get("price_per_hour")) or 0.0) for r in rows)
        if args.yes:
            left = [r for r in rows if not r.get("destroyed")]
            if left:
                print(f"\n{len(left)} machine(s) could not be destroyed yet and may still bill: run "
                      "%train cleanup --yes again")
            else:
                print(f"\n{len(rows)} machine(s) destroyed")
        else:
            print(f"\n{len(rows)} machine(s) billing ${total:.2f}/h in all; nothing was destroyed: run "
                  "%train cleanup --yes to destroy them")

    def _do_panel(self, rest: str, cell: str | None) -> Any:
        args = _parse("panel", rest)
        if args is None:
            return None
        if args.log_lines < 1:
            raise UsageError("%train panel: --log-lines must be at least 1")
        handle = self.orch.job(args.job)
        widgets = _widgets()
        if widgets is None:
            print(_format_job(handle.record, self.orch.workspace))
        elif widgets._has_widget_frontend():
            from IPython.display import display

            panel = widgets.JobPanel(self.orch, handle.id, log_lines=args.log_lines)
            widgets.track_cell_view(panel)
            display(panel)
        else:
            print(widgets.text_summary(handle))
        return None


def _check_inputs_unchanged(job: Job) -> None:
    """A rerun sends the inputs as they are now: refuse when one is not the file the job was sent."""
    import hashlib

    for name, path in job.spec.all_inputs():
        recorded = job.input_hashes.get(name)
        if recorded is None:
            continue
        h = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        except OSError:
            raise UsageError(f"%train rerun: {path} (an input of job {job.id}) is gone, so the job cannot be "
                             "reproduced; restore it or submit anew") from None
        if h.hexdigest() != recorded:
            raise UsageError(f"%train rerun: {path} changed since job {job.id} ran (sha256 {recorded[:12]} then, "
                             f"{h.hexdigest()[:12]} now), so it would not be the same job; restore the file or "
                             "submit anew") from None


def _result_within(fut: concurrent.futures.Future[Any], timeout: float) -> Any:
    """``fut.result()``, waiting at most ``timeout`` s (TimeoutError) in short slices, so that Ctrl-C in the
    kernel (KeyboardInterrupt) is seen at once whatever the platform's lock waits do."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        try:
            return fut.result(min(left, _WAIT_SLICE_S))
        except concurrent.futures.TimeoutError:
            continue


def _read_upto(path: Path, size: int, tail: int | None) -> str:
    """The first ``size`` bytes of the file, or only the last ``tail`` lines of them."""
    if size <= 0:
        return ""
    if tail is not None:
        return tail_lines(path, tail, end=size)
    with open(path, "rb") as fh:
        return fh.read(size).decode("utf-8", errors="replace")


def _check_state(state: str | None) -> JobState | None:
    if state is None:
        return None
    try:
        return JobState(state.upper())
    except ValueError:
        raise UsageError(f"--state: unknown state {state!r}; choose one of: {', '.join(s.value for s in JobState)}") from None


def _display_handle(handle: JobHandle) -> None:
    widgets = _widgets()
    if widgets is not None:
        widgets.display_job(handle)
    else:
        from IPython.display import HTML, display

        display(HTML(handle._repr_html_()))


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(TrainMagics)
    widgets = _widgets()
    if widgets is not None:  # a live panel in a notebook, a text summary in a terminal
        formatter = ipython.display_formatter.ipython_display_formatter
        formatter.for_type(JobHandle, _display_handle)
        # A cell that runs again closes the panels its earlier run showed (their output is gone).
        with contextlib.suppress(ValueError):
            ipython.events.unregister("pre_run_cell", widgets.close_cell_views)
        ipython.events.register("pre_run_cell", widgets.close_cell_views)
    # Re-attach to the workspace's unfinished jobs now (a restarted kernel loses no job).
    get_orchestrator()


def unload_ipython_extension(ipython: Any) -> None:
    formatter = ipython.display_formatter.ipython_display_formatter
    formatter.type_printers.pop(JobHandle, None)
    widgets = _widgets()
    if widgets is not None:
        with contextlib.suppress(ValueError):
            ipython.events.unregister("pre_run_cell", widgets.close_cell_views)
