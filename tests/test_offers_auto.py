"""One offers table across cloud providers, ``--provider auto`` with its failover, and ``cleanup``; through the
fake providers (real HTTP, real stage-0 and runner in the fake machines)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainorch_jupyter.fakes import RunPodFake
from trainorch_jupyter.model import JobState, Resources, SpecError
from trainorch_jupyter.orchestrator.offers import fits
from trainorch_jupyter.providers import Offer

from .helpers import orchestrator
from .nbrun import errors_of, run_cells, text_of
from .test_runpod_e2e import CANARY, runpod, validator  # noqa: F401  (fixtures)

PRINT = ["python3", "-c", "import os; open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/x.txt', 'w').write('x')"]


def test_offers_fit_in_one_vocabulary() -> None:
    offer = Offer(provider="p", gpu="A100-80GB", gpu_count=2, price_per_hour=3.0, vram_gb=80)
    assert fits(offer, Resources(gpu="A100 80GB", gpu_count=2))
    assert fits(offer, Resources(gpu="a100", gpu_count=1))  # A100 asks for either size
    assert not fits(offer, Resources(gpu="A100-40GB"))
    assert not fits(offer, Resources(gpu="H100"))
    assert not fits(offer, Resources(gpu_count=4))
    assert not fits(offer, Resources(max_price_per_hour=2.5))
    assert fits(offer, Resources(), min_vram_gb=80) and not fits(offer, Resources(), min_vram_gb=96)


def test_the_offers_table_comes_from_the_providers_catalogs(runpod: RunPodFake, tmp_path) -> None:  # noqa: F811
    with orchestrator(tmp_path) as orch:
        table = orch.offers({"gpu_count": 1})
        gpus = [(o.gpu, o.provider) for o in table.offers]
        assert ("RTX4090", "runpod") in gpus and ("A100-80GB", "runpod") in gpus and ("H100", "runpod") in gpus
        prices = [o.price_per_hour for o in table.offers if o.available]
        assert prices == sorted(prices)
        assert all(o.provider_gpu for o in table.offers)  # the provider's own name is kept
        only = orch.offers({"gpu": "RTX 4090", "max_price_per_hour": 0.5})
        assert only.offers and {o.gpu for o in only.offers} == {"RTX4090"}
        assert all(o.price_per_hour <= 0.5 for o in only.offers)
        assert "RTX4090" in str(only) and "<table" in only._repr_html_()
        assert orch.offers({"gpu": "RTX 4090"}, min_vram_gb=40).offers == []
        with pytest.raises(SpecError, match="provider"):
            orch.offers({}, providers=["nope"])
    assert runpod.state()["machines_billing"] == 0


def test_a_provider_without_a_key_is_named_not_fatal(runpod: RunPodFake, tmp_path, monkeypatch) -> None:  # noqa: F811
    monkeypatch.delenv("RUNPOD_API_KEY")
    with orchestrator(tmp_path) as orch:
        table = orch.offers({})
        assert table.offers == [] and "RUNPOD_API_KEY" in table.errors["runpod"]
        assert "runpod: not asked" in str(table)
        with pytest.raises(SpecError, match="auto"):
            orch.submit({"name": "nokey", "provider": "auto", "command": ["true"]})


def test_auto_takes_the_cheapest_offer_and_falls_over_on_capacity(runpod: RunPodFake, tmp_path) -> None:  # noqa: F811
    runpod.inject(capacity_errors=1)  # the cheapest offer answers "no longer any instances available"
    with orchestrator(tmp_path) as orch:
        cheapest = [o for o in orch.offers({}).offers if o.available]
        job = orch.submit({"name": "auto", "provider": "auto", "command": PRINT})
        final = job.wait(240)
        assert final.state is JobState.COMPLETED, (final.error, final.attempts)
        first, second = final.attempts
        assert (first["gpu"], first["price_per_hour"]) == (cheapest[0].gpu, cheapest[0].price_per_hour)
        assert first["error"] and "free" in first["error"]
        assert (second["gpu"], second["price_per_hour"]) == (cheapest[1].gpu, cheapest[1].price_per_hour)
        assert second["error"] is None
        assert final.provider == "runpod" and final.spec.provider == "auto"
        assert [a.name for a in final.artifacts] == ["x.txt"]
        assert orch.reap_list() == []
    assert runpod.state()["machines_billing"] == 0


def test_auto_with_a_price_cap_nothing_fits(runpod: RunPodFake, tmp_path) -> None:  # noqa: F811
    with orchestrator(tmp_path) as orch:
        final = orch.submit({"name": "cheap", "provider": "auto", "command": ["true"],
                             "resources": {"gpu": "H100", "max_price_per_hour": 0.10}}).wait(60)
        assert final.state is JobState.FAILED and "no cloud offer fits" in (final.error or "")
    assert runpod.state()["machines_billing"] == 0
    assert not [r for r in runpod.state()["requests"] if r["method"] == "POST"]  # nothing was created


def test_cleanup_lists_and_destroys_only_orphans_of_this_workspace(runpod: RunPodFake, tmp_path) -> None:  # noqa: F811
    with orchestrator(tmp_path) as orch:
        headers = {"Authorization": f"Bearer {CANARY}"}
        body = {"image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404", "gpu": {"id": "NVIDIA RTX A6000", "count": 1},
                "args": "sleep 600"}
        with httpx.Client(base_url=runpod.base_url, headers=headers) as c:
            ours = c.post("/v2/pods", json={**body, "name": f"trainorch-{orch.workspace_id}-lost-20261201-000000-abcdef"})
            other = c.post("/v2/pods", json={**body, "name": "trainorch-0ther0ws-job-20261201-000000-abcdef"})
            mine_not = c.post("/v2/pods", json={**body, "name": "my-own-notebook-pod"})
        assert ours.status_code == other.status_code == mine_not.status_code == 201
        rows = [r for r in orch.cleanup() if r["machine_id"]]  # (providers without a key are rows with an error)
        assert [(r["machine_id"], r["destroyed"]) for r in rows] == [(ours.json()["id"], False)]
        assert rows[0]["price_per_hour"] and rows[0]["job_id"] == "lost-20261201-000000-abcdef"
        assert runpod.state()["machines_billing"] == 3  # listing destroys nothing
        rows = [r for r in orch.cleanup(yes=True) if r["machine_id"]]
        assert [(r["machine_id"], r["destroyed"]) for r in rows] == [(ours.json()["id"], True)]
        assert set(runpod.pod_ids()) == {other.json()["id"], mine_not.json()["id"]}
        with httpx.Client(base_url=runpod.base_url, headers=headers) as c:
            for pod in (other, mine_not):
                assert c.delete(f"/v2/pods/{pod.json()['id']}").status_code in (200, 204)
    assert runpod.state()["machines_billing"] == 0


@pytest.mark.slow
def test_offers_and_cleanup_magics_in_a_real_kernel(runpod: RunPodFake, tmp_path) -> None:  # noqa: F811
    out = run_cells(["%load_ext trainorch_jupyter", "%train offers --gpu 'RTX 4090'", "%train offers --gpus 0",
                     "%train cleanup", "%train keys"], tmp_path, allow_errors=True,
                    env={"RUNPOD_API_KEY": CANARY, "TRAINORCH_RUNPOD_URL": runpod.base_url})
    assert not errors_of(out[1]) and "RTX4090" in text_of(out[1]) and "runpod" in text_of(out[1])
    assert "UsageError" in text_of(out[2]) and "--gpus" in text_of(out[2]) and "Traceback" not in text_of(out[2])
    assert "no machine made by trainorch" in text_of(out[3])
    assert "runpod" in text_of(out[4]) and CANARY not in text_of(out[4])


@pytest.fixture
def three_clouds(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[dict[str, Any]]:
    """The three fake clouds at once (fast boots; each fake counts rate-limit violations)."""
    from trainorch_jupyter.fakes import LambdaFake, VastFake
    from trainorch_jupyter.fakes.base import RateWindow

    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "PIP_NO_INDEX": "1"}
    key = "three-clouds-key-0123456789"
    fakes: dict[str, Any] = {
        "runpod": RunPodFake(api_keys={key}, provision_s=0.2, start_s=0.2, ports_delay_s=0.2, rate_limits=[],
                             extra_env=env, work_dir=tmp_path / "rp"),
        "vast": VastFake(api_keys={key}, provision_s=0.2, start_s=0.2, ports_delay_s=0.2, extra_env=env,
                         rate_limits={e: (RateWindow(e, 1, 0.1),) for e in VAST_ENDPOINTS}, work_dir=tmp_path / "va"),
        "lambda": LambdaFake(api_keys={key}, boot_s=0.0, request_rate=50.0, request_burst=10.0,
                             launch_interval_s=0.2, extra_env=env, work_dir=tmp_path / "la"),
    }
    for name, fake in fakes.items():
        fake.start()
        monkeypatch.setenv(f"{name.upper()}_API_KEY", key)
        monkeypatch.setenv(f"TRAINORCH_{name.upper()}_URL", fake.base_url)
    try:
        yield fakes
        for name, fake in fakes.items():
            assert fake.ledger.rate_limit_violations() == [], name
    finally:
        for fake in fakes.values():
            fake.stop()


VAST_ENDPOINTS = ("search", "create", "destroy", "show", "list", "manage", "user")
FAST_CONFIG = {
    "vast": {"min_intervals": {e: 0.2 for e in VAST_ENDPOINTS}, "poll_cache_s": 0.5, "api_backoff_s": 0.05},
    "lambda": {"request_interval_s": 0.02, "launch_interval_s": 0.2, "list_ttl_s": 0.2, "api_backoff_s": 0.05,
               "unhealthy_grace_s": 0.0, "ssh_timeout_s": 5.0},
}


def test_auto_across_three_clouds_falls_over_past_the_two_cheapest(three_clouds: dict[str, Any], tmp_path) -> None:
    with orchestrator(tmp_path, provider_config=FAST_CONFIG) as orch:
        table = orch.offers({"gpu": "A100"})
        assert {o.provider for o in table.offers} == {"runpod", "vast", "lambda"}, str(table)
        order = [(o.provider, o.price_per_hour) for o in table.offers if o.available]
        assert [p for p, _ in order[:4]] == ["vast", "vast", "runpod", "lambda"], order
        # The two cheapest (both Vast asks) and then RunPod answer "no capacity": the fourth offer is used.
        three_clouds["vast"].inject(capacity_errors=20)  # every Vast create (an attempt may try another ask)
        three_clouds["runpod"].inject(capacity_errors=1)
        final = orch.submit({"name": "auto3", "provider": "auto", "command": PRINT,
                             "resources": {"gpu": "A100"}}).wait(300)
        assert final.state is JobState.COMPLETED, (final.error, final.attempts)
        assert [(a["provider"], a["price_per_hour"]) for a in final.attempts] == order[:4], final.attempts
        assert [bool(a["error"]) for a in final.attempts] == [True, True, True, False]
        assert final.provider == "lambda" and [a.name for a in final.artifacts] == ["x.txt"]
        assert orch.reap_list() == []
    for name, fake in three_clouds.items():
        assert fake.state()["machines_billing"] == 0, name
