"""The whole cloud path through the fake Lambda: launch (stage-0 in cloud-init ``user_data``) -> an SSH tunnel on port
22 with the job's own key -> the pinned TLS channel inside it -> the runner pushed and hash-checked -> inputs, logs,
metrics -> verified artifacts -> the instance terminated and its SSH key deleted; and the faults that must each end
with no machine billing.

The fake's instance really runs the ``user_data`` script (the stage-0) in a directory standing in for the VM, and
an SSH server (asyncssh) stands for its port 22, forwarding to the stage-0's port. Every request the client sends and
every answer the fake gives is checked against Lambda's OpenAPI spec (``tests/specs``); 429 and 5xx answers, which
Lambda gives but the spec does not list, are the only mismatches allowed. A canary key stands in for
``LAMBDA_API_KEY``. The provider is passed to the orchestrator directly (``providers=``), so the tests do not depend
on the package's entry points.
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
from typing import Any

import pytest

from trainorch_jupyter.fakes import LambdaFake
from trainorch_jupyter.fakes.base import OpenAPIValidator
from trainorch_jupyter.model import JobState
from trainorch_jupyter.orchestrator import Orchestrator, settings
from trainorch_jupyter.providers.lambdacloud import LambdaProvider
from trainorch_jupyter.store import Store

from .helpers import wait_for

SPEC = Path(__file__).resolve().parent / "specs" / "lambda-cloud-v1.8.3.openapi.json"
CANARY = "secret_CANARY0lambda0e2e0KEY0must0never0leak0c4ca4238a0b92382"
BIN = str(Path(sys.executable).parent)
#: fast pacing for tests (the real values, 1 s and 12 s, are the defaults and are tested in test_lambda_provider)
FAST = {"request_interval_s": 0.02, "launch_interval_s": 0.2, "list_ttl_s": 0.2, "api_backoff_s": 0.05,
        "adopt_wait_s": 2.0, "terminate_wait_s": 10.0, "unhealthy_grace_s": 0.0, "ssh_timeout_s": 5.0}
UNDOCUMENTED = {429, 500, 503}  # statuses Lambda answers that its spec does not list

WRITE_OUTPUT = ("import os, sys\n"
                "print('hello from the VM', flush=True)\n"
                "print('TRAINORCH_METRIC {\"step\": 1, \"loss\": 0.5}', flush=True)\n"
                "open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/result.bin', 'wb').write(bytes(range(256)) * 1000)\n")


def spec_mismatches(fake: LambdaFake) -> list[dict[str, Any]]:
    """Mismatches other than an undocumented 429/5xx status (whose body is then not checked either)."""
    out = []
    for m in fake.ledger.spec_mismatches():
        undocumented = m["direction"] == "response" and m["status"] in UNDOCUMENTED and all(
            e.startswith("ResponseNotFound") for e in m["errors"])
        if not undocumented:
            out.append(m)
    return out


@pytest.fixture(scope="module")
def validator() -> OpenAPIValidator:
    assert SPEC.exists(), f"Lambda's spec is missing at {SPEC}"
    return OpenAPIValidator.cached(SPEC)


@pytest.fixture
def lam(validator: OpenAPIValidator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LambdaFake]:
    """A fake Lambda whose "image" has this venv's python3 (so the VMs need no network), the key set."""
    fake = LambdaFake(api_keys={CANARY}, boot_s=0.0, terminate_s=0.2, kill_grace_s=1.0, request_rate=50.0,
                      request_burst=10.0, launch_interval_s=0.2, validator=validator, work_dir=tmp_path / "vms",
                      extra_env={"PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PIP_NO_INDEX": "1",
                                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}).start()
    monkeypatch.setenv("LAMBDA_API_KEY", CANARY)
    monkeypatch.setenv("TRAINORCH_LAMBDA_URL", fake.base_url)
    try:
        yield fake
        assert spec_mismatches(fake) == []
        assert fake.ledger.rate_limit_violations() == []
        assert fake.firewall_changes == 0 and not [r for r in fake.ledger.requests() if "firewall" in r["path"]]
        if not fake.instance_ids():  # every VM gone: no stage-0, runner or job command of theirs may still run
            wait_for(lambda: not fake.vm_pids(), 15, what="no process of a gone VM")
    finally:
        fake.stop()


def orchestrator(workspace: Path, **config: Any) -> Orchestrator:
    return Orchestrator(workspace, providers={"lambda": LambdaProvider},
                        provider_config={"lambda": {**FAST, **config}})


def _billing(fake: LambdaFake) -> int:
    return int(fake.state()["machines_billing"])


def _no_canary_under(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and "vms" not in path.relative_to(root).parts[:1]:
            assert CANARY.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def _no_keys_left(fake: LambdaFake, workspace: Path) -> None:
    assert fake.ssh_key_names() == []  # the job's SSH key is deleted from the account with its instance
    key_dir = workspace / ".trainorch" / "lambda-ssh"
    assert not key_dir.exists() or list(key_dir.iterdir()) == []


def test_a_command_job_on_lambda_end_to_end(lam: LambdaFake, tmp_path: Path) -> None:
    orch = orchestrator(tmp_path)
    try:
        job = orch.submit({"name": "la-cmd", "provider": "lambda", "command": ["python3", "-c", WRITE_OUTPUT],
                           "resources": {"gpu": "A10"}})
        final = job.wait(240)
        assert final.state is JobState.COMPLETED, (final.error, job.logs())
        assert "hello from the VM" in job.logs()
        assert [m["step"] for m in job.metrics()] == [1]
        (art,) = final.artifacts
        assert art.name == "result.bin"
        assert hashlib.sha256(art.path.read_bytes()).hexdigest() == art.hash_sha256
        assert art.path.read_bytes() == bytes(range(256)) * 1000
        # Reached through the SSH tunnel (a local port) with TLS pinned to the job's own certificate.
        assert str(final.runner_url).startswith("https://127.0.0.1:")
        assert "BEGIN CERTIFICATE" in final.machine["tls_cert"]
        record = json.dumps(final.to_dict())
        assert "PRIVATE KEY" not in record and "jupyter" not in record
        assert final.machine["instance_type"] == "gpu_1x_a10" and final.gpu == "A10"
        assert final.price_per_hour == pytest.approx(0.75) and final.billing_until is not None
        assert orch.reap_list() == []
    finally:
        orch.close()
    assert _billing(lam) == 0
    (inst,) = lam.state()["machines"]
    assert inst["gone_reason"] == "terminated"
    assert lam.ssh_state(inst["id"]) is None
    _no_keys_left(lam, tmp_path)
    _no_canary_under(tmp_path)


def test_capacity_error_fails_clearly_and_bills_nothing(lam: LambdaFake, tmp_path: Path) -> None:
    lam.inject(capacity_errors=5)
    orch = orchestrator(tmp_path)
    try:
        final = orch.submit({"name": "la-cap", "provider": "lambda", "command": ["true"],
                             "resources": {"gpu": "A10"}}).wait(120)
        assert final.state is JobState.FAILED
        assert "capacity" in (final.error or "") and "A10" in (final.error or ""), final.error
        assert orch.reap_list() == []
    finally:
        orch.close()
    assert _billing(lam) == 0 and lam.state()["machines"] == []
    _no_keys_left(lam, tmp_path)


def test_preemption_mid_run_fails_the_job_with_the_reason(lam: LambdaFake, tmp_path: Path) -> None:
    orch = orchestrator(tmp_path)
    try:
        job = orch.submit({"name": "la-pre", "provider": "lambda",
                           "command": ["python3", "-c", "import time\nprint('up', flush=True)\ntime.sleep(600)"],
                           "resources": {"gpu": "A10"}})
        wait_for(lambda: "up" in job.logs(), 120, what="the command to run")
        (iid,) = lam.instance_ids()
        lam.preempt(iid, "preempted")
        final = job.wait(120)
        assert final.state is JobState.FAILED
        assert any(w in (final.error or "") for w in ("gone", "lost", "preempted")), final.error
    finally:
        orch.close()
    assert _billing(lam) == 0
    _no_keys_left(lam, tmp_path)


def test_a_dropped_ssh_connection_is_made_again_and_the_job_completes(lam: LambdaFake, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "MACHINE_CHECK_S", 0.5)  # how soon an unreachable runner's machine is polled
    orch = orchestrator(tmp_path)
    try:
        job = orch.submit({"name": "la-drop", "provider": "lambda",
                           "command": ["python3", "-c", "import time\nfor i in range(8):\n"
                                       "    print('tick', i, flush=True); time.sleep(0.3)\n"],
                           "resources": {"gpu": "A10"}})
        wait_for(lambda: "tick 1" in job.logs(), 120, what="the command to run")
        (iid,) = lam.instance_ids()
        assert lam.drop_ssh(iid) >= 1  # the tunnel's SSH connection is cut (a network blip)
        wait_for(lambda: (lam.ssh_state(iid) or {}).get("logins", 0) >= 2, 60, what="the tunnel to be made again")
        final = job.wait(180)
        assert final.state is JobState.COMPLETED, final.error
        assert all(f"tick {i}" in job.logs() for i in range(8))
    finally:
        orch.close()
    assert _billing(lam) == 0
    _no_keys_left(lam, tmp_path)


def test_a_terminate_that_fails_and_a_launch_that_fails_but_made_the_vm_bill_nothing(lam: LambdaFake,
                                                                                        tmp_path: Path) -> None:
    lam.inject(fail_but_created=1, terminate_failures=1)
    orch = orchestrator(tmp_path, max_attempts=1)
    try:
        final = orch.submit({"name": "la-ghost", "provider": "lambda", "command": ["python3", "-c", "print(1)"],
                             "resources": {"gpu": "A10"}}).wait(240)
        # Adopted (the job ran) or terminated (the job failed): either way nothing is left billing.
        assert final.state is JobState.COMPLETED, final.error
        assert final.machine.get("adopted") is True
        wait_for(lambda: orch.reap_list() == [], 60, what="an empty reap list")
    finally:
        orch.close()
    assert [r["status"] for r in lam.ledger.requests() if r["path"].endswith("/launch")] == [500]  # one launch only
    wait_for(lambda: _billing(lam) == 0, 30, what="no VM billing")
    _no_keys_left(lam, tmp_path)


def test_the_provisioning_deadline_terminates_the_vm(lam: LambdaFake, tmp_path: Path) -> None:
    lam.boot_s = 3600.0  # the VM never leaves booting
    orch = orchestrator(tmp_path, provision_timeout_s=2)
    try:
        final = orch.submit({"name": "la-slow", "provider": "lambda", "command": ["true"],
                             "resources": {"gpu": "A10"}}).wait(120)
        assert final.state is JobState.FAILED
        assert "not ready within" in (final.error or ""), final.error
    finally:
        orch.close()
    assert _billing(lam) == 0
    _no_keys_left(lam, tmp_path)


KILLED_KERNEL = textwrap.dedent("""
    import json, sys, time
    from trainorch_jupyter.orchestrator import Orchestrator, settings
    from trainorch_jupyter.providers.lambdacloud import LambdaProvider
    settings.RUNNER_RETENTION_S = float(sys.argv[2])
    orch = Orchestrator(sys.argv[1], providers={"lambda": LambdaProvider},
                        provider_config={"lambda": json.loads(sys.argv[3])})
    job = orch.submit({"name": "la-killed", "provider": "lambda", "resources": {"gpu": "A10"},
                       "command": ["python3", "-c", "import time; print('up', flush=True); time.sleep(1.5)"]})
    print(job.id, flush=True)
    time.sleep(600)
""")


def _kernel_that_dies(tmp_path: Path, retention_s: float) -> str:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_KERNEL, str(tmp_path), str(retention_s), json.dumps(FAST)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip()
    assert job_id, "the kernel did not submit"
    store = Store(tmp_path)
    try:
        wait_for(lambda: store.get(job_id).state is JobState.RUNNING, 120, what="the job to run")
    finally:
        store.close()
    proc.send_signal(signal.SIGKILL)  # the kernel dies mid-job, and its SSH tunnel with it
    proc.wait(10)
    return job_id


def test_a_killed_kernels_vm_is_reached_again_by_the_next_kernel(lam: LambdaFake, tmp_path: Path) -> None:
    """The next kernel opens a new tunnel with the job's key (kept in the workspace) and the recorded host key,
    follows the job to its end, and terminates the VM."""
    job_id = _kernel_that_dies(tmp_path, retention_s=1800.0)
    assert _billing(lam) == 1
    orch = orchestrator(tmp_path)
    try:
        final = orch.wait(job_id, timeout=180)
        assert final.state is JobState.COMPLETED, final.error
        assert "up" in orch.logs(job_id)
    finally:
        orch.close()
    assert _billing(lam) == 0
    _no_keys_left(lam, tmp_path)


def test_a_killed_kernels_vm_halts_itself_but_bills_until_the_workspace_reaps_it(
        lam: LambdaFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No kernel comes back: the runner's retention runs out after the command ends and its dead-man hook
    (``sudo -n shutdown -h now``) halts the VM. Lambda has no stop, so the halted VM still bills (the fake keeps it
    on the ledger) until this workspace is opened again: then its job is followed again, the machine is found
    failed, and it is terminated."""
    job_id = _kernel_that_dies(tmp_path, retention_s=1.0)
    (iid,) = lam.instance_ids()
    wait_for(lambda: lam.state()["instances"][0]["halted"], 120, what="the VM to halt itself")
    assert _billing(lam) == 1  # halted, yet billing: the documented limit of Lambda's dead-man switch
    monkeypatch.setattr(settings, "REAP_POLL_S", 0.5)
    orch = orchestrator(tmp_path)
    try:
        final = orch.wait(job_id, timeout=180)
        assert final.state in (JobState.FAILED, JobState.COMPLETED), final.error
        wait_for(lambda: _billing(lam) == 0, 60, what="the halted VM to be terminated")
        wait_for(lambda: orch.reap_list() == [], 60, what="an empty reap list")
    finally:
        orch.close()
    gone = [m for m in lam.state()["machines"] if m["id"] == iid]
    assert gone[0]["gone_reason"] == "terminated"
    _no_keys_left(lam, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_magic_on_lambda_in_a_real_kernel(lam: LambdaFake, tmp_path: Path) -> None:
    """The issue's end to end: %train submit --provider lambda --model tiny in a real kernel -> the VM's stage-0 from
    cloud-init -> the SSH tunnel -> bootstrap (this package as a wheel, pip output in the log) -> live logs and
    metrics -> verified adapter -> VM terminated, its SSH key deleted."""
    from .nbrun import errors_of, run_cells, text_of

    data = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "train.jsonl"
    cells = [
        # the provider is handed to the kernel's orchestrator directly (no dependence on the entry points)
        "from trainorch_jupyter.orchestrator import get_orchestrator\n"
        "from trainorch_jupyter.providers.lambdacloud import LambdaProvider\n"
        f"_ = get_orchestrator(providers={{'lambda': LambdaProvider}}, provider_config={{'lambda': {FAST!r}}})",
        "%load_ext trainorch_jupyter",
        f"job = %train submit --provider lambda --gpu A10 --name la-e2e --model tiny --data {data} "
        "--steps 20 --batch-size 16 --lr 3e-3 --log-every 5\njob",
        "final = job.wait(600)\nprint('STATE', final.state.value, final.error)",
        "print('FILES', sorted(a.name for a in final.artifacts))\nprint('COST', final.cost_so_far)",
        "%train status",
    ]
    out = run_cells(cells, tmp_path, timeout=700,
                    env={"LAMBDA_API_KEY": CANARY, "TRAINORCH_LAMBDA_URL": lam.base_url})
    for cell in out:
        assert not errors_of(cell), text_of(cell)
        assert CANARY not in json.dumps(cell), "the API key reached a notebook output"
    assert "STATE COMPLETED" in text_of(out[3]), text_of(out[3])
    assert "adapter_model.safetensors" in text_of(out[4])
    (job,) = Store(tmp_path).list_jobs()
    log = (tmp_path / ".trainorch" / "logs" / f"{job.id}.log").read_text()
    assert "[trainorch] pip install" in log and "Requirement already satisfied" in log
    metrics = Store(tmp_path).metrics(job.id)
    assert [m["step"] for m in metrics if m.get("kind", "train") == "train"][-1] == 20
    summary = json.loads((tmp_path / "artifacts" / job.id / "training_summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    for art in job.artifacts:
        assert hashlib.sha256(art.path.read_bytes()).hexdigest() == art.hash_sha256
    assert _billing(lam) == 0
    _no_keys_left(lam, tmp_path)
    _no_canary_under(tmp_path)
