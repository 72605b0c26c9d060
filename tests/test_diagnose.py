"""diagnose: each rule against realistic log tails / errors, priorities, and the no-failure cases."""

from __future__ import annotations

from typing import Any

import pytest

from trainorch_jupyter.diagnose import RULES, diagnose

TRACE = "Traceback (most recent call last):\n  File \"/work/train.py\", line 41, in <module>\n    main()\n"

TORCH2_OOM = TRACE + (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
    "79.14 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.07 GiB memory in use. "
    "Of the allocated memory 76.52 GiB is allocated by PyTorch, and 1.04 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)\n"
)
TORCH1_OOM = TRACE + (
    "RuntimeError: CUDA out of memory. Tried to allocate 512.00 MiB (GPU 0; 15.78 GiB total capacity; "
    "14.21 GiB already allocated; 301.19 MiB free; 14.62 GiB reserved in total by PyTorch) If reserved memory is "
    ">> allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory "
    "Management and PYTORCH_CUDA_ALLOC_CONF\n"
)
METRICS = "".join(f'TRAINORCH_METRIC {{"step": {i}, "total_steps": 100, "loss": {2.5 - i / 50:.3f}}}\n'
                  for i in range(5, 30, 5))


def d(**kw: Any) -> dict[str, Any]:
    kw.setdefault("log_tail", "")
    kw.setdefault("exit_code", 1)
    out = diagnose(**kw)
    assert out is not None
    assert set(out) == {"cause", "summary", "suggestions", "evidence"}
    assert isinstance(out["summary"], str) and out["summary"]
    assert out["suggestions"] and all(isinstance(s, str) and s for s in out["suggestions"])
    assert "{" not in out["summary"]  # every template field was filled
    return out


def test_no_failure_is_none() -> None:
    assert diagnose(exit_code=0, log_tail=METRICS + "done\n") is None
    assert diagnose(exit_code=None, log_tail="") is None
    # A cancelled job is what the user asked for, even though SIGTERM killed it.
    assert diagnose(exit_code=-15, log_tail=METRICS, cancelled=True) is None
    # A successful log that mentions errors in passing is still a success.
    assert diagnose(exit_code=0, log_tail="warning: CUDA out of memory retry succeeded\n") is None


@pytest.mark.parametrize("log", [TORCH2_OOM, TORCH1_OOM])
def test_cuda_oom(log: str) -> None:
    out = d(log_tail=METRICS + log, exit_code=1)
    assert out["cause"] == "cuda_out_of_memory"
    assert "out of memory" in out["evidence"]
    text = " ".join(out["suggestions"])
    for word in ("batch_size", "grad_accum", "seq_len", "gradient_checkpointing", "resources.gpu"):
        assert word in text
    assert "Tried" not in out["summary"] and ("2.00 GiB" in out["summary"] or "512.00 MiB" in out["summary"])


def test_cuda_oom_other_forms() -> None:
    assert d(log_tail="RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be asynchronously "
                      "reported at some other API call\n")["cause"] == "cuda_out_of_memory"
    assert d(log_tail="RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`\n"
             )["cause"] == "cuda_out_of_memory"
    assert d(log_tail="RuntimeError: MPS backend out of memory (MPS allocated: 17.00 GB)\n")["cause"] == \
        "cuda_out_of_memory"


@pytest.mark.parametrize("code", [137, -9])
def test_killed_by_sigkill_is_host_oom(code: int) -> None:
    out = d(exit_code=code, log_tail=METRICS + "Killed\n")
    assert out["cause"] == "host_out_of_memory"
    assert "SIGKILL" in out["summary"] and str(code) in out["evidence"]


def test_host_oom_from_log() -> None:
    out = d(exit_code=1, log_tail=TRACE + "MemoryError: Unable to allocate 12.0 GiB for an array with shape "
                                          "(3, 1073741824) and data type float32\n")
    assert out["cause"] == "host_out_of_memory" and "MemoryError" in out["evidence"]


def test_disk_full() -> None:
    log = TRACE + ("  File \"/usr/lib/python3/dist-packages/torch/serialization.py\", line 628, in save\n"
                   "RuntimeError: [enforce fail at inline_container.cc:595] . unexpected pos 1536 vs 1470\n"
                   "OSError: [Errno 28] No space left on device: '/runner/output/checkpoint-500/model.safetensors'\n")
    out = d(log_tail=log)
    assert out["cause"] == "disk_full" and "No space left" in out["evidence"]
    assert any("disk_gb" in s for s in out["suggestions"])


def test_missing_module_names_it() -> None:
    out = d(log_tail=TRACE + "ModuleNotFoundError: No module named 'peft'\n")
    assert out["cause"] == "missing_module" and "'peft'" in out["summary"]
    assert any("trainorch-jupyter[train]" in s for s in out["suggestions"])
    out = d(log_tail=TRACE + "ModuleNotFoundError: No module named 'yaml'\n")
    assert any("pip install PyYAML" in s for s in out["suggestions"])
    out = d(log_tail=TRACE + "ModuleNotFoundError: No module named 'wandb.sdk'\n")
    assert "'wandb.sdk'" in out["summary"] and any("pip install wandb" in s for s in out["suggestions"])


def test_import_error() -> None:
    out = d(log_tail=TRACE + "ImportError: cannot import name 'LoraConfig' from 'peft' "
                             "(/usr/lib/python3/site-packages/peft/__init__.py)\n")
    assert out["cause"] == "import_error" and "'LoraConfig' from 'peft'" in out["summary"]
    assert any("pip install -U peft" in s for s in out["suggestions"])
    out = d(log_tail="ImportError: libcudart.so.12: cannot open shared object file: No such file or directory\n")
    assert out["cause"] == "import_error" and "libcudart" in out["summary"]


def test_file_not_found() -> None:
    out = d(log_tail=TRACE + "FileNotFoundError: [Errno 2] No such file or directory: '/home/me/data.jsonl'\n")
    assert out["cause"] == "file_not_found" and "/home/me/data.jsonl" in out["summary"]
    assert any("inputs" in s for s in out["suggestions"])


def test_trainer_data_error() -> None:
    out = d(exit_code=2, log_tail="loading data\nDataError: /runner/inputs/train.jsonl: line 17: missing field "
                                  "'completion'\n")
    assert out["cause"] == "data_error"
    assert "line 17" in out["summary"] and "train.jsonl" in out["summary"] and "completion" in out["summary"]
    assert "line 17" in out["suggestions"][0]
    out = d(exit_code=2, log_tail="DataError: file data.jsonl line 3: not valid JSON (Expecting value)\n")
    assert out["cause"] == "data_error" and "data.jsonl line 3" in out["summary"]


@pytest.mark.parametrize("line", [
    'TRAINORCH_METRIC {"step": 40, "total_steps": 100, "loss": NaN}',
    "{'loss': nan, 'grad_norm': nan, 'learning_rate': 0.0002, 'epoch': 0.4}",
    "RuntimeError: Function 'MmBackward0' returned nan values in its 0th output.",
    "ValueError: loss is NaN at step 40",
    'TRAINORCH_METRIC {"step": 40, "loss": Infinity}',
])
def test_nan_loss(line: str) -> None:
    out = d(exit_code=1, log_tail=METRICS + line + "\n")
    assert out["cause"] == "nan_loss" and out["evidence"] == line.strip()
    assert any("lr" in s for s in out["suggestions"])


def test_finite_losses_are_not_nan() -> None:
    out = d(exit_code=1, log_tail=METRICS + "RuntimeError: boom\n")
    assert out["cause"] == "nonzero_exit"


def test_timed_out_wins() -> None:
    out = d(exit_code=-15, log_tail=METRICS, timed_out=True, cancelled=True)
    assert out["cause"] == "max_runtime_exceeded"
    assert any("max_runtime" in s for s in out["suggestions"])


@pytest.mark.parametrize("line", [
    "RuntimeError: --device cuda: no CUDA GPU is available",
    "AssertionError: Torch not compiled with CUDA enabled",
    "RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed "
    "a driver from http://www.nvidia.com/Download/index.aspx",
    "RuntimeError: No CUDA GPUs are available",
    "RuntimeError: The NVIDIA driver on your system is too old (found version 11040).",
])
def test_no_gpu(line: str) -> None:
    out = d(log_tail=TRACE + line + "\n")
    assert out["cause"] == "no_gpu"


def test_permission_denied() -> None:
    out = d(log_tail=TRACE + "PermissionError: [Errno 13] Permission denied: '/opt/models/cache'\n")
    assert out["cause"] == "permission_denied" and "/opt/models/cache" in out["evidence"]
    assert d(exit_code=126, log_tail="bash: ./train.sh: Permission denied\n")["cause"] == "permission_denied"


def test_command_not_found() -> None:
    out = d(exit_code=127, log_tail="bash: line 1: torchrun: command not found\n")
    assert out["cause"] == "command_not_found"


def test_integrity_error_text() -> None:
    err = ("adapter_model.safetensors: SHA-256 do not match the manifest after 2 attempt(s): expected sha256 "
           + "a" * 64 + " (100 bytes), got sha256 " + "b" * 64 + " (100 bytes)")
    out = d(exit_code=0, log_tail=METRICS, error=err)
    assert out["cause"] == "integrity_error" and "adapter_model.safetensors" in out["evidence"]
    out = d(exit_code=0, error="IntegrityError: x.safetensors: not a valid safetensors file (header)")
    assert out["cause"] == "integrity_error"


def test_runner_and_provider_errors() -> None:
    assert d(exit_code=None, error="RunnerError: the runner at http://10.0.0.5:8765 could not be reached: "
                                   "ConnectError: [Errno 111] Connection refused")["cause"] == "runner_unreachable"
    assert d(exit_code=None, error="runpod: There are no longer any instances available with the requested "
                                   "specifications.")["cause"] == "provider_capacity"
    assert d(exit_code=None, error="lambda: HTTP 401: Invalid API key (code global/invalid-api-key)"
             )["cause"] == "provider_auth"
    assert d(exit_code=None, error="vast: HTTP 502 bad gateway")["cause"] == "provider_error"
    assert d(exit_code=None, error="something odd happened\nsecond line")["cause"] == "error"


def test_error_text_quoting_log_lines_is_not_read_as_provider_status() -> None:
    # The orchestrator's error for a failed command quotes the log's last lines.
    err = "the command exited with code 1; last lines:\nstep 500 of 401 done\nValueError: bad shape"
    out = d(exit_code=1, log_tail="step 500 of 401 done\nValueError: bad shape\n", error=err)
    assert out["cause"] == "nonzero_exit" and out["evidence"] == "ValueError: bad shape"


def test_generic_nonzero_exit_shows_last_error_line() -> None:
    log = METRICS + TRACE + "ValueError: expected 3 columns, got 2\nsome cleanup output\n"
    out = d(exit_code=3, log_tail=log)
    assert out["cause"] == "nonzero_exit" and "3" in out["summary"]
    assert out["evidence"] == "ValueError: expected 3 columns, got 2"
    assert d(exit_code=3, log_tail="")["evidence"] == "exit code 3, empty log"
    assert d(exit_code=3, log_tail="just text\nlast words\n")["evidence"] == "last words"


def test_other_signals() -> None:
    out = d(exit_code=-11, log_tail=METRICS)
    assert out["cause"] == "killed_by_signal" and "SIGSEGV" in out["summary"]
    assert d(exit_code=143, log_tail="")["cause"] == "killed_by_signal"


def test_priority_oom_over_generic_and_last_line_is_evidence() -> None:
    log = "FileNotFoundError: [Errno 2] No such file or directory: 'optional.cfg'\n" + TORCH2_OOM
    assert d(log_tail=log)["cause"] == "cuda_out_of_memory"
    log = ("RuntimeError: CUDA out of memory. Tried to allocate 1.00 GiB (GPU 0; 8 GiB total capacity)\n"
           "RuntimeError: CUDA out of memory. Tried to allocate 3.00 GiB (GPU 0; 8 GiB total capacity)\n")
    assert "3.00 GiB" in d(log_tail=log)["evidence"]


def test_secrets_are_masked_in_evidence() -> None:
    out = d(exit_code=1, log_tail="Error: request failed, headers={'Authorization': 'Bearer abc.def-123'} "
                                  "api_key=sk-12345 HF_TOKEN: hf_abcdef\n")
    ev = out["evidence"]
    assert "abc.def-123" not in ev and "sk-12345" not in ev and "hf_abcdef" not in ev
    long = d(exit_code=1, log_tail="RuntimeError: " + "x" * 5000 + "\n")["evidence"]
    assert len(long) <= 300 and long.endswith("...")


def test_rule_table_is_data() -> None:
    causes = {r.cause for r in RULES}
    assert {"cuda_out_of_memory", "host_out_of_memory", "disk_full", "missing_module", "import_error",
            "file_not_found", "data_error", "nan_loss", "max_runtime_exceeded", "runner_unreachable",
            "provider_error", "integrity_error", "no_gpu", "permission_denied"} <= causes


# --------------------------------------------------------------------------------------------
# A custom command's failures, with the job's record: the user's paths, what the snapshot held
# --------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from trainorch_jupyter.checks import prepare  # noqa: E402
from trainorch_jupyter.diagnose import PathMap, diagnose_job  # noqa: E402
from trainorch_jupyter.model import Job, JobSpec, TrainerConfig  # noqa: E402

JOB_ID = "miss-20260101-120000-abcdef"
LOCAL_WORK = f".trainorch/machines/{JOB_ID}/work"
REMOTE_STATE = "/root/.trainorch/job-0123456789abcdef/state"


def _job(ws: Path, command: tuple[str, ...] = ("python", "miss.py"), *, provider: str = "local",
         workdir: bool = True, **spec_kw: Any) -> Job:
    """A job whose workdir snapshot of ``ws`` was really made (its manifest is on disk)."""
    spec = JobSpec(name="miss", provider=provider, command=command, workdir=str(ws) if workdir else None, **spec_kw)
    ready = prepare(spec, workspace=ws, remote=provider != "local")
    return Job(id=JOB_ID, spec=ready.spec, provider=provider, exit_code=1,
               snapshot=ready.snapshot.summary() if ready.snapshot else None)


def _folder(tmp_path: Path) -> Path:
    ws = tmp_path / "nb"
    (ws / "data").mkdir(parents=True)
    (ws / "train.py").write_text("import helper\n")
    (ws / "data" / "table.csv").write_text("a\n1\n")
    (ws / ".gitignore").write_text("*.parquet\nhelper.py\nbig/\n")
    (ws / "helper.py").write_text("X = 1\n")
    (ws / "small.parquet").write_bytes(b"PAR1")
    with open(ws / "huge.parquet", "wb") as fh:  # sparse: 60 MB to the size check, nothing on disk
        fh.truncate(60_000_000)
    (tmp_path / "elsewhere.csv").write_text("x\n")
    (ws / "outside.csv").symlink_to(tmp_path / "elsewhere.csv")
    return ws


def dj(job: Job, log: str, ws: Path, **kw: Any) -> dict[str, Any]:
    out = diagnose_job(job, log, workspace=ws, **kw)
    assert out is not None and out["suggestions"] and "{" not in out["summary"]
    return out


def test_machine_paths_are_shown_as_the_users(tmp_path: Path) -> None:
    ws = _folder(tmp_path)
    job = _job(ws, ("python3", "train.py"), provider="runpod",
               train=None, inputs=(str(ws / "data" / "table.csv"),))
    paths = PathMap.for_job(job, ws)
    text = (f"python3: can't open file '{REMOTE_STATE}/work/miss.py': [Errno 2]\n"
            f"reading {REMOTE_STATE}/inputs/table.csv, writing {REMOTE_STATE}/output/adapter/x.bin\n"
            f"cwd={ws}/{LOCAL_WORK}")
    assert paths.map(text) == ("python3: can't open file 'miss.py': [Errno 2]\n"
                               f"reading {ws}/data/table.csv, writing $TRAINORCH_OUTPUT_DIR/adapter/x.bin\n"
                               "cwd=.")
    # A workdir below the notebook's folder is shown from there; without a record, the layout is still stripped.
    sub = JobSpec(name="x", command=("true",), workdir=str(ws / "data"))
    assert PathMap.for_job(Job(id="x", spec=sub), ws).map(f"{ws}/{LOCAL_WORK}/table.csv") == "data/table.csv"
    assert PathMap().map(f"'{ws}/{LOCAL_WORK}/a/b.py'") == "'a/b.py'"


def test_trainer_data_error_names_the_users_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    spec = JobSpec(name="t", provider="runpod", train=TrainerConfig(model="tiny", data="bad.jsonl"))
    job = Job(id="t-1", spec=spec, provider="runpod", exit_code=2)
    out = dj(job, f"loading data\nDataError: {REMOTE_STATE}/inputs/data.jsonl: line 2: malformed JSON: Expecting "
                  "',' delimiter (column 15)\n", tmp_path)
    assert out["cause"] == "data_error" and out["summary"].startswith("The training data is invalid: bad.jsonl line 2")
    assert ".trainorch" not in out["evidence"]


def test_a_missing_script_that_never_was_in_the_workdir(tmp_path: Path) -> None:
    ws = _folder(tmp_path)
    out = dj(_job(ws), f"/usr/bin/python3: can't open file '{ws}/{LOCAL_WORK}/miss.py': [Errno 2] No such file or "
                       "directory\n", ws, )
    assert out["cause"] == "file_not_found"
    assert "miss.py: it is not in your workdir" in out["summary"] and ".trainorch" not in out["summary"]
    assert ".trainorch" not in out["evidence"] and "'miss.py'" in out["evidence"]


def test_a_file_left_out_by_gitignore_names_the_pattern_and_the_fix(tmp_path: Path) -> None:
    ws = _folder(tmp_path)
    log = TRACE + (f"  File \"{REMOTE_STATE}/work/train.py\", line 3, in <module>\n"
                   "    df = pd.read_parquet('small.parquet')\n"
                   "FileNotFoundError: [Errno 2] No such file or directory: 'small.parquet'\n")
    out = dj(_job(ws, provider="runpod"), log, ws)
    assert "left out of the workdir snapshot: ignored by .gitignore (pattern '*.parquet')" in out["summary"]
    assert any("!small.parquet" in s and ".trainorchignore" in s for s in out["suggestions"])


def test_a_big_ignored_file_is_said_too_big_and_sent_with_input(tmp_path: Path) -> None:
    ws = _folder(tmp_path)
    out = dj(_job(ws, provider="runpod"),
             "FileNotFoundError: [Errno 2] No such file or directory: 'huge.parquet'\n", ws)
    assert "60.0 MB, too big" in out["summary"]
    assert any("--input huge.parquet" in s and "$TRAINORCH_INPUT_DIR/huge.parquet" in s for s in out["suggestions"])


def test_a_file_outside_the_workdir(tmp_path: Path) -> None:
    ws = _folder(tmp_path)
    for missing in ("../shared/labels.csv", "/home/me/datasets/labels.csv"):
        out = dj(_job(ws, provider="runpod"),
                 f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}'\n", ws)
        assert "outside the workdir" in out["summary"] and missing in out["summary"]
        assert any("--input" in s for s in out["suggestions"])
    out = dj(_job(ws, provider="runpod"), "cat: outside.csv: No such file or directory\n", ws)
    assert "symbolic link to outside the workdir" in out["summary"]


def test_a_path_on_this_computer_inside_the_workdir(tmp_path: Path) -> None:
    ws = _folder(tmp_path)
    out = dj(_job(ws, provider="runpod"),
             f"FileNotFoundError: [Errno 2] No such file or directory: '{ws}/data/table.csv'\n", ws)
    assert "by its path on this computer" in out["summary"]
    assert any("data/table.csv" in s and "relative" in s for s in out["suggestions"])


def test_a_file_made_after_the_submit_and_a_job_without_a_workdir(tmp_path: Path) -> None:
    ws = _folder(tmp_path)
    job = _job(ws)
    (ws / "late.csv").write_text("made later\n")
    out = dj(job, "FileNotFoundError: [Errno 2] No such file or directory: 'late.csv'\n", ws)
    assert "after the submit" in out["summary"]
    bare = _job(ws, workdir=False)
    out = dj(bare, "ls: cannot access 'train.py': No such file or directory\n", ws)
    assert "no workdir was sent" in out["summary"] and any("--workdir" in s for s in out["suggestions"])


@pytest.mark.parametrize(("module", "package"), [("sklearn", "scikit-learn"), ("cv2", "opencv-python"),
                                                 ("PIL", "Pillow"), ("yaml", "PyYAML"), ("wandb", "wandb")])
def test_missing_module_suggests_pip_with_the_package_that_provides_it(tmp_path: Path, module: str,
                                                                        package: str) -> None:
    ws = _folder(tmp_path)
    log = TRACE + f"ModuleNotFoundError: No module named '{module}'\n"
    remote = dj(_job(ws, provider="runpod"), log, ws)
    assert remote["cause"] == "missing_module" and f"--pip {package}" in remote["suggestions"][0]
    assert "--isolated" not in remote["suggestions"][0]
    local = dj(_job(ws), log, ws)
    assert f"--isolated --pip {package}" in local["suggestions"][0]


def test_a_missing_module_of_ones_own_is_not_a_pip_package(tmp_path: Path) -> None:
    ws = _folder(tmp_path)
    out = dj(_job(ws, ("python", "train.py")), TRACE + "ModuleNotFoundError: No module named 'helper'\n", ws)
    assert "your own (helper.py)" in out["summary"] and "ignored by .gitignore (pattern 'helper.py')" in out["summary"]
    assert not any("--pip helper" in s for s in out["suggestions"])


@pytest.mark.parametrize("line", [
    "RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a "
    "driver from http://www.nvidia.com/Download/index.aspx",
    "AssertionError: Torch not compiled with CUDA enabled",
    "/bin/sh: 1: nvidia-smi: not found",
])
def test_no_gpu_on_local_says_this_machine(tmp_path: Path, line: str) -> None:
    ws = _folder(tmp_path)
    job = _job(ws)
    job.exit_code = 127 if "nvidia-smi" in line else 1
    out = dj(job, TRACE + line + "\n", ws)
    assert out["cause"] == "no_gpu" and "this machine" in out["summary"]
    assert any("--provider runpod" in s for s in out["suggestions"])
    remote = _job(ws, provider="runpod")
    remote.exit_code = job.exit_code
    assert "this machine" not in dj(remote, TRACE + line + "\n", ws)["summary"]


@pytest.mark.parametrize(("log", "cmd"), [
    ("/bin/sh: 9: exec: pythn: not found\n", "pythn"),
    ("bash: line 1: torchrun: command not found\n", "torchrun"),
    ("zsh:1: command not found: accelerate\n", "accelerate"),
    ("trainorch-runner: could not start the command: [Errno 2] No such file or directory: 'pythn'\n", "pythn"),
])
def test_command_not_found_names_the_command(tmp_path: Path, log: str, cmd: str) -> None:
    ws = _folder(tmp_path)
    job = _job(ws, (cmd, "x"), provider="runpod")
    job.exit_code = 127
    out = dj(job, log, ws)
    assert out["cause"] == "command_not_found" and f"'{cmd}'" in out["summary"]
    if cmd == "torchrun":
        assert any("--pip torch" in s for s in out["suggestions"])
