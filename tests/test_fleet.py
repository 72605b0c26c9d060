"""50 jobs submitted at once against the three fake clouds (run as their own processes, with the providers' real
rate limits): all complete, the fakes count no rate-limit violation, and nothing is left billing. The same run is
``make bench``'s fleet benchmark, which also reports the orchestrator's CPU."""

from __future__ import annotations

import pytest

from benchmarks import bench_fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_fifty_jobs_at_once_are_paced_to_every_providers_limits() -> None:
    result = bench_fleet.run()
    assert result["states"] == {"COMPLETED": 50}, result
    assert result["rate_limit_violations"] == {"runpod": 0, "vast": 0, "lambda": 0}, result
    assert result["machines_billing_after"] == {"runpod": 0, "vast": 0, "lambda": 0}, result
