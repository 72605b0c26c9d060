"""The whole cloud path through the fake RunPod: create -> stage-0 on a pinned TLS channel -> the runner pushed
and hash-checked -> inputs, logs, metrics -> verified artifacts -> the pod destroyed; and the faults that must
each end with no machine billing.

The fake's create really runs the pod's start command (the stage-0) as a process standing in for the machine,
with RunPod's environment; every request the client sends and every answer the fake gives is checked against
RunPod's OpenAPI spec (``tests/specs``). A canary key stands in for ``RUNPOD_API_KEY``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainorch_jupyter.fakes import RunPodFake
from trainorch_jupyter.fakes.base import OpenAPIValidator
from trainorch_jupyter.model import JobState
from trainorch_jupyter.store import Store

from .helpers import orchestrator, wait_for
from .nbrun import errors_of, run_cells, text_of

ROOT = Path(__file__).resolve().parent.parent
SPEC = Path(__file__).resolve().parent / "specs" / "runpod-rest-v2.openapi.json"
DATA = ROOT / "notebooks" / "data" / "train.jsonl"
CANARY = "rpa_CANARY0e2e0KEY0must0never0leak0d41d8cd98f"
BIN = str(Path(sys.executable).parent)

WRITE_OUTPUT = ("import os, sys\n"
                "print('hello from the pod', flush=True)\n"
                "print('TRAINORCH_METRIC {\"step\": 1, \"loss\": 0.5}', flush=True)\n"
                "open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/result.bin', 'wb').write(bytes(range(256)) * 1000)\n")


@pytest.fixture(scope="module")
def validator() -> OpenAPIValidator:
    return OpenAPIValidator.cached(SPEC)


@pytest.fixture
def runpod(validator: OpenAPIValidator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[RunPodFake]:
    """A fake RunPod whose "image" has this venv's python3 (so the pods need no network), the key set."""
    fake = RunPodFake(api_keys={CANARY}, provision_s=0.2, start_s=0.2, ports_delay_s=0.2, restart_delay_s=0.2,
                      kill_grace_s=1.0, rate_limits=[], validator=validator, work_dir=tmp_path / "pods",
                      extra_env={"PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PIP_NO_INDEX": "1",
                                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}).start()
    monkeypatch.setenv("RUNPOD_API_KEY", CANARY)
    monkeypatch.setenv("TRAINORCH_RUNPOD_URL", fake.base_url)
    try:
        yield fake
        assert fake.ledger.spec_mismatches("request") == []
        assert fake.ledger.spec_mismatches("response") == []
    finally:
        fake.stop()


def _billing(fake: RunPodFake) -> int:
    return int(fake.state()["machines_billing"])


def _no_canary_under(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and "pods" not in path.relative_to(root).parts[:1]:
            assert CANARY.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_a_command_job_on_runpod_end_to_end(runpod: RunPodFake, tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "rp-cmd", "provider": "runpod", "command": ["python3", "-c", WRITE_OUTPUT],
                           "resources": {"gpu": "RTX 4090"}})
        final = job.wait(240)
        assert final.state is JobState.COMPLETED, (final.error, job.logs())
        assert "hello from the pod" in job.logs()
        assert [m["step"] for m in job.metrics()] == [1]
        (art,) = final.artifacts
        assert art.name == "result.bin"
        assert hashlib.sha256(art.path.read_bytes()).hexdigest() == art.hash_sha256
        assert art.path.read_bytes() == bytes(range(256)) * 1000
        # Reached over TLS pinned to the job's own certificate; the key material never stored.
        assert str(final.runner_url).startswith("https://")
        assert "BEGIN CERTIFICATE" in final.machine["tls_cert"]
        assert "PRIVATE KEY" not in json.dumps(final.to_dict())
        assert final.price_per_hour and final.price_per_hour > 0 and final.cost_so_far is not None
        assert final.billing_until is not None
        assert orch.reap_list() == []
    assert _billing(runpod) == 0
    _no_canary_under(tmp_path)


def test_capacity_error_fails_clearly_and_bills_nothing(runpod: RunPodFake, tmp_path: Path) -> None:
    runpod.inject(capacity_errors=5)
    with orchestrator(tmp_path) as orch:
        final = orch.submit({"name": "rp-cap", "provider": "runpod", "command": ["true"],
                             "resources": {"gpu": "RTX 4090"}}).wait(120)
        assert final.state is JobState.FAILED
        error = (final.error or "").lower()
        assert "4090" in error and ("capacity" in error or "no instance" in error or "in stock" in error), final.error
        assert orch.reap_list() == []
    assert _billing(runpod) == 0


def test_preemption_mid_run_fails_the_job_with_the_reason(runpod: RunPodFake, tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "rp-pre", "provider": "runpod",
                           "command": ["python3", "-c", "import time\nprint('up', flush=True)\ntime.sleep(600)"],
                           "resources": {"gpu": "RTX 4090"}})
        wait_for(lambda: "up" in job.logs(), 120, what="the command to run")
        (pod_id,) = runpod.pod_ids()
        runpod.preempt(pod_id, "vanish")
        final = job.wait(120)
        assert final.state is JobState.FAILED
        assert any(w in (final.error or "") for w in ("gone", "lost", "going away")), final.error
    assert _billing(runpod) == 0


def test_a_terminate_that_fails_three_times_is_retried_until_confirmed(runpod: RunPodFake, tmp_path: Path) -> None:
    runpod.inject(terminate_failures=3)
    with orchestrator(tmp_path) as orch:
        final = orch.submit({"name": "rp-term", "provider": "runpod", "command": ["python3", "-c", "print(1)"],
                             "resources": {"gpu": "RTX 4090"}}).wait(240)
        assert final.state is JobState.COMPLETED, final.error
        assert orch.reap_list() == []
    assert _billing(runpod) == 0


def test_a_create_that_fails_but_made_the_pod_bills_nothing(runpod: RunPodFake, tmp_path: Path) -> None:
    runpod.inject(fail_but_created=1)
    with orchestrator(tmp_path) as orch:
        final = orch.submit({"name": "rp-ghost", "provider": "runpod", "command": ["python3", "-c", "print(1)"],
                             "resources": {"gpu": "RTX 4090"}}).wait(240)
        # Adopted (the job ran) or destroyed (the job failed): either way nothing is left billing.
        assert final.state in (JobState.COMPLETED, JobState.FAILED), final.error
        wait_for(lambda: orch.reap_list() == [], 60, what="an empty reap list")
    wait_for(lambda: _billing(runpod) == 0, 30, what="no pod billing")


def test_the_provisioning_deadline_destroys_the_pod(runpod: RunPodFake, tmp_path: Path) -> None:
    runpod.provision_s = 3600.0  # the pod never comes up
    with orchestrator(tmp_path, provider_config={"runpod": {"provision_timeout_s": 4}}) as orch:
        final = orch.submit({"name": "rp-slow", "provider": "runpod", "command": ["true"],
                             "resources": {"gpu": "RTX 4090"}}).wait(120)
        assert final.state is JobState.FAILED
        assert "not ready within" in (final.error or ""), final.error
    assert _billing(runpod) == 0


def test_cancel_during_provisioning_destroys_the_pod(runpod: RunPodFake, tmp_path: Path) -> None:
    runpod.provision_s = 3600.0
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "rp-cancel", "provider": "runpod", "command": ["true"],
                           "resources": {"gpu": "RTX 4090"}})
        wait_for(lambda: runpod.pod_ids(), 60, what="the pod to be created")
        job.cancel()
        assert job.wait(60).state is JobState.CANCELLED
    assert _billing(runpod) == 0


KILLED_KERNEL = textwrap.dedent("""
    import sys, time
    from trainorch_jupyter.orchestrator import Orchestrator, settings
    settings.RUNNER_RETENTION_S = float(sys.argv[2])
    orch = Orchestrator(sys.argv[1])
    job = orch.submit({"name": "rp-killed", "provider": "runpod", "resources": {"gpu": "RTX 4090"},
                       "command": ["python3", "-c", "import time; print('up', flush=True); time.sleep(3)"]})
    print(job.id, flush=True)
    time.sleep(600)
""")


def _kernel_that_dies(tmp_path: Path, retention_s: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_KERNEL, str(tmp_path), str(retention_s)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip()
    assert job_id, "the kernel did not submit"
    store = Store(tmp_path)
    wait_for(lambda: store.get(job_id).state is JobState.RUNNING, 120, what="the job to run")
    store.close()
    proc.send_signal(signal.SIGKILL)  # the kernel dies mid-job
    proc.wait(10)
    return proc, job_id


def test_a_killed_kernels_pod_is_destroyed_by_the_next_kernel(runpod: RunPodFake, tmp_path: Path) -> None:
    _, job_id = _kernel_that_dies(tmp_path, retention_s=1800.0)
    assert _billing(runpod) == 1
    with orchestrator(tmp_path) as orch:
        final = orch.wait(job_id, timeout=180)
        assert final.state is JobState.COMPLETED, final.error
    assert _billing(runpod) == 0


def test_a_killed_kernels_pod_destroys_itself(runpod: RunPodFake, tmp_path: Path) -> None:
    """No kernel ever comes back: the runner's retention runs out after the command ends, and its dead-man
    hook deletes the pod with the pod's own key."""
    _kernel_that_dies(tmp_path, retention_s=3.0)
    wait_for(lambda: _billing(runpod) == 0, 120, what="the pod to destroy itself")
    gone = [m for m in runpod.state()["machines"] if m.get("gone_reason")]
    assert gone, runpod.state()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_magic_on_runpod_in_a_real_kernel(runpod: RunPodFake, tmp_path: Path) -> None:
    """The issue's end to end: %train submit --provider runpod --model tiny in a real kernel -> bootstrap (this
    package as a wheel, pip output in the log) -> live logs and metrics -> verified adapter -> pod destroyed."""
    cells = [
        "%load_ext trainorch_jupyter",
        f"job = %train submit --provider runpod --gpu 'RTX 4090' --name rp-e2e --model tiny --data {DATA} "
        "--steps 20 --batch-size 16 --lr 3e-3 --log-every 5\njob",
        "final = job.wait(600)\nprint('STATE', final.state.value, final.error)",
        "print('FILES', sorted(a.name for a in final.artifacts))\nprint('COST', final.cost_so_far)",
        "%train status",
    ]
    out = run_cells(cells, tmp_path, timeout=700,
                    env={"RUNPOD_API_KEY": CANARY, "TRAINORCH_RUNPOD_URL": runpod.base_url})
    for cell in out:
        assert not errors_of(cell), text_of(cell)
        assert CANARY not in json.dumps(cell), "the API key reached a notebook output"
    assert "STATE COMPLETED" in text_of(out[2]), text_of(out[2])
    assert "adapter_model.safetensors" in text_of(out[3])
    (job,) = Store(tmp_path).list_jobs()
    log = (tmp_path / ".trainorch" / "logs" / f"{job.id}.log").read_text()
    assert "[trainorch] pip install" in log and "Requirement already satisfied" in log  # requirement 5.2
    metrics = Store(tmp_path).metrics(job.id)
    assert [m["step"] for m in metrics if m.get("kind", "train") == "train"][-1] == 20
    summary = json.loads((tmp_path / "artifacts" / job.id / "training_summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    for art in job.artifacts:
        assert hashlib.sha256(art.path.read_bytes()).hexdigest() == art.hash_sha256
    assert _billing(runpod) == 0
    _no_canary_under(tmp_path)

