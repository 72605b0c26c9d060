"""The whole cloud path through the fake Vast.ai: offer search -> create from the ask with the stage-0 as onstart ->
the pinned TLS channel on a direct port -> the runner pushed and hash-checked -> inputs, logs, metrics -> verified
artifacts -> the instance destroyed; and the faults that must each end with no machine billing.

The fake's create really runs the instance's onstart (the stage-0) as a process standing in for the machine, with
Vast's environment (``CONTAINER_API_KEY``, ``VAST_TCP_PORT_70000``...); every request the client sends and every
answer the fake gives is checked against Vast's OpenAPI spec (``tests/specs``, with the notes' errata). The fake
enforces Vast's per-endpoint spacing (scaled down) and the provider paces to it: no request is refused for it.
A canary key stands in for ``VAST_API_KEY``. The provider comes in through ``providers=`` (its entry point is the
package's metadata)."""

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

from trainorch_jupyter.fakes import VastFake
from trainorch_jupyter.fakes.base import RateWindow
from trainorch_jupyter.fakes.vast import VastSpecValidator
from trainorch_jupyter.model import JobState
from trainorch_jupyter.providers.vast import VastProvider
from trainorch_jupyter.store import Store

from .helpers import orchestrator, wait_for

SPEC = Path(__file__).resolve().parent / "specs" / "vast-ai.openapi.yaml"
CANARY = "vast_CANARY0e2e0KEY0must0never0leak0d41d8cd98f"
BIN = str(Path(sys.executable).parent)
SPACING_S = 0.1  # Vast's per-endpoint spacing, scaled down: the fake refuses faster calls, the provider paces
ENDPOINTS = ("search", "create", "destroy", "show", "list", "manage", "user")
# the provider keeps twice the fake's spacing (plus its margin): a loaded test machine delays some requests
CONFIG: dict[str, Any] = {"min_intervals": {e: 2 * SPACING_S for e in ENDPOINTS}, "poll_cache_s": 0.5,
                          "api_backoff_s": 0.05, "adopt_wait_s": 2.0}
PROVIDERS = {"vast": VastProvider}

WRITE_OUTPUT = ("import os, sys\n"
                "print('hello from the instance', flush=True)\n"
                "print('TRAINORCH_METRIC {\"step\": 1, \"loss\": 0.5}', flush=True)\n"
                "open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/result.bin', 'wb').write(bytes(range(256)) * 1000)\n")


@pytest.fixture(scope="module")
def validator() -> VastSpecValidator:
    return VastSpecValidator.cached(SPEC)


@pytest.fixture
def vast(validator: VastSpecValidator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[VastFake]:
    """A fake Vast whose "image" has this venv's python3 (so the instances need no network), the key set."""
    fake = VastFake(api_keys={CANARY}, provision_s=0.2, start_s=0.2, ports_delay_s=0.2, kill_grace_s=1.0,
                    rate_limits={e: (RateWindow(e, 1, SPACING_S),) for e in ENDPOINTS}, validator=validator,
                    work_dir=tmp_path / "instances",
                    extra_env={"PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PIP_NO_INDEX": "1",
                               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}).start()
    monkeypatch.setenv("VAST_API_KEY", CANARY)
    monkeypatch.setenv("TRAINORCH_VAST_URL", fake.base_url)
    try:
        yield fake
        assert fake.ledger.spec_mismatches("request") == []
        assert fake.ledger.spec_mismatches("response") == []
        assert fake.ledger.rate_limit_violations() == []
    finally:
        fake.stop()


def _billing(fake: VastFake) -> int:
    return int(fake.state()["machines_billing"])


def _no_canary_under(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and "instances" not in path.relative_to(root).parts[:1]:
            assert CANARY.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_a_command_job_on_vast_end_to_end(vast: VastFake, tmp_path: Path) -> None:
    with orchestrator(tmp_path, providers=PROVIDERS, provider_config={"vast": CONFIG}) as orch:
        job = orch.submit({"name": "va-cmd", "provider": "vast", "command": ["python3", "-c", WRITE_OUTPUT],
                           "resources": {"gpu": "RTX 4090", "max_price_per_hour": 0.5}})
        final = job.wait(240)
        assert final.state is JobState.COMPLETED, (final.error, job.logs())
        assert "hello from the instance" in job.logs()
        assert [m["step"] for m in job.metrics()] == [1]
        (art,) = final.artifacts
        assert art.name == "result.bin"
        assert hashlib.sha256(art.path.read_bytes()).hexdigest() == art.hash_sha256
        assert art.path.read_bytes() == bytes(range(256)) * 1000
        # reached over TLS pinned to the job's own certificate, on the port Vast gave; the key material never stored
        assert str(final.runner_url).startswith("https://127.0.0.1:")
        assert "BEGIN CERTIFICATE" in final.machine["tls_cert"]
        assert "PRIVATE KEY" not in json.dumps(final.to_dict())
        assert final.machine["ask_id"] == 20002 and final.gpu == "RTX 4090"
        assert final.price_per_hour and 0.28 < final.price_per_hour < 0.5 and final.billing_until is not None
        assert orch.reap_list() == []
    assert _billing(vast) == 0
    assert [m["gone_reason"] for m in vast.state()["machines"]] == ["destroyed"]
    _no_canary_under(tmp_path)


def test_capacity_errors_fail_clearly_and_bill_nothing(vast: VastFake, tmp_path: Path) -> None:
    vast.inject(capacity_errors=5)
    with orchestrator(tmp_path, providers=PROVIDERS, provider_config={"vast": CONFIG}) as orch:
        final = orch.submit({"name": "va-cap", "provider": "vast", "command": ["true"],
                             "resources": {"gpu": "RTX 4090"}}).wait(120)
        assert final.state is JobState.FAILED
        assert "taken" in (final.error or "") and "RTX 4090" in (final.error or ""), final.error
        assert orch.reap_list() == []
    assert _billing(vast) == 0 and vast.state()["machines"] == []


def test_a_failed_create_that_made_an_instance_and_failing_destroys_leave_nothing_billing(
        vast: VastFake, tmp_path: Path) -> None:
    vast.inject(fail_but_created=1, terminate_failures=2)  # the first destroy of each instance fails, then works
    with orchestrator(tmp_path, providers=PROVIDERS, provider_config={"vast": CONFIG}) as orch:
        final = orch.submit({"name": "va-ghost", "provider": "vast", "command": ["python3", "-c", "print(1)"],
                             "resources": {"gpu": "RTX 4090"}}).wait(240)
        assert final.state is JobState.COMPLETED, final.error
        assert final.machine["ask_id"] == 20003  # the first offer's instance came back stopped: destroyed, next one
        wait_for(lambda: orch.reap_list() == [], 60, what="an empty reap list")
    wait_for(lambda: _billing(vast) == 0, 30, what="no instance billing")
    assert len(vast.state()["machines"]) == 2


def test_preemption_mid_run_fails_the_job_and_the_stopped_instance_is_destroyed(vast: VastFake, tmp_path: Path) -> None:
    with orchestrator(tmp_path, providers=PROVIDERS, provider_config={"vast": CONFIG}) as orch:
        job = orch.submit({"name": "va-pre", "provider": "vast",
                           "command": ["python3", "-c", "import time\nprint('up', flush=True)\ntime.sleep(600)"],
                           "resources": {"gpu": "RTX 4090"}})
        wait_for(lambda: "up" in job.logs(), 120, what="the command to run")
        (iid,) = vast.instance_ids()
        vast.preempt(iid, "stopped")  # outbid: its disk still bills until someone destroys it
        final = job.wait(120)
        assert final.state is JobState.FAILED, final.error
        wait_for(lambda: orch.reap_list() == [], 60, what="an empty reap list")
    assert _billing(vast) == 0


def test_the_provisioning_deadline_destroys_the_instance(vast: VastFake, tmp_path: Path) -> None:
    vast.provision_s = 3600.0  # never leaves "null" (as a host that never pulls the image)
    with orchestrator(tmp_path, providers=PROVIDERS,
                      provider_config={"vast": {**CONFIG, "provision_timeout_s": 2}}) as orch:
        final = orch.submit({"name": "va-slow", "provider": "vast", "command": ["true"],
                             "resources": {"gpu": "RTX 4090"}}).wait(120)
        assert final.state is JobState.FAILED
        assert "not ready within" in (final.error or ""), final.error
    assert _billing(vast) == 0


KILLED_KERNEL = textwrap.dedent("""
    import json, sys, time
    from trainorch_jupyter.orchestrator import Orchestrator, settings
    from trainorch_jupyter.providers.vast import VastProvider
    settings.RUNNER_RETENTION_S = float(sys.argv[2])
    orch = Orchestrator(sys.argv[1], providers={"vast": VastProvider}, provider_config={"vast": json.loads(sys.argv[3])})
    job = orch.submit({"name": "va-killed", "provider": "vast", "resources": {"gpu": "RTX 4090"},
                       "command": ["python3", "-c", "import time; print('up', flush=True); time.sleep(1)"]})
    print(job.id, flush=True)
    time.sleep(600)
""")


def test_a_killed_kernels_instance_destroys_itself(vast: VastFake, tmp_path: Path) -> None:
    """No kernel ever comes back: the runner's retention runs out after the command ends, and its dead-man hook
    destroys the instance with the instance's own key (CONTAINER_API_KEY)."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_KERNEL, str(tmp_path), "1", json.dumps(CONFIG)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert proc.stdout is not None
        job_id = proc.stdout.readline().strip()
        assert job_id, "the kernel did not submit"
        store = Store(tmp_path)
        wait_for(lambda: store.get(job_id).state is JobState.RUNNING, 120, what="the job to run")
        store.close()
    finally:
        proc.send_signal(signal.SIGKILL)  # the kernel dies mid-job
        proc.wait(10)
    assert _billing(vast) == 1
    wait_for(lambda: _billing(vast) == 0, 120, what="the instance to destroy itself")
    assert [m["gone_reason"] for m in vast.state()["machines"]] == ["destroyed by its own key (CONTAINER_API_KEY)"]


def _vast_registered() -> bool:
    from trainorch_jupyter.providers import provider_names

    return "vast" in provider_names()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _vast_registered(), reason="the vast entry point is not installed (pyproject + reinstall)")
def test_train_magic_on_vast_in_a_real_kernel(vast: VastFake, tmp_path: Path) -> None:
    """The issue's end to end: %train submit --provider vast --model tiny in a real kernel -> an offer rented ->
    stage-0 as onstart -> bootstrap (this package as a wheel, pip output in the log) -> live logs and metrics ->
    verified adapter -> instance destroyed, 0 billing; the provider paced to Vast's own spacing (as configured by
    default), the fake counting no refusal."""
    from .nbrun import errors_of, run_cells, text_of

    data = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "train.jsonl"
    cells = [
        "%load_ext trainorch_jupyter",
        f"job = %train submit --provider vast --gpu 'RTX 4090' --name va-e2e --model tiny --data {data} "
        "--steps 20 --batch-size 16 --lr 3e-3 --log-every 5\njob",
        "final = job.wait(600)\nprint('STATE', final.state.value, final.error)",
        "print('FILES', sorted(a.name for a in final.artifacts))\nprint('COST', final.cost_so_far)",
        "%train status",
    ]
    out = run_cells(cells, tmp_path, timeout=700, env={"VAST_API_KEY": CANARY, "TRAINORCH_VAST_URL": vast.base_url})
    for cell in out:
        assert not errors_of(cell), text_of(cell)
        assert CANARY not in json.dumps(cell), "the API key reached a notebook output"
    assert "STATE COMPLETED" in text_of(out[2]), text_of(out[2])
    assert "adapter_model.safetensors" in text_of(out[3])
    (job,) = Store(tmp_path).list_jobs()
    log = (tmp_path / ".trainorch" / "logs" / f"{job.id}.log").read_text()
    assert "[trainorch] pip install" in log and "Requirement already satisfied" in log
    metrics = Store(tmp_path).metrics(job.id)
    assert [m["step"] for m in metrics if m.get("kind", "train") == "train"][-1] == 20
    for art in job.artifacts:
        assert hashlib.sha256(art.path.read_bytes()).hexdigest() == art.hash_sha256
    assert _billing(vast) == 0
    _no_canary_under(tmp_path)
