"""Provider API keys from the environment or the system keyring, shown only redacted; ``%train keys`` and
``%train cleanup`` in the magics. The keyring is an in-memory backend set by each test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.error import UsageError

from trainorch_jupyter import keys
from trainorch_jupyter.keys import KEYRING_SERVICE, get_key, key_source, key_status, redact

keyring = pytest.importorskip("keyring")
from keyring.backend import KeyringBackend  # noqa: E402
from keyring.errors import PasswordDeleteError  # noqa: E402

CANARY = "rpa_CANARY0123456789abcdef9f3c"  # 30 chars


class MemoryKeyring(KeyringBackend):
    """A keyring backend that keeps passwords in a dict (for tests)."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.store.pop((service, username), None) is None:
            raise PasswordDeleteError(username)


class BrokenKeyring(MemoryKeyring):
    def get_password(self, service: str, username: str) -> str | None:
        raise RuntimeError(f"the secret store is locked ({CANARY})")


@pytest.fixture
def kr(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryKeyring]:
    for var in keys.KEY_ENV.values():
        monkeypatch.delenv(var, raising=False)
    old = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    try:
        yield backend
    finally:
        keyring.set_keyring(old)


def test_the_environment_wins_and_the_keyring_is_the_fallback(kr: MemoryKeyring,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_key("runpod") is None and key_source("runpod") == (None, "missing")
    kr.set_password(KEYRING_SERVICE, "runpod", "  from-the-keyring-0123456789  ")
    assert key_source("runpod") == ("from-the-keyring-0123456789", "keyring")
    monkeypatch.setenv("RUNPOD_API_KEY", "from-the-env-0123456789")
    assert key_source("runpod") == ("from-the-env-0123456789", "env")
    monkeypatch.setenv("RUNPOD_API_KEY", "   ")  # blank is unset
    assert key_source("runpod")[1] == "keyring"
    assert get_key("vast", environ={"VAST_API_KEY": "v" * 30}) == "v" * 30
    assert get_key("lambda") is None
    keys.set_key("lambda", "lambda-key-0123456789xyz")
    assert kr.store[(KEYRING_SERVICE, "lambda")] == "lambda-key-0123456789xyz" and get_key("lambda")
    assert keys.delete_key("lambda") and not keys.delete_key("lambda") and get_key("lambda") is None


def test_status_is_redacted(kr: MemoryKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", CANARY)
    kr.set_password(KEYRING_SERVICE, "vast", "short-key")
    rows = {s.provider: s for s in key_status()}
    assert (rows["runpod"].source, rows["runpod"].redacted, rows["runpod"].env_var) == ("env", "rpa_…9f3c",
                                                                                       "RUNPOD_API_KEY")
    assert (rows["vast"].source, rows["vast"].redacted) == ("keyring", "set (9 chars)")
    assert (rows["lambda"].source, rows["lambda"].redacted) == ("missing", "-")
    assert CANARY not in repr(rows) and CANARY not in str([s.as_row() for s in rows.values()])
    assert redact("x" * 40) == "…xxxx" and redact("") == "-"


def test_a_broken_or_missing_keyring_is_no_key_not_an_error(kr: MemoryKeyring, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    keyring.set_keyring(BrokenKeyring())
    assert key_source("runpod") == (None, "missing")
    assert CANARY not in caplog.text  # the backend's message is not logged
    monkeypatch.setitem(sys.modules, "keyring", None)  # not installed: the environment only
    assert get_key("runpod") is None
    monkeypatch.setenv("RUNPOD_API_KEY", CANARY)
    assert key_source("runpod") == (CANARY, "env")
    with pytest.raises(RuntimeError, match="pip install 'trainorch-jupyter\\[keyring\\]'"):
        keys.set_key("runpod", "x")


# --------------------------------------------------------------------------------------------
# %train keys, %train cleanup
# --------------------------------------------------------------------------------------------


def magics() -> Any:
    from trainorch_jupyter.magics import TrainMagics

    return TrainMagics(shell=None)


def test_train_keys_prints_the_table_without_the_key(kr: MemoryKeyring, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", CANARY)
    kr.set_password(KEYRING_SERVICE, "lambda", "lambda_secret_value_0123456789")
    magics().train("keys")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["PROVIDER", "VARIABLE", "SOURCE", "KEY"]
    assert lines[1].split() == ["runpod", "RUNPOD_API_KEY", "env", "rpa_…9f3c"]
    assert lines[2].split() == ["lambda", "LAMBDA_API_KEY", "keyring", "lambda_…6789"]
    assert lines[3].split() == ["vast", "VAST_API_KEY", "missing", "-"]
    assert CANARY not in out and "lambda_secret_value_0123456789" not in out
    assert "keyring set trainorch-jupyter" in out  # how to add the missing one


class StubOrchestrator:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.calls: list[bool] = []

    def cleanup(self, yes: bool) -> list[dict[str, Any]]:
        self.calls.append(yes)
        return [{**r, "destroyed": yes} for r in self.rows]


def test_train_cleanup_lists_and_destroys_only_with_yes(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import trainorch_jupyter.magics as m

    rows = [{"provider": "runpod", "machine_id": "pod1", "name": "trainorch-ws1-job-a", "job_id": "job-a",
             "$/h": 0.69, "state": "RUNNING"},
            {"provider": "runpod", "machine_id": "pod2", "name": "trainorch-ws1-job-b", "job_id": "job-b",
             "$/h": 1.38, "state": "EXITED"}]
    stub = StubOrchestrator(rows)
    monkeypatch.setattr(m, "get_orchestrator", lambda: stub)
    magics().train("cleanup")
    out = capsys.readouterr().out
    assert stub.calls == [False]
    assert out.splitlines()[0].split() == ["PROVIDER", "MACHINE", "NAME", "JOB", "$/H", "STATE", "DESTROYED"]
    assert "pod1" in out and "$0.69" in out and "$1.38" in out and "nothing was destroyed" in out
    assert "$2.07/h in all" in out and "%train cleanup --yes" in out

    magics().train("cleanup --yes")
    out = capsys.readouterr().out
    assert stub.calls == [False, True] and "2 machine(s) destroyed" in out

    stub.rows = []
    magics().train("cleanup -y")
    assert "no machine made by trainorch" in capsys.readouterr().out

    assert "%train keys" in m._overview() and "%train cleanup" in m._overview()
    monkeypatch.setattr(m, "get_orchestrator", lambda: object())
    with pytest.raises(UsageError, match="cannot list cloud machines"):
        magics().train("cleanup")


def test_a_keyed_client_is_made_again_only_when_the_key_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainorch_jupyter.keys import KeyedClient

    made: list[str] = []
    clients = KeyedClient("runpod", lambda key: made.append(key) or f"client-{len(made)}",
                          lambda: RuntimeError("no key"), recheck_s=0.0)
    monkeypatch.setenv("RUNPOD_API_KEY", "key-one-0123456789")
    assert clients.get() == clients.get() == "client-1"  # the same key: the same client
    monkeypatch.setenv("RUNPOD_API_KEY", "key-two-0123456789")
    assert clients.get() == "client-2" and made == ["key-one-0123456789", "key-two-0123456789"]
    monkeypatch.delenv("RUNPOD_API_KEY")
    monkeypatch.setattr("trainorch_jupyter.keys._from_keyring", lambda provider: None)
    with pytest.raises(RuntimeError, match="no key"):
        clients.get()
