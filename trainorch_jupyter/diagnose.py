"""From a failed job's facts (exit code, log tail, error text) to a cause and what to do about it.

The rules are data: :data:`RULES` is a table searched in order, the first that matches wins. A rule matches on a
regular expression over the log tail and/or the error text (the *last* matching line is the evidence, as the most
recent one is what killed the job) and/or a predicate over the facts (exit code, timed out). Summaries and
suggestions are format strings filled from the pattern's named groups.

Evidence is a log line that is already in the job's log; it is cut to a few hundred characters and anything that
looks like a credential (``Bearer ...``, ``api_key=...``) is masked anyway.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RULES", "Facts", "Rule", "diagnose"]

_EVIDENCE_MAX = 300


@dataclass(frozen=True)
class Facts:
    exit_code: int | None
    log_tail: str
    error: str | None
    timed_out: bool
    cancelled: bool

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
    enrich: Callable[[dict[str, str], str], dict[str, str]] | None = field(default=None, compare=False)


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


def _module_fields(groups: dict[str, str], line: str) -> dict[str, str]:
    module = groups.get("module") or ""
    top = module.split(".")[0]
    pkg = _PIP_NAMES.get(module) or _PIP_NAMES.get(top) or top
    if top in _TRAIN_EXTRA:
        install = "pip install 'trainorch-jupyter[train]'"
        where = " (the trainer's dependencies: torch, transformers, peft, safetensors)"
    else:
        install = f"pip install {pkg}"
        where = ""
    return {"module": module, "package": pkg, "install": install, "where": where}


def _oom_fields(groups: dict[str, str], line: str) -> dict[str, str]:
    detail = ""
    tried = _OOM_TRIED.search(line)
    if tried:
        detail = f" (it tried to allocate {tried.group(1)}"
        total = _OOM_TOTAL.search(line)
        if total:
            detail += f" on a GPU of {total.group(1)}"
        detail += ")"
    return {"detail": detail}


def _import_fields(groups: dict[str, str], line: str) -> dict[str, str]:
    if groups.get("name"):
        return {"what": f"'{groups['name']}' from '{groups['module']}'", "upgrade": groups["module"].split(".")[0]}
    return {"what": groups.get("text") or "", "upgrade": "the library named above"}


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
                   r"--device cuda: no CUDA"),
        sources=("log",),
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
        cause="file_not_found",
        pattern=re.compile(r"(?:FileNotFoundError|OSError): \[Errno 2\] No such file or directory: "
                           r"'(?P<path>[^']+)'"),
        summary="A file the job needs was not found: {path}.",
        suggestions=(
            "Local files must be listed in the spec's inputs; they are uploaded to $TRAINORCH_INPUT_DIR on "
            "the machine (read them from there, not from your notebook's path).",
            "Check the path relative to the job's working dir ($TRAINORCH_OUTPUT_DIR/../work by default).",
        ),
    ),
    Rule(
        cause="command_not_found",
        pattern=_p(r"(?P<cmd>[\w./-]+): (?:command )?not found|exec: \"?(?P<cmd2>[\w./-]+)\"?: executable file "
                   r"not found"),
        when=lambda f: f.exit_code in (126, 127),
        summary="The command could not be started: it was not found on the machine.",
        suggestions=(
            "Check the spelling of the program in the command, or give its full path.",
            "Install it in the image (resources.image) or call it through python -m.",
        ),
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
    if rule.enrich is not None:
        values.update(rule.enrich({k: str(v) for k, v in values.items()}, line))
    evidence = line or rule.fact.format_map(values)
    return {
        "cause": rule.cause,
        "summary": _mask(rule.summary.format_map(values)),
        "suggestions": [_mask(s.format_map(values)) for s in rule.suggestions],
        "evidence": _evidence(evidence),
    }


def diagnose(*, exit_code: int | None, log_tail: str, error: str | None = None, timed_out: bool = False,
             cancelled: bool = False) -> dict[str, Any] | None:
    """The most likely cause of a failed job, or None when nothing failed (or the user cancelled it).

    Returns ``{"cause": short id, "summary": one sentence, "suggestions": [actions], "evidence": the log line
    or fact that matched}``.
    """
    facts = Facts(exit_code=exit_code, log_tail=log_tail or "", error=error or None, timed_out=timed_out,
                  cancelled=cancelled)
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
