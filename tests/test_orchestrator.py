"""The orchestrator end to end with the real runner subprocess on loopback (local provider)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from trainorch_jupyter.model import JobState, SpecError
from trainorch_jupyter.orchestrator import Event, Orchestrator
from trainorch_jupyter.providers import MachineHandle
from trainorch_jupyter.providers.local import LocalProvider
from trainorch_jupyter.store import Store

from .helpers import CuttingProxy, orchestrator, pid_alive, py_command, runner_pid, wait_for

LINES_AND_FILES = r"""
import os, sys
out = os.environ["TRAINORCH_OUTPUT_DIR"]
for i in range(20000):
    print(f"line {i:05d} " + "x" * 40)
    if i % 5000 == 0:
        print(f'TRAINORCH_METRIC {{"step": {i}, "total_steps": 20000, "loss": {1.0 / (i + 1)}}}')
os.makedirs(out + "/sub", exist_ok=True)
open(out + "/adapter.bin", "wb").write(bytes(range(256)) * 4096)
open(out + "/sub/notes.txt", "w").write("done\n")
sys.stdout.flush()  # stdout and stderr share the runner's pipe: this fixes their order
print("stderr line", file=sys.stderr)
"""


def _lines_and_files_output() -> bytes:
    """Every byte LINES_AND_FILES writes (stdout and stderr, in order): the whole log, metric lines included."""
    out = []
    for i in range(20000):
        out.append(f"line {i:05d} " + "x" * 40 + "\n")
        if i % 5000 == 0:
            out.append(f'TRAINORCH_METRIC {{"step": {i}, "total_steps": 20000, "loss": {1.0 / (i + 1)}}}\n')
    out.append("stderr line\n")
    return "".join(out).encode()


def _numbered(n: int) -> bytes:
    return "".join(f"line {i:05d}\n" for i in range(n)).encode()


def _assert_log(job: Any, expected: bytes) -> None:
    """The job's whole log, byte for byte, as the store keeps it and as ``logs()`` gives it."""
    data = job.log_path.read_bytes()
    if data != expected:  # say where, not 1 MB of diff
        at = next((i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b), min(len(data), len(expected)))
        raise AssertionError(f"log differs at byte {at} of {len(expected)} (got {len(data)} bytes): "
                             f"got {data[max(0, at - 60):at + 60]!r}, expected {expected[max(0, at - 60):at + 60]!r}")
    assert job.logs() == expected.decode()


def test_twenty_thousand_lines_and_verified_files(tmp_path: Path) -> None:
    events: list[Event] = []
    with orchestrator(tmp_path) as orch:
        orch.subscribe(events.append)
        t0 = time.monotonic()
        job = orch.submit({"name": "lines", "command": py_command(LINES_AND_FILES)})
        assert time.monotonic() - t0 < 5  # returns a handle at once (generous bound)
        final = job.wait(timeout=120)
        assert final.state is JobState.COMPLETED, final.error
        expected = _lines_and_files_output()
        _assert_log(job, expected)  # metric lines stay in the log; none lost, none doubled
        assert [m["step"] for m in job.metrics()] == [0, 5000, 10000, 15000]
        # Log events carry every byte once, in order.
        streamed = "".join(e.data for e in events if e.kind == "log")
        assert streamed == expected.decode()
        states = [e.data.state for e in events if e.kind == "state"]
        assert states == [JobState.PROVISIONING, JobState.RUNNING, JobState.DOWNLOADING, JobState.COMPLETED]
        # Artifacts: in artifacts/<job_id>/, hashes equal what was written.
        dest = tmp_path / "artifacts" / job.id
        names = sorted(a.name for a in final.artifacts)
        assert names == ["adapter.bin", "sub/notes.txt"]
        for a in final.artifacts:
            assert a.path == dest / a.name
            assert hashlib.sha256(a.path.read_bytes()).hexdigest() == a.hash_sha256
            assert a.size_bytes == a.path.stat().st_size
        assert (dest / "adapter.bin").read_bytes() == bytes(range(256)) * 4096
        meta = json.loads((dest / "trainorch-artifact.json").read_text())
        assert meta["metadata"]["provider"] == "local" and len(meta["files"]) == 2
        # The machine is gone.
        assert not pid_alive(runner_pid(final))


def test_failing_command(tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        code = "import sys\nfor i in range(30): print('step', i)\nprint('RuntimeError: it broke', flush=True)\nsys.exit(3)"
        final = orch.submit({"name": "fails", "command": py_command(code)}).wait(60)
        assert final.state is JobState.FAILED
        assert final.exit_code == 3
        assert "exited with code 3" in (final.error or "")
        assert "RuntimeError: it broke" in (final.error or "")  # the last lines are in the error
        assert final.artifacts == []
        assert final.diagnosis is not None and final.diagnosis["suggestions"]
        assert not pid_alive(runner_pid(final))


def test_a_missing_module_is_diagnosed(tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        final = orch.submit({"name": "nomod", "command": py_command("import totally_missing_module_xyz")}).wait(60)
    assert final.state is JobState.FAILED and final.exit_code == 1
    assert final.diagnosis is not None
    assert final.diagnosis["cause"] == "missing_module"
    assert "totally_missing_module_xyz" in final.diagnosis["summary"] + final.diagnosis["evidence"]


def test_cancel_sleeping_job_leaves_no_process(tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "sleeper", "command": py_command("import time\nprint('sleeping', flush=True)\ntime.sleep(600)")})
        deadline = time.monotonic() + 30
        while "sleeping" not in job.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.status is JobState.RUNNING
        status = json.loads((tmp_path / ".trainorch" / "machines" / job.id / "status.json").read_text())
        command_pid = int(status["pid"])
        assert pid_alive(command_pid)
        t0 = time.monotonic()
        job.cancel()
        final = job.wait(timeout=30)
        assert final.state is JobState.CANCELLED
        assert time.monotonic() - t0 < 25  # within the 10 s grace period plus slack
        assert not pid_alive(command_pid)
        assert not pid_alive(runner_pid(final))


def test_cancel_from_a_second_orchestrator(tmp_path: Path) -> None:
    """Two kernels on one workspace: one follows the job, the other cancels it through the runner."""
    with orchestrator(tmp_path) as first:
        job = first.submit({"name": "shared", "command": py_command("import time\nprint('up', flush=True)\ntime.sleep(600)")})
        while job.status is not JobState.RUNNING:
            time.sleep(0.1)
        with orchestrator(tmp_path) as second:
            assert second.reattach() == []  # the first one holds the job
            second.cancel(job.id)
            assert second.wait(job.id, timeout=30).state is JobState.CANCELLED
        assert job.wait(5).state is JobState.CANCELLED


def test_max_runtime_is_enforced(tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        final = orch.submit({"name": "slow", "max_runtime": 2, "command": py_command("import time\ntime.sleep(600)")}).wait(60)
        assert final.state is JobState.FAILED
        assert "max runtime" in (final.error or "")
        assert final.diagnosis is not None


def test_inputs_are_uploaded_and_hash_checked(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_bytes(b"a,b\n" + b"1,2\n" * 10000)
    code = "import os, shutil\nshutil.copy(os.environ['TRAINORCH_INPUT_DIR'] + '/data.csv', os.environ['TRAINORCH_OUTPUT_DIR'] + '/copy.csv')"
    with orchestrator(tmp_path) as orch:
        final = orch.submit({"name": "inputs", "inputs": [str(data)], "command": py_command(code)}).wait(60)
    assert final.state is JobState.COMPLETED, final.error
    (art,) = final.artifacts
    assert art.hash_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()


def test_bad_spec_writes_nothing(tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        for bad, field_name in [
            ({"name": "Bad Name", "command": ["true"]}, "name"),
            ({"name": "x", "provider": "moon", "command": ["true"]}, "provider"),
            ({"name": "x", "command": ["true"], "inputs": [str(tmp_path / "missing")]}, "inputs[0]"),
            ({"name": "x", "command": ["true"], "resources": {"max_price_per_hour": 2.0}}, "resources.max_price_per_hour"),
            ({"name": "x", "command": ["true"], "resources": {"gpu": "A100 80GB"}}, "resources.gpu"),
        ]:
            with pytest.raises(SpecError) as info:
                orch.submit(bad)
            assert info.value.field == field_name
        assert orch.jobs() == []
        assert not (tmp_path / ".trainorch" / "machines").exists()


def test_provider_keys_never_reach_the_job_or_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "rpa_SECRET_" + "7" * 20
    monkeypatch.setenv("RUNPOD_API_KEY", secret)
    code = "import os\nprint(sorted(os.environ))\nprint(os.environ.get('RUNPOD_API_KEY', 'absent'))"
    with orchestrator(tmp_path) as orch:
        final = orch.submit({"name": "env", "command": py_command(code), "env": {"MY_VAR": "1"}}).wait(60)
        assert final.state is JobState.COMPLETED
        assert "absent" in orch.logs(final.id)
    for path in (tmp_path / ".trainorch").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


class ProxiedLocal(LocalProvider):
    """The local provider, reached through a proxy that the test cuts now and then."""

    proxy: CuttingProxy

    async def launch(self, job: Any, bootstrap: Any) -> MachineHandle:
        handle = await super().launch(job, bootstrap)
        handle.runner_url = self.proxy.proxied(str(handle.runner_url))
        return handle


def test_connection_cut_mid_stream_loses_and_doubles_nothing(tmp_path: Path) -> None:
    proxy = CuttingProxy()
    ProxiedLocal.proxy = proxy
    code = (
        "import os, time\n"
        "for i in range(20000):\n"
        "    print(f'line {i:05d}')\n"
        "    if i % 2000 == 0: time.sleep(0.2)\n"
        "open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/big.bin', 'wb').write(os.urandom(8 << 20))\n"
    )
    stop = threading.Event()

    def cutter() -> None:
        while not stop.wait(0.15):
            proxy.cut()

    try:
        with orchestrator(tmp_path, providers={"local": ProxiedLocal}) as orch:
            job = orch.submit({"name": "cut", "command": py_command(code)})
            thread = threading.Thread(target=cutter, daemon=True)
            thread.start()
            final = job.wait(180)
            stop.set()
            assert final.state is JobState.COMPLETED, final.error
            _assert_log(job, _numbered(20000))
            (art,) = final.artifacts
            assert hashlib.sha256(art.path.read_bytes()).hexdigest() == art.hash_sha256
            assert proxy.cuts > 5 and proxy.accepted > 5
    finally:
        stop.set()
        proxy.close()


def test_restart_reattaches_and_loses_no_line(tmp_path: Path) -> None:
    code = (
        "import os, time\n"
        "for i in range(120):\n"
        "    print(f'line {i:05d}', flush=True)\n"
        "    time.sleep(0.03)\n"
        "open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/result.txt', 'w').write('ok')\n"
    )
    first = Orchestrator(tmp_path)
    job = first.submit({"name": "restart", "command": py_command(code)})
    deadline = time.monotonic() + 30
    while job.logs().count("\n") < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.close()  # the kernel goes away mid-run; the runner goes on
    store = Store(tmp_path)
    assert store.get(job.id).state is JobState.RUNNING
    with orchestrator(tmp_path) as second:
        assert job.id in [j.id for j in second.jobs()]
        final = second.wait(job.id, timeout=60)
        assert final.state is JobState.COMPLETED, final.error
        _assert_log(second.job(job.id), _numbered(120))
        assert [a.name for a in final.artifacts] == ["result.txt"]


def test_download_on_demand_after_the_machine_is_gone(tmp_path: Path) -> None:
    code = "import os\nopen(os.environ['TRAINORCH_OUTPUT_DIR'] + '/w.bin', 'wb').write(b'w' * 100000)"
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "later", "auto_download": False, "command": py_command(code)})
        final = job.wait(60)
        assert final.state is JobState.COMPLETED and final.artifacts == []
        infos = job.download().result(60)  # starts a runner on the finished job's dir again
        assert [i.name for i in infos] == ["w.bin"]
        assert infos[0].path == tmp_path / "artifacts" / job.id / "w.bin"
        other = job.download(tmp_path / "elsewhere").result(60)
        assert other[0].path == tmp_path / "elsewhere" / "w.bin"
        assert other[0].hash_sha256 == infos[0].hash_sha256
        # Corrupt the local copy: the next download notices and fetches it again.
        infos[0].path.write_bytes(b"x" * 100000)
        again = job.download().result(60)
        assert again[0].path.read_bytes() == b"w" * 100000


@pytest.mark.slow
def test_seed_api_works_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed document's usage example, as written there, on a real (short) LoRA run."""
    import asyncio

    from trainorch_jupyter import TrainingConfig, TrainingState, get_training_orchestrator
    from trainorch_jupyter.orchestrator import reset_orchestrator

    data = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "train.jsonl"
    monkeypatch.setenv("TRAINORCH_WORKSPACE", str(tmp_path))
    reset_orchestrator()
    try:
        orchestrator_ = get_training_orchestrator()
        config = TrainingConfig(job_id="my_training_job", model_name="tiny", dataset_path=str(data),
                                output_dir=str(tmp_path / "output"), options={"steps": 6, "batch_size": 8})
        orchestrator_.create_job(config)
        assert orchestrator_.get_status("my_training_job").state == TrainingState.PENDING
        orchestrator_.start_training("my_training_job", provider="local")
        status = orchestrator_.wait("my_training_job", timeout=300)
        assert status.state == TrainingState.COMPLETED, status.error
        assert status.orchestrator_job_id and status.orchestrator_job_id.startswith("my-training-job-")
        artifact = asyncio.run(orchestrator_.download_artifact("my_training_job"))
        assert artifact.path.name == "adapter_model.safetensors"
        assert artifact.hash_sha256 == hashlib.sha256(artifact.path.read_bytes()).hexdigest()
        assert (tmp_path / "output" / "adapter_model.safetensors").read_bytes() == artifact.path.read_bytes()
        with pytest.raises(SpecError, match="job_id"):
            orchestrator_.start_training("my_training_job")  # already started
        orchestrator_.stop_training("my_training_job")  # finished: a no-op, not an error
    finally:
        reset_orchestrator()


def test_on_done_callbacks_and_webhook(tmp_path: Path) -> None:
    import http.server

    posts: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    done: list[JobState] = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        with orchestrator(tmp_path, webhook_url=url) as orch:
            job = orch.submit({"name": "hooked", "command": py_command("print('hi')")})
            job.on_done(lambda j: done.append(j.state))
            final = job.wait(60)
            job.on_done(lambda j: done.append(j.state))  # already finished: called at once
            deadline = time.monotonic() + 10
            while (len(done) < 2 or not posts) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        server.shutdown()
    assert final.state is JobState.COMPLETED
    assert done == [JobState.COMPLETED, JobState.COMPLETED]
    assert len(posts) == 1 and posts[0]["state"] == "COMPLETED" and posts[0]["job_id"] == final.id
    assert final.id in posts[0]["text"] and "COMPLETED" in posts[0]["text"]


def test_cancel_while_downloading_stops_the_download_and_the_machine(tmp_path: Path) -> None:
    proxy = CuttingProxy()
    ProxiedLocal.proxy = proxy
    code = "import os\nopen(os.environ['TRAINORCH_OUTPUT_DIR'] + '/big.bin', 'wb').write(os.urandom(64 << 20))"
    try:
        with orchestrator(tmp_path, providers={"local": ProxiedLocal}) as orch:
            job = orch.submit({"name": "dlcancel", "command": py_command(code)})
            wait_for(lambda: job.status is JobState.DOWNLOADING, timeout=60, interval=0.01, what="DOWNLOADING")
            proxy.delay = 0.02  # about 3 MB/s: the download would take some 20 s
            time.sleep(0.5)
            job.cancel()
            final = job.wait(20)
            assert final.state is JobState.CANCELLED
            assert final.artifacts == []
            dest = tmp_path / "artifacts" / job.id
            assert not (dest / "big.bin").exists()
            assert not list(dest.glob(".*.part"))
            assert not pid_alive(runner_pid(final))
    finally:
        proxy.close()


def test_download_of_a_running_job_waits_for_its_end(tmp_path: Path) -> None:
    code = "import os, time\ntime.sleep(1.5)\nopen(os.environ['TRAINORCH_OUTPUT_DIR'] + '/late.txt', 'w').write('late')"
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "early", "command": py_command(code)})
        infos = job.download().result(60)
        assert job.status is JobState.COMPLETED
        assert [(i.name, i.path.read_text()) for i in infos] == [("late.txt", "late")]


def test_orchestrator_enforces_its_own_deadline_when_the_runner_does_not(tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        # The runner's limit is 60 s; the orchestrator's own deadline (max runtime + slack) comes first here.
        orch.runtime_slack_s = -54.0
        t0 = time.monotonic()
        job = orch.submit({"name": "hung", "max_runtime": 60, "command": py_command(
            "import time\nprint('up', flush=True)\ntime.sleep(600)")})
        final = job.wait(60)
        took = time.monotonic() - t0
    assert final.state is JobState.FAILED
    assert "stopped by the orchestrator" in (final.error or "")
    assert final.diagnosis is not None and final.diagnosis["cause"] == "max_runtime_exceeded"
    assert took < 40
    assert not pid_alive(runner_pid(final))


def test_a_machine_that_disappears_fails_the_job_quickly(tmp_path: Path) -> None:
    import os
    import signal

    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "vanish", "command": py_command("import time\nprint('up', flush=True)\ntime.sleep(600)")})
        wait_for(lambda: job.status is JobState.RUNNING and "up" in job.logs(), timeout=30)
        status = json.loads((tmp_path / ".trainorch" / "machines" / job.id / "status.json").read_text())
        os.kill(runner_pid(job.record), signal.SIGKILL)  # the machine dies without a word
        t0 = time.monotonic()
        final = job.wait(60)
        took = time.monotonic() - t0
    assert final.state is JobState.FAILED
    assert "gone" in (final.error or "")
    assert took < 30  # not the 180 s unreachable timeout
    assert not pid_alive(int(status["pid"]))  # the orphaned command was stopped too
