"""Every tunable number of the orchestrator, in one place.

Code reads these at call time as ``settings.NAME`` (never ``from .settings import NAME``), so a test or an
embedding program can change one with ``monkeypatch.setattr(trainorch_jupyter.orchestrator.settings, NAME, v)``
and every stage sees it. ``UNREACHABLE_TIMEOUT_S`` and ``RUNTIME_SLACK_S`` are copied into each orchestrator
when it is made (``Orchestrator.unreachable_timeout_s`` / ``.runtime_slack_s``), so they can be set per instance.
"""

from __future__ import annotations

#: How long a job's lease lasts without a renewal (another orchestrator may take the job over after that).
LEASE_S = 30.0
#: How often the leases are renewed.
RENEW_S = LEASE_S / 3
#: How often the store is read for cancel requests (any process may make one).
CANCEL_POLL_S = 1.0
#: How often the reap list is looked at, and the longest wait between two tries on one machine.
REAP_POLL_S = 5.0
REAP_MAX_BACKOFF_S = 300.0
#: The longest wait between two tries of a job's driver to terminate its machine.
TERMINATE_RETRY_S = 30.0
#: How long a job's driver tries to terminate its machine before it hands it to the reaper (which never
#: gives up: the machine stays on the persisted reap list until its provider confirms it gone).
TERMINATE_GIVE_UP_S = 120.0
#: How long a failing store write (a locked or full disk) is retried before the job gives up on it.
STORE_RETRY_S = 30.0
#: How long provider API errors that may pass (429, 5xx, network) are ridden out while polling a machine.
POLL_RETRY_S = 120.0
#: How long the runner may stay unreachable (network blips, a proxy cutting requests) before a job fails.
UNREACHABLE_TIMEOUT_S = 180.0
#: How often (at most) a job's provider is asked whether its machine still exists while the runner is unreachable.
MACHINE_CHECK_S = 5.0
#: The shortest a runner call may be given before it counts as unanswered: longer than a long poll (the runner
#: holds one up to 25 s; the client waits 15 s more), so a healthy but quiet runner is never cut short.
MIN_CALL_S = 45.0
#: The orchestrator ends a job this long past its max runtime if the runner has not (it should, first).
RUNTIME_SLACK_S = 120.0
#: The runner's life (its dead-man switch): it exits when nobody asked it to start a command within
#: RUNNER_IDLE_S, and RUNNER_RETENTION_S after the last request once the command has exited.
RUNNER_IDLE_S = 900.0
RUNNER_RETENTION_S = 1800.0

#: ``--provider auto``: the whole provisioning (every offer tried) must end within this.
AUTO_PROVISION_S = 30 * 60.0
