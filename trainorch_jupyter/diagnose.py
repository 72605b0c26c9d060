"""From a failed job's facts (exit code, log tail, error text) to a cause and what to do about it.

The rules are data: :data:`RULES` is a table searched in order, the first that matches wins. A rule matches on a
regular expression over the log tail and/or the error text (the *last* matching line is the evidence, as the most
recent one is what killed the job) and/or a predicate over the facts (exit code, timed out). Summaries and
suggestions are format strings filled from the pattern's named groups.

Evidence is a log line that is already in the job's log; it is cut to a few hundred characters and anything that
looks like a credential (``Bearer ...``, ``api_key=...``) is masked anyway.

Paths the user knows: a path on the machine (the runner's ``.../work/...``, ``.../inputs/<name>``,
``.../output/...``) is shown as the user's own (``miss.py``, ``bad.jsonl``, ``$TRAINORCH_OUTPUT_DIR/...``) through
a :class:`PathMap` made from the job's record (:meth:`PathMap.for_job`); without one, a generic map still strips
the runner's layout. With the job's workdir snapshot at hand, a file not found says whether it was left out of
the snapshot (and by which ignore pattern), outside the workdir, or made after the submit.
"""

from __future__ import annotations

import json
import posixpath
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import Job

__all__ = ["RULES", "Facts", "PathMap", "Rule", "diagnose", "diagnose_job"]

_EVIDENCE_MAX = 300


# --------------------------------------------------------------------------------------------
# Paths the user knows
# --------------------------------------------------------------------------------------------

# A path in the runner's layout on any machine: ``<workspace>/.trainorch/machines/<job>/{work,inputs,output}``
# (local) or ``~/.trainorch/<job dir>/state/{work,inputs,output}`` (a remote machine's stage-0).
_MACHINE_PATH = re.compile(r"""(?:[^\s'"(=]*?/)?\.trainorch/(?:machines/[^/\s'"]+|[^/\s'"]+/state)/"""
                           r"""(?P<kind>work|inputs|output)(?P<rest>(?:/[^\s'",:;)]*)?)""")
BIG_FILE_BYTES = 50_000_000  # a file left out of the snapshot this big is better sent with --input


@dataclass
class PathMap:
    """How to show a job's machine paths as the user's own, and what its workdir snapshot held."""

    workdir: str | None = None  # the user's folder sent as the snapshot (absolute), None when none was
    shown_workdir: str = ""  # how the workdir is shown ("" when it is the notebook's folder)
    inputs: dict[str, str] = field(default_factory=dict)  # name on the machine -> the user's path as given
    manifest: dict[str, Any] | None = None  # the snapshot's manifest (files, left_out)
    provider: str | None = None
    remote: bool = False
    command: tuple[str, ...] = ()  # the user's command (or empty for the trainer)

    @classmethod
    def for_job(cls, job: Job, workspace: Path | str | None = None) -> PathMap:
        spec = job.spec
        inputs = {Path(p).expanduser().name: p for p in spec.inputs}
        if spec.train is not None:
            inputs[spec.train.data_input_name] = spec.train.data
        from .model import SNAPSHOT_INPUT_NAME

        inputs[SNAPSHOT_INPUT_NAME] = "the workdir snapshot"
        ws = Path(workspace).resolve() if workspace is not None else None
        shown = ""
        if spec.workdir is not None and ws is not None:
            wd = Path(spec.workdir)
            if wd != ws:
                try:
                    shown = wd.relative_to(ws).as_posix()
                except ValueError:
                    shown = str(wd)
        manifest = None
        snap_info = job.snapshot or {}
        sha = spec.snapshot or snap_info.get("sha256")
        if sha:
            candidates = [snap_info.get("manifest")]
            if ws is not None:
                candidates.append(str(ws / ".trainorch" / "snapshots" / f"{sha}.json"))
            for candidate in candidates:
                if not candidate:
                    continue
                try:
                    data = json.loads(Path(candidate).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(data, dict) and data.get("sha256") == sha:
                    manifest = data
                    break
        return cls(workdir=spec.workdir, shown_workdir=shown, inputs=inputs, manifest=manifest,
                   provider=job.provider, remote=job.provider != "local",
                   command=tuple(spec.command or ()))

    def user_path(self, rel: str) -> str:
        """A path relative to the workdir, as the user sees it from the notebook's folder."""
        rel = rel.strip("/") or "."
        if not self.shown_workdir:
            return rel
        return self.shown_workdir if rel == "." else f"{self.shown_workdir}/{rel}"

    def map(self, text: str) -> str:
        """``text`` with every machine path replaced by the user's."""
        if ".trainorch/" not in text:
            return text

        def repl(m: re.Match[str]) -> str:
            kind, rest = m.group("kind"), m.group("rest") or ""
            if kind == "work":
                return self.user_path(rest)
            if kind == "inputs":
                name, _, more = rest.lstrip("/").partition("/")
                if not name:
                    return "$TRAINORCH_INPUT_DIR"
                return self.inputs.get(name, f"$TRAINORCH_INPUT_DIR/{name}") + (f"/{more}" if more else "")
            return "$TRAINORCH_OUTPUT_DIR" + rest

        return _MACHINE_PATH.sub(repl, text)

    # -- what the snapshot held ---------------------------------------------------------------

    def why_missing(self, path: str) -> tuple[str, list[str]] | None:
        """Why ``path`` (a user path, as :meth:`map` shows it) was not on the machine, and what to do; None when
        nothing is known about the job's files."""
        if path.startswith("$TRAINORCH_INPUT_DIR"):
            return ("it is not among the job's inputs", [
                "Send the file with --input PATH (it lands in $TRAINORCH_INPUT_DIR), or keep it in the workdir "
                "and read it by its path relative to it."])
        if self.workdir is None:
            return ("no workdir was sent with this job (--no-workdir, or a trainer job without --workdir), so the "
                    "command ran in an empty folder", [
                        "Send your folder with --workdir DIR (the notebook's folder by default for a command), or "
                        "the file with --input PATH."])
        root = self.workdir.rstrip("/")
        absolute_here = False
        if path.startswith("/"):
            if path == root or path.startswith(root + "/"):
                rel = path[len(root):].strip("/")
                absolute_here = True
            else:
                return (f"it is outside the workdir {self._shown_root()}, and only the workdir is sent", [
                    f"Move it into the workdir ({self._shown_root()}) and use a path relative to it, or send it with "
                    "--input PATH (it lands in $TRAINORCH_INPUT_DIR), or choose a larger --workdir."])
        else:
            rel = posixpath.normpath(path[len(self.shown_workdir) + 1:] if self.shown_workdir and
                                     path.startswith(self.shown_workdir + "/") else path)
            if rel == ".." or rel.startswith("../"):
                return (f"it is outside the workdir {self._shown_root()}, and only the workdir is sent", [
                    "Move it into the workdir and use a path relative to it, or send it with --input PATH, or "
                    "choose a larger --workdir."])
        if self.manifest is None:
            return None
        files = {f.get("path") for f in self.manifest.get("files", []) if isinstance(f, dict)}
        if rel in files:
            if absolute_here:
                return ("the command names it by its path on this computer", [
                    f"Use the path relative to the workdir ({rel}): the workdir is the command's working "
                    "directory on the machine."])
            return ("it was in the snapshot, but the command looked for it from another folder", [
                f"The command runs in the workdir's root on the machine: open it as {rel}."])
        for lo in self.manifest.get("left_out", []):
            lo_path = str(lo.get("path", ""))
            if rel == lo_path.rstrip("/") or (lo_path.endswith("/") and rel.startswith(lo_path)):
                reason = str(lo.get("reason", "left out"))
                size = lo.get("size")
                what = f"it was left out of the workdir snapshot: {reason}"
                tips = []
                if isinstance(size, int) and size >= BIG_FILE_BYTES:
                    what += f"; it is {_human(size)}, too big to travel comfortably in the snapshot"
                    tips.append(f"Send it with --input {self.user_path(rel)} and read it from "
                                f"$TRAINORCH_INPUT_DIR/{posixpath.basename(rel)}.")
                if reason.startswith("ignored by"):
                    target = lo_path if lo_path.endswith("/") else rel
                    tips.append(f"To send it, add the line !{target} to .trainorchignore in the workdir (it wins "
                                "over .gitignore).")
                elif "symbolic link" in reason:
                    tips.append("Copy the file into the workdir instead of linking to it, or send it with --input.")
                else:
                    tips.append("Send it with --input PATH, or move it out of that folder.")
                return what, tips
        here = Path(root) / rel
        if here.exists():
            return ("it was made in your workdir after the submit; the job has the workdir as it was then", [
                "Submit again to send the workdir as it is now."])
        return (f"it is not in your workdir {self._shown_root()} (and was not at submit)", [
            "Check the file's name and folder; paths are relative to the workdir, the command's working "
            "directory on the machine."])

    def own_module(self, module: str) -> str | None:
        """The user's file that provides the top-level ``module`` (``helper.py``, ``pkg/``), if the workdir had one."""
        if self.workdir is None:
            return None
        top = module.split(".")[0]
        for candidate in (f"{top}.py", f"{top}/__init__.py", top):
            if (Path(self.workdir) / candidate).exists():
                return candidate
        if self.manifest is not None:
            for lo in self.manifest.get("left_out", []):
                if str(lo.get("path", "")).rstrip("/") in (f"{top}.py", top):
                    return str(lo["path"]).rstrip("/")
        return None

    def _shown_root(self) -> str:
        return self.shown_workdir or "(the notebook's folder)"


def _human(n: int) -> str:
    from .snapshot import human_size

    return human_size(n)



@dataclass(frozen=True)
class Facts:
    exit_code: int | None
    log_tail: str
    error: str | None
    timed_out: bool
    cancelled: bool
    paths: PathMap | None = None

    @property
    def signal(self) -> int | None:
        """The signal that killed the command: ``-N`` (Popen) or ``128+N`` (a shell's way to say it)."""
        code = self.exit_code
        if code is None:
            return None
        if code < 0:
            return -code
        if 128 < code <= 128 + 64:
            return code - 128
        return None


@dataclass(frozen=True)
class Rule:
    """One line of the table.

    ``pattern`` is searched (case-insensitively unless it says otherwise) in the lines of ``sources`` ("log",
    "error"); ``when`` is a predicate over the facts. A rule with both needs both; with only ``when``, ``fact``
    gives the evidence text. ``summary``/``suggestions``/``fact`` are ``str.format`` templates over the pattern's
    named groups plus ``exit_code`` and ``signal_name``; ``enrich(groups, line)`` may add more fields.
    """

    cause: str
    summary: str
    suggestions: tuple[str, ...]
    pattern: re.Pattern[str] | None = None
    sources: tuple[str, ...] = ("log", "error")
    when: Callable[[Facts], bool] | None = None
    fact: str = ""
    # ``enrich(groups, line, facts)`` -> more fields; a "suggestions" list in its answer replaces the rule's.
    enrich: Callable[[dict[str, str], str, Facts], dict[str, Any]] | None = field(default=None, compare=False)


def _p(regex: str) -> re.Pattern[str]:
    return re.compile(regex, re.IGNORECASE)


def _failed(f: Facts) -> bool:
    return f.exit_code not in (0, None) or bool(f.error)


def _killed_by_9(f: Facts) -> bool:
    return f.signal == 9


def _signalled(f: Facts) -> bool:
    return f.signal is not None


def _outside_command(f: Facts) -> bool:
    """The failure came from outside the command (launch, connection, download): it exited 0 or never ran.

    Rules over the error text only apply then: the orchestrator's error for a failed command quotes log lines,
    whose numbers and words must not read as a provider's HTTP status.
    """
    return f.exit_code in (0, None) and bool(f.error)


# Module name -> pip package where they differ (the usual suspects).
_PIP_NAMES = {
    "yaml": "PyYAML", "sklearn": "scikit-learn", "cv2": "opencv-python", "PIL": "Pillow", "bs4": "beautifulsoup4",
    "google.protobuf": "protobuf", "sentencepiece": "sentencepiece", "flash_attn": "flash-attn",
}
_TRAIN_EXTRA = {"torch", "transformers", "peft", "safetensors", "tokenizers", "accelerate"}


def _module_fields(groups: dict[str, str], line: str, facts: Facts) -> dict[str, Any]:
    module = groups.get("module") or ""
    top = module.split(".")[0]
    pkg = _PIP_NAMES.get(module) or _PIP_NAMES.get(top) or top
    if top in _TRAIN_EXTRA:
        install = "pip install 'trainorch-jupyter[train]'"
        where = " (the trainer's dependencies: torch, transformers, peft, safetensors)"
    else:
        install = f"pip install {pkg}"
        where = ""
    out: dict[str, Any] = {"module": module, "package": pkg, "install": install, "where": where}
    paths = facts.paths
    own = paths.own_module(module) if paths is not None else None
    if paths is not None and own is not None:
        why = paths.why_missing(own)
        reason = why[0] if why else "it was not in the workdir snapshot"
        out["summary"] = f"The module '{module}' is your own ({own}), but the job did not have it: {reason}."
        out["suggestions"] = [*(why[1] if why else []),
                              "Your modules are found when they sit in the workdir beside the script that imports "
                              "them (the workdir is the working directory on the machine)."]
        return out
    local = paths is not None and not paths.remote
    flag = f"--isolated --pip {pkg}" if local else f"--pip {pkg}"
    out["suggestions"] = [
        f"Install it on the training machine: add {flag} to %train submit (or a line '{pkg}' in a requirements.txt "
        f"beside your code{', installed on local with --isolated' if local else ''}); by hand: {install}{where}.",
        "On a rented GPU, an image that has it (--image) saves the install time.",
        "Check that the job runs the Python you expect (a virtualenv's python, not the system one).",
    ]
    return out


def _oom_fields(groups: dict[str, str], line: str, facts: Facts) -> dict[str, Any]:
    detail = ""
    tried = _OOM_TRIED.search(line)
    if tried:
        detail = f" (it tried to allocate {tried.group(1)}"
        total = _OOM_TOTAL.search(line)
        if total:
            detail += f" on a GPU of {total.group(1)}"
        detail += ")"
    return {"detail": detail}


def _import_fields(groups: dict[str, str], line: str, facts: Facts) -> dict[str, Any]:
    if groups.get("name"):
        return {"what": f"'{groups['name']}' from '{groups['module']}'", "upgrade": groups["module"].split(".")[0]}
    return {"what": groups.get("text") or "", "upgrade": "the library named above"}


def _file_fields(groups: dict[str, str], line: str, facts: Facts) -> dict[str, Any]:
    path = groups.get("path") or groups.get("path2") or groups.get("path3") or ""
    out: dict[str, Any] = {"path": path, "why": ""}
    paths = facts.paths
    if paths is None:
        return out
    why = paths.why_missing(path)
    if why is not None:
        out["why"] = f": {why[0]}"
        out["suggestions"] = why[1]
    return out


# Commands that come with a pip package (the package to add with --pip).
_COMMAND_PIP = {"torchrun": "torch", "accelerate": "accelerate", "deepspeed": "deepspeed", "wandb": "wandb",
                "huggingface-cli": "huggingface_hub", "hf": "huggingface_hub", "tensorboard": "tensorboard",
                "jupyter": "jupyter", "pytest": "pytest", "ipython": "ipython", "mlflow": "mlflow"}


def _command_fields(groups: dict[str, str], line: str, facts: Facts) -> dict[str, Any]:
    cmd = groups.get("cmd") or groups.get("cmd2") or groups.get("cmd3") or groups.get("cmd4") or "?"
    name = cmd.rsplit("/", 1)[-1]
    local = facts.paths is not None and not facts.paths.remote
    tips = []
    if name in _COMMAND_PIP:
        pkg = _COMMAND_PIP[name]
        tips.append(f"'{name}' comes with the pip package {pkg}: add --pip {pkg} to the submit"
                    f"{' (with --isolated on local)' if local else ''}, or call it through python -m.")
    if name == "python":
        tips.append("Many images have only python3: write python3 in the command.")
    if "/" in cmd or name.endswith((".sh", ".py")):
        tips.append("A script of yours must be in the workdir (it is sent with it) and run through its "
                    f"interpreter (sh {name} or python {name}) unless it is executable.")
    tips += ["Check the spelling of the program in the command, or give its full path.",
             "On a rented machine, use an image that has it (--image)."]
    return {"cmd": cmd, "suggestions": tips}


def _gpu_fields(groups: dict[str, str], line: str, facts: Facts) -> dict[str, Any]:
    if facts.paths is None or facts.paths.remote:
        return {}
    return {
        "summary": "The job needed a CUDA GPU, but this machine has none that works (the local provider runs the "
                   "job here).",
        "suggestions": [
            "Train on the CPU here (--device cpu, or auto), slowly, or rent a GPU: --provider runpod --gpu 'RTX 4090'.",
            "If this machine has an NVIDIA GPU, check its driver (nvidia-smi) and that torch is a CUDA build "
            "(torch.version.cuda is not None).",
        ],
    }


_SIZE = r"\d+(?:\.\d+)?\s*[KMGT]i?B"
_OOM_TRIED = re.compile(rf"Tried to allocate ({_SIZE})")
_OOM_TOTAL = re.compile(rf"(?:total capacity of |GPU \d+; )({_SIZE})")

RULES: tuple[Rule, ...] = (
    Rule(
        cause="max_runtime_exceeded",
        when=lambda f: f.timed_out,
        fact="the job ran past its max_runtime and was stopped",
        summary="The job ran longer than its max_runtime and was stopped.",
        suggestions=(
            "Raise max_runtime in the job spec (e.g. max_runtime='4h') if the run was making progress.",
            "Train for fewer steps/epochs or on a faster GPU (resources.gpu).",
            "Check the last metrics: a run stuck at step 0 points to a hang (data loading, a prompt for input), "
            "not slowness.",
        ),
    ),
    Rule(
        cause="integrity_error",
        pattern=_p(r"IntegrityError|do(?:es)? not match the manifest|not a valid safetensors file"),
        sources=("error",),
        when=_outside_command,
        summary="A downloaded artifact did not match the SHA-256 the training machine recorded, so it was "
                "not kept.",
        suggestions=(
            "Download the artifacts again (%train download JOB) while the machine is still up; a transfer error "
            "is retried from scratch.",
            "If it fails again the same way, the file changed on the machine after the manifest was made, or "
            "the disk there is failing: rerun the job.",
        ),
    ),
    Rule(
        cause="cuda_out_of_memory",
        pattern=_p(r"(?:CUDA|HIP|MPS backend|XPU) out of memory|CUDA error: out of memory|"
                   r"CUBLAS_STATUS_ALLOC_FAILED|OutOfMemoryError"),
        sources=("log",),
        enrich=_oom_fields,
        summary="The GPU ran out of memory{detail}.",
        suggestions=(
            "Lower train.batch_size (e.g. halve it) and raise train.grad_accum by the same factor to keep the "
            "effective batch size.",
            "Shorten train.seq_len: activation memory grows with sequence length.",
            "Turn on train.gradient_checkpointing=True (less memory, ~20-30% slower).",
            "Pick a GPU with more memory (resources.gpu, e.g. 'A100 80GB' or 'H100').",
            "If the message reports much memory reserved but unallocated, set "
            "env={{'PYTORCH_CUDA_ALLOC_CONF': 'expandable_segments:True'}}.",
        ),
    ),
    Rule(
        cause="disk_full",
        pattern=_p(r"No space left on device|ENOSPC|\[Errno 28\]|Disk quota exceeded|EDQUOT"),
        summary="The disk filled up (no space left on device).",
        suggestions=(
            "Ask for a bigger disk (resources.disk_gb) on a rented machine.",
            "Save fewer checkpoints, or write them outside $TRAINORCH_OUTPUT_DIR unless you need them back.",
            "Point the Hugging Face cache (HF_HOME) at a volume with room for the base model.",
            "On this machine: free space where the workspace and artifacts/ live.",
        ),
    ),
    Rule(
        cause="host_out_of_memory",
        pattern=_p(r"Out of memory: Kill(?:ed)? process|oom[-_ ]kill|invoked oom-killer|MemoryError|"
                   r"Cannot allocate memory|\[Errno 12\]"),
        sources=("log",),
        summary="The machine ran out of RAM (host memory, not GPU memory).",
        suggestions=(
            "Lower train.batch_size or train.seq_len; load the base model in lower precision.",
            "Use a machine with more RAM, or stream the dataset instead of loading it whole.",
            "Stop other memory-hungry processes on the machine (on this machine: other notebooks' kernels).",
        ),
    ),
    Rule(
        cause="host_out_of_memory",
        when=_killed_by_9,
        fact="the command was killed by signal 9 (SIGKILL), exit code {exit_code}",
        summary="The command was killed by SIGKILL (exit code {exit_code}), most likely by the kernel's "
                "out-of-memory killer: the machine ran out of RAM.",
        suggestions=(
            "Lower train.batch_size or train.seq_len; load the base model in lower precision.",
            "Use a machine with more RAM (a bigger instance type), or stream the dataset instead of loading "
            "it whole.",
            "On Linux, `dmesg | grep -i oom` on the machine confirms an OOM kill.",
        ),
    ),
    Rule(
        cause="data_error",
        pattern=re.compile(r"DataError: (?:file )?(?P<file>.+?):? line (?P<line>\d+):? (?P<what>.+)"),
        sources=("log",),
        summary="The training data is invalid: {file} line {line}: {what}",
        suggestions=(
            "Fix line {line} of {file} ({what}) and submit again.",
            "Each line must be one JSON object with the fields the trainer expects (see the trainer's docs); "
            "check the file with a JSON-lines validator.",
        ),
    ),
    Rule(
        cause="missing_module",
        pattern=re.compile(r"ModuleNotFoundError: No module named '(?P<module>[\w.]+)'"),
        sources=("log",),
        enrich=_module_fields,
        summary="The Python module '{module}' is not installed where the job ran.",
        suggestions=(
            "Install it on the training machine: {install}{where}.",
            "On a rented GPU, use an image that has it (resources.image) or install it at the start of the "
            "command (['bash', '-c', '{install} && python train.py']).",
            "Check that the job runs the Python you expect (a virtualenv's python, not the system one).",
        ),
    ),
    Rule(
        cause="import_error",
        pattern=re.compile(r"ImportError: (?:cannot import name '(?P<name>[\w.]+)' from '(?P<module>[\w.]+)'"
                           r"|(?P<text>.+))"),
        sources=("log",),
        enrich=_import_fields,
        summary="An import failed: {what}.",
        suggestions=(
            "A version mismatch is the usual cause: upgrade {upgrade} (pip install -U {upgrade}) or install "
            "'trainorch-jupyter[train]' for matching versions of the trainer's libraries.",
            "If it mentions a shared library (.so), the CUDA / driver versions of torch and the machine differ: "
            "use an image built for that CUDA version.",
        ),
    ),
    Rule(
        cause="no_gpu",
        pattern=_p(r"CUDA is not available|no CUDA GPUs? (?:is |are )?available|Torch not compiled with CUDA|"
                   r"Found no NVIDIA driver|NVIDIA driver on your system is too old|CUDA driver version is "
                   r"insufficient|NVIDIA-SMI has failed|no kernel image is available for execution|"
                   r"--device cuda: no CUDA|nvidia-smi: (?:command )?not found"),
        sources=("log",),
        enrich=_gpu_fields,
        summary="The job needed a CUDA GPU but none was usable where it ran.",
        suggestions=(
            "Use device='auto' (or 'cpu') to train without a GPU, slowly, on this machine.",
            "On a rented machine, pick an image whose CUDA version matches the host driver (resources.image).",
            "Install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu124).",
        ),
    ),
    Rule(
        cause="nan_loss",
        pattern=_p(r"\b\w*loss\b[\"']?\s*[:=]\s*[\"']?-?(?:nan|inf(?:inity)?)\b|\b(?:nan|non-finite|inf) loss\b|"
                   r"loss (?:is|became) (?:nan|inf|non-finite)|Function '\w+' returned nan values|"
                   r"detected (?:nan|inf)"),
        sources=("log",),
        summary="The loss became NaN or infinite: training diverged.",
        suggestions=(
            "Lower train.lr (e.g. by 10x) and add warmup (train.warmup_steps=50).",
            "Train in bf16 rather than fp16 where the GPU supports it; fp16 overflows easily.",
            "Look for empty or extremely long examples in the data.",
        ),
    ),
    Rule(
        cause="command_not_found",
        pattern=re.compile(r"could not start the command: \[Errno \d+\] [^:']*: '(?P<cmd>[^']+)'"),
        enrich=_command_fields,
        summary="The command '{cmd}' could not be started: it was not found on the machine.",
        suggestions=(),
    ),
    Rule(
        cause="file_not_found",
        pattern=re.compile(r"can't open file '(?P<path>[^']+)'|"
                           r"(?:FileNotFoundError|OSError|IOError): \[Errno 2\] No such file or directory: "
                           r"'(?P<path2>[^']+)'|"
                           r"^[\w./-]+: (?:\d+: )?(?:cannot (?:open|access) )?'?(?P<path3>[^':\n]+?)'?: No such file"),
        enrich=_file_fields,
        summary="A file the job needs was not found: {path}{why}.",
        suggestions=(
            "The files of your workdir (the notebook's folder, or --workdir DIR) are sent with the job, and the "
            "command runs in it on the machine: open them by paths relative to it.",
            "Other local files: send them with --input PATH (the spec's inputs); they land in $TRAINORCH_INPUT_DIR "
            "on the machine.",
        ),
    ),
    Rule(
        cause="command_not_found",
        pattern=_p(r"(?P<cmd>[\w./-]+): (?:command )?not found(?!:)|exec: \"?(?P<cmd2>[\w./-]+)\"?: executable file "
                   r"not found|command not found: (?P<cmd3>[\w./-]+)"),
        when=lambda f: f.exit_code in (126, 127),
        enrich=_command_fields,
        summary="The command '{cmd}' could not be started: it was not found on the machine.",
        suggestions=(),
    ),
    Rule(
        cause="permission_denied",
        pattern=_p(r"PermissionError: \[Errno 13\][^\n]*|Permission denied|EACCES|Operation not permitted"),
        summary="The job was refused access to a file or folder (permission denied).",
        suggestions=(
            "Write only under $TRAINORCH_OUTPUT_DIR (or the work dir); other paths may belong to another user.",
            "If a script is the command, make it executable (chmod +x) or run it through its interpreter.",
        ),
    ),
    Rule(
        cause="provider_capacity",
        pattern=_p(r"CapacityError|no (?:longer )?(?:any )?(?:machine|instance|gpu|offer)s? (?:is |are )?"
                   r"(?:currently )?available|insufficient capacity|out of capacity|sold out"),
        sources=("error",),
        when=_outside_command,
        summary="The provider had no machine of the requested kind available.",
        suggestions=(
            "Try another GPU type (resources.gpu) or region (resources.region), or leave them out.",
            "Raise resources.max_price_per_hour if it filters out every offer.",
            "Try another provider, or again in a few minutes.",
        ),
    ),
    Rule(
        cause="provider_auth",
        pattern=_p(r"\b401\b|\b403\b|unauthori[sz]ed|forbidden|invalid api key|api key (?:is )?(?:missing|not set|"
                   r"invalid)|(?:RUNPOD|LAMBDA|VAST)_API_KEY"),
        sources=("error",),
        when=_outside_command,
        summary="The provider rejected the API key (or none was found).",
        suggestions=(
            "Set the provider's key in the environment (RUNPOD_API_KEY, LAMBDA_API_KEY or VAST_API_KEY) or the "
            "system keyring, then restart the kernel.",
            "Check that the key is still valid in the provider's console and has the needed permissions.",
        ),
    ),
    Rule(
        cause="runner_unreachable",
        pattern=_p(r"RunnerError|runner (?:could not be reached|unreachable|did not (?:start|answer))|"
                   r"ConnectError|Connection refused|ConnectTimeout|ReadTimeout|Name or service not known|"
                   r"timed out waiting for the runner|connection (?:reset|lost|closed)"),
        sources=("error",),
        when=_outside_command,
        summary="The runner on the training machine could not be reached.",
        suggestions=(
            "Check the machine in the provider's console: it may have been stopped or preempted.",
            "Re-attach later (%load_ext trainorch_jupyter re-attaches unfinished jobs); logs and outputs stay on "
            "the machine until it is terminated.",
            "If the machine never became reachable, its image may lack python3: pick another image.",
        ),
    ),
    Rule(
        cause="provider_error",
        pattern=_p(r"ProviderError|\b(?:runpod|lambda|vast|vastai|local): |rate limit|\b429\b|\b5\d\d\b"),
        sources=("error",),
        when=_outside_command,
        summary="The provider's API returned an error.",
        suggestions=(
            "Retry in a few minutes: provider APIs fail transiently and rate-limit bursts.",
            "Check the provider's status page and console for the machine.",
        ),
    ),
    Rule(
        cause="killed_by_signal",
        when=_signalled,
        fact="the command was killed by {signal_name} (exit code {exit_code})",
        summary="The command was killed by {signal_name} (exit code {exit_code}).",
        suggestions=(
            "SIGTERM without a cancel usually means the machine was stopped or preempted (spot/interruptible "
            "instances): rerun, or use an on-demand machine.",
            "SIGSEGV/SIGABRT point to a crash in native code (CUDA, a library): check the lines just before, "
            "and library versions.",
        ),
    ),
)

# The last resort, for any other failure.
_ERROR_LINE = _p(r"\b\w*(?:Error|Exception)\b|Traceback|\bfatal\b|\bfailed\b|\babort")
_MASK = (
    (re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?i)\b([\w-]*(?:api[_-]?key|token|secret|password|passwd)[\w-]*)(\s*[=:]\s*)(['\"]?)[^\s'\",;]+"),
     r"\1\2\3***"),
)


def _mask(text: str) -> str:
    for rx, repl in _MASK:
        text = rx.sub(repl, text)
    return text


def _evidence(line: str) -> str:
    line = _mask(line.strip())
    return line if len(line) <= _EVIDENCE_MAX else line[: _EVIDENCE_MAX - 3] + "..."


def _signal_name(sig: int | None) -> str:
    if sig is None:
        return "a signal"
    try:
        return f"signal {sig} ({signal.Signals(sig).name})"
    except ValueError:
        return f"signal {sig}"


def _last_match(pattern: re.Pattern[str], texts: list[str]) -> tuple[re.Match[str], str] | None:
    for text in texts:
        for line in reversed(text.splitlines()):
            m = pattern.search(line)
            if m:
                return m, line
    return None


class _Fill(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return ""


def _render(rule: Rule, facts: Facts, groups: Mapping[str, str | None], line: str) -> dict[str, Any]:
    values: dict[str, Any] = _Fill({k: v for k, v in groups.items() if v is not None})
    values.setdefault("exit_code", "" if facts.exit_code is None else facts.exit_code)
    values.setdefault("signal_name", _signal_name(facts.signal))
    summary = None
    suggestions: list[str] | None = None
    if rule.enrich is not None:
        extra = dict(rule.enrich({k: str(v) for k, v in values.items()}, line, facts))
        summary = extra.pop("summary", None)  # already written out: not a template
        suggestions = extra.pop("suggestions", None)
        values.update(extra)
    evidence = line or rule.fact.format_map(values)
    shown = [s.format_map(values) for s in rule.suggestions] if suggestions is None else list(suggestions)
    return {
        "cause": rule.cause,
        "summary": _mask(summary if summary is not None else rule.summary.format_map(values)),
        "suggestions": [_mask(s) for s in shown if s],
        "evidence": _evidence(evidence),
    }


def diagnose(*, exit_code: int | None, log_tail: str, error: str | None = None, timed_out: bool = False,
             cancelled: bool = False, paths: PathMap | None = None) -> dict[str, Any] | None:
    """The most likely cause of a failed job, or None when nothing failed (or the user cancelled it).

    Returns ``{"cause": short id, "summary": one sentence, "suggestions": [actions], "evidence": the log line
    or fact that matched}``.
    """
    shown = paths if paths is not None else PathMap()
    facts = Facts(exit_code=exit_code, log_tail=shown.map(log_tail or ""), error=shown.map(error) if error else None,
                  timed_out=timed_out, cancelled=cancelled, paths=paths)
    if cancelled and not timed_out:
        return None
    if not (_failed(facts) or timed_out):
        return None
    for rule in RULES:
        if rule.when is not None and not rule.when(facts):
            continue
        if rule.pattern is None:
            return _render(rule, facts, {}, "")
        texts = [t for src, t in (("error", facts.error or ""), ("log", facts.log_tail)) if src in rule.sources]
        found = _last_match(rule.pattern, texts)
        if found is not None:
            m, line = found
            return _render(rule, facts, m.groupdict(), line)
    return _generic(facts)


def diagnose_job(job: Job, log_tail: str, *, error: str | None = None, timed_out: bool = False,
                 workspace: Path | str | None = None) -> dict[str, Any] | None:
    """:func:`diagnose` for a job's record: its paths shown as the user's, its snapshot consulted."""
    return diagnose(exit_code=job.exit_code, log_tail=log_tail, error=error if error is not None else job.error,
                    timed_out=timed_out, cancelled=job.state.value == "CANCELLED",
                    paths=PathMap.for_job(job, workspace))


def _generic(facts: Facts) -> dict[str, Any]:
    if facts.exit_code not in (0, None):
        found = _last_match(_ERROR_LINE, [facts.log_tail])
        lines = [ln for ln in facts.log_tail.splitlines() if ln.strip()]
        evidence = found[1] if found else (lines[-1] if lines else f"exit code {facts.exit_code}, empty log")
        return {
            "cause": "nonzero_exit",
            "summary": f"The command exited with code {facts.exit_code}.",
            "suggestions": [
                "Read the last lines of the log (%train logs JOB) for the error above the exit.",
                "Run the same command on this machine first (provider='local') with a few steps to reproduce it.",
            ],
            "evidence": _evidence(evidence),
        }
    first = next((ln for ln in (facts.error or "").splitlines() if ln.strip()), "")
    return {
        "cause": "error",
        "summary": "The job failed outside the training command.",
        "suggestions": ["Read the error text; retry the step (download, launch) once the cause is fixed."],
        "evidence": _evidence(first),
    }
