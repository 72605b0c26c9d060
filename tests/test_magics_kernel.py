"""The %train magics in a real kernel (nbclient), with real local jobs."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from .kernel_utils import KernelSession
from .nbrun import errors_of, run_cells, text_of

WRITE_FILE = (
    "%train submit --name nbjob -- python -c "
    "\"import os; open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/a.txt', 'w').write('hi from the job'); print('hello from the job')\""
)


def test_submit_wait_list_download_in_a_kernel(tmp_path: Path) -> None:
    cells = [
        "%load_ext trainorch_jupyter",
        "job = " + WRITE_FILE + "\nprint(type(job).__name__, job.id)",
        "final = job.wait(120)\nprint('STATE', final.state.value)",
        "%train list",
        "%train status",
        "%train logs --tail 5",
        "infos = %train download\nimport hashlib\n"
        "print('VERIFIED', all(hashlib.sha256(i.path.read_bytes()).hexdigest() == i.hash_sha256 for i in infos))",
        "%train download --to elsewhere",
        "from trainorch_jupyter import get_orchestrator\nprint('SAME', get_orchestrator().job(None).id == job.id)",
    ]
    out = run_cells(cells, tmp_path)
    for cell in out:
        assert not errors_of(cell), text_of(cell)
    m = re.search(r"JobHandle (nbjob-\S+)", text_of(out[1]))
    assert m, text_of(out[1])
    job_id = m.group(1)
    assert "STATE COMPLETED" in text_of(out[2])
    assert job_id in text_of(out[3]) and "COMPLETED" in text_of(out[3])
    assert "state     COMPLETED" in text_of(out[4])
    assert "hello from the job" in text_of(out[5])
    assert "VERIFIED True" in text_of(out[6])
    assert "a.txt" in text_of(out[7]) and "verified" in text_of(out[7])
    assert "SAME True" in text_of(out[8])
    art = tmp_path / "artifacts" / job_id / "a.txt"
    assert art.read_text() == "hi from the job"
    meta = json.loads((tmp_path / "artifacts" / job_id / "trainorch-artifact.json").read_text())
    assert meta["files"][0]["hash_sha256"] == hashlib.sha256(b"hi from the job").hexdigest()
    assert (tmp_path / "elsewhere" / "a.txt").read_text() == "hi from the job"


def test_bad_input_is_a_usage_error_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "x"}\n')
    bad = [
        ('%train submit --name "Bad Name" -- true', "name:"),
        ("%train frobnicate", "unknown subcommand"),
        ("%train logs nosuchjob", "no job matches"),
        ("%train submit --model tiny --data train.jsonl --lr abc", "--lr"),
        ("%train submit --model tiny --data missing.jsonl", "train.data: file not found"),
        ("%train submit --model tiny --data train.jsonl --lora-r 0", "train.lora_r"),
        ("%train submit --provider moon -- true", "unknown provider 'moon'"),
        ("%train submit --env NOEQUALS -- true", "expected K=V"),
        ("%train submit --max-runtime soon -- true", "max_runtime"),
        ("%train submit --", "nothing after --"),
        ("%%train submit\nname: x\ncommand: [true]\nbogus: 1", "spec.bogus: unknown field"),
        ("%%train submit\nname = 'x'\ntrain = {model = 'tiny', data = 'train.jsonl', steps = 0}", "train.steps"),
    ]
    cells = ["%load_ext trainorch_jupyter", *[src for src, _ in bad], "%train list"]
    out = run_cells(cells, tmp_path, allow_errors=True)
    for (src, expected), cell in zip(bad, out[1:], strict=False):
        # IPython shows a UsageError as one line on stderr: no error output, no traceback.
        shown = text_of(cell)
        assert not errors_of(cell), (src, shown)
        assert shown.startswith("UsageError: "), (src, shown)
        assert expected in shown, (src, shown)
        assert len(shown.strip().splitlines()) == 1, (src, shown)
        assert "Traceback" not in shown, (src, shown)
    # Nothing was stored or started.
    assert "no jobs" in text_of(out[-1])
    assert not (tmp_path / ".trainorch" / "machines").exists()


def test_help_texts(tmp_path: Path) -> None:
    with KernelSession(tmp_path) as ks:
        ks.run("%load_ext trainorch_jupyter")
        sub = ks.run("%train submit -h").stdout
        assert "--max-runtime" in sub and "--lora-r" in sub
        # %train? shows the docstring in the pager: a "page" payload of the execute reply, nothing on IOPub.
        msg_id = ks.kc.execute("%train?", allow_stdin=False)
        while True:
            reply = ks.kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["status"] == "ok", reply["content"]
        pages = [p["data"]["text/plain"] for p in reply["content"].get("payload", []) if p.get("source") == "page"]
        assert len(pages) == 1, reply["content"]
        for text in (pages[0], ks.run("%train").stdout):  # %train alone prints the same overview
            for sub_help in ("%train submit", "%train status", "%train logs", "%train cancel", "%train list",
                             "%train download", "%train panel", "%train dashboard", "%%train submit"):
                assert sub_help in text, (sub_help, text)
            assert "--overwrite" in text and "--timeout" in text and "--no-download" in text
            assert "%%train status" not in text and "%%train download" not in text  # usage lines: one "%"


def test_cell_magic_yaml_and_toml_specs(tmp_path: Path) -> None:
    yaml_cell = (
        "%%train submit --wait\n"
        "name: from-yaml\n"
        "command: [python, -c, \"print('yaml job ran')\"]\n"
        "max_runtime: 10m\n"
    )
    toml_cell = (
        "%%train submit --wait --name from-toml\n"
        "command = ['python', '-c', \"print('toml job ran')\"]\n"
        "env = { GREETING = 'hi' }\n"
    )
    cells = [
        "%load_ext trainorch_jupyter",
        yaml_cell,
        toml_cell,
        "%train submit --wait --name tabbed\t--\tpython -c \"print('tab ok')\"",
        "from trainorch_jupyter import get_orchestrator\n"
        "for j in get_orchestrator().jobs():\n    print(j.spec.name, j.state.value, j.spec.max_runtime, dict(j.spec.env))",
        "print(get_orchestrator().logs(get_orchestrator().job('from-yaml').id))",
    ]
    res = run_cells(cells, tmp_path)
    for cell in res:
        assert not errors_of(cell), text_of(cell)
    listing = text_of(res[4])
    assert "tabbed COMPLETED" in listing
    assert "from-yaml COMPLETED 600.0" in listing
    assert "from-toml COMPLETED" in listing and "'GREETING': 'hi'" in listing
    assert "yaml job ran" in text_of(res[5])


def test_kernel_dies_mid_run_and_a_new_kernel_reattaches(tmp_path: Path) -> None:
    from nbclient.exceptions import DeadKernelError

    from trainorch_jupyter.store import Store

    job_code = ("import time\nfor i in range(150):\n    print(f'line {i:05d}', flush=True)\n    time.sleep(0.03)\n"
                "import os\nopen(os.environ['TRAINORCH_OUTPUT_DIR'] + '/done.txt', 'w').write('done')")
    (tmp_path / "job.py").write_text(job_code)
    first = [
        "%load_ext trainorch_jupyter",
        f"job = %train submit --name crash -- python {tmp_path / 'job.py'}",
        "import time\nwhile len(job.logs().splitlines()) < 30 and not job.status.is_terminal: time.sleep(0.05)\n"
        "assert job.status.value == 'RUNNING', job.logs()",
        "import os\nos._exit(1)",  # the kernel dies without any cleanup
    ]
    with pytest.raises(DeadKernelError):
        run_cells(first, tmp_path, timeout=60)
    (job,) = Store(tmp_path).list_jobs()
    assert job.state.value == "RUNNING"
    second = [
        "%load_ext trainorch_jupyter",
        "from trainorch_jupyter import get_orchestrator\n"
        f"final = get_orchestrator().wait({job.id!r}, timeout=120)\nprint('STATE', final.state.value)",
        f"lines = get_orchestrator().logs({job.id!r}).splitlines()\n"
        "print('LINES', lines == [f'line {i:05d}' for i in range(150)])",
    ]
    out = run_cells(second, tmp_path)
    assert "STATE COMPLETED" in text_of(out[1])
    assert "LINES True" in text_of(out[2])
    assert (tmp_path / "artifacts" / job.id / "done.txt").read_text() == "done"


def test_logs_follow_prints_every_line_until_the_end(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text("import time\nfor i in range(40):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.02)\n")
    out = run_cells(["%load_ext trainorch_jupyter", f"job = %train submit --name follow -- python {tmp_path / 'slow.py'}",
                     "%train logs -f"], tmp_path)
    shown = text_of(out[2])
    assert [ln for ln in shown.splitlines() if ln.startswith("tick")] == [f"tick {i}" for i in range(40)]
    assert "COMPLETED" in shown


def test_top_level_await_on_the_handle_and_the_async_api(tmp_path: Path) -> None:
    cells = [
        "%load_ext trainorch_jupyter",
        "from trainorch_jupyter import get_orchestrator\norch = get_orchestrator()\n"
        "job = await orch.asubmit({'name': 'awaited', 'command': ['python', '-c', 'import time; time.sleep(1); print(7)']})\n"
        "final = await job\nprint('AWAITED', final.state.value)",
        "files = await orch.adownload(job.id)\nprint('FILES', files)\n"
        "import asyncio\n"
        "slow = orch.submit({'name': 'slow', 'command': ['python', '-c', 'import time; time.sleep(30)']})\n"
        "try:\n    await asyncio.wait_for(orch.await_job(slow.id), 0.5)\nexcept TimeoutError:\n    print('TIMED OUT')\n"
        "await orch.acancel(slow.id)\nprint('CANCELLED', (await slow).state.value)",
    ]
    out = run_cells(cells, tmp_path)
    for cell in out:
        assert not errors_of(cell), text_of(cell)
    assert "AWAITED COMPLETED" in text_of(out[1])
    assert "FILES []" in text_of(out[2])  # the command wrote no files
    assert "TIMED OUT" in text_of(out[2]) and "CANCELLED CANCELLED" in text_of(out[2])


JOB_WITH_OPTIONS = """
import os, pathlib
print("IN", (pathlib.Path(os.environ["TRAINORCH_INPUT_DIR"]) / "data.txt").read_text().strip())
print("ENV", os.environ["GREETING"], "|", os.environ["X"], "|")
out = pathlib.Path(os.environ["TRAINORCH_OUTPUT_DIR"])
(out / "README.md").write_text("model card from the job\\n")
(out / "adapter.bin").write_bytes(bytes(range(256)) * 64)
"""


def _one_usage_error(cell: dict[str, object]) -> str:
    shown = text_of(cell)
    assert not errors_of(cell) and shown.startswith("UsageError: "), shown
    assert len(shown.strip().splitlines()) == 1 and "Traceback" not in shown, shown
    return shown


def test_submit_options_list_filters_and_a_download_that_never_clobbers(tmp_path: Path) -> None:
    """README promises (issue 7 item 22): --input, --env K=V, --no-download, %train list --state/--provider;
    a quoted ' -- ' inside an option value (item 14); %train download --to never replaces a user's file (item 1)."""
    (tmp_path / "job.py").write_text(JOB_WITH_OPTIONS)
    (tmp_path / "data.txt").write_text("rows from the input file\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my own notes\n")
    cells = [
        "%load_ext trainorch_jupyter",
        "job = %train submit --wait --name opts --input data.txt --env GREETING=hello --env 'X=a -- b' "
        f"--no-download -- python {tmp_path / 'job.py'}\nprint('JOB', job.id)",
        "import os\nrec = job.record\n"
        "print('STATE', rec.state.value, 'AUTO', rec.spec.auto_download, 'ARTS', len(rec.artifacts),"
        " 'DIR', os.path.exists('artifacts/' + job.id), 'ENV', sorted(rec.spec.env.items()))",
        "print(job.logs())",
        "bad = %train submit --wait --name broken -- python -c 'import sys; sys.exit(3)'\nprint('BAD', bad.id)",
        "%train list --state FAILED",
        "%train list --state completed --provider local",
        "%train list --provider nowhere",
        "%train list --state bogus",
        "%train download opts --to mine",
        "print('MINE', sorted(os.listdir('mine')), repr(open('mine/README.md').read()), os.path.exists('artifacts'))",
        "%train download opts --to mine --overwrite",
        "%train download opts --to mine",
    ]
    out = run_cells(cells, tmp_path, allow_errors=True)
    for i in (1, 2, 3, 4, 5, 6, 7, 10, 11, 12):
        assert not errors_of(out[i]) and "Error" not in text_of(out[i]), (cells[i], text_of(out[i]))
    job_id = re.search(r"JOB (opts-\S+)", text_of(out[1])).group(1)  # type: ignore[union-attr]
    bad_id = re.search(r"BAD (broken-\S+)", text_of(out[4])).group(1)  # type: ignore[union-attr]
    assert ("STATE COMPLETED AUTO False ARTS 0 DIR False ENV [('GREETING', 'hello'), ('X', 'a -- b')]"
            in text_of(out[2])), text_of(out[2])
    assert "IN rows from the input file" in text_of(out[3])
    assert "ENV hello | a -- b |" in text_of(out[3])
    assert bad_id in text_of(out[5]) and job_id not in text_of(out[5])
    assert job_id in text_of(out[6]) and bad_id not in text_of(out[6])
    assert job_id not in text_of(out[7]) and bad_id not in text_of(out[7])
    assert "unknown state 'bogus'" in _one_usage_error(out[8])
    refused = _one_usage_error(out[9])
    assert "README.md" in refused and "--overwrite" in refused and "adapter.bin" not in refused
    # Nothing was written, anywhere: refused before the first byte was fetched.
    assert "MINE ['README.md'] 'my own notes\\n' False" in text_of(out[10]), text_of(out[10])
    assert "README.md" in text_of(out[11]) and "adapter.bin" in text_of(out[11]) and "verified" in text_of(out[11])
    assert (mine / "README.md").read_text() == "model card from the job\n"
    assert (mine / "adapter.bin").read_bytes() == bytes(range(256)) * 64
    assert text_of(out[12]).count("  verified  -> ") == 2  # a second time: identical files are fine


WAIT_FOR_RELEASE = """
import os, pathlib, time
release = pathlib.Path(os.environ["RELEASE"])
deadline = time.monotonic() + 120
while not release.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
(pathlib.Path(os.environ["TRAINORCH_OUTPUT_DIR"]) / "late.txt").write_text("late")
"""


def test_download_is_bounded_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    """Issue 7 item 14: %train download waited with .result() and no timeout. Now --timeout (default 10 min)
    stops the download with a clear message, Ctrl-C stops it at once, and neither touches the job."""
    from tests.helpers import wait_for

    script, release = tmp_path / "job.py", tmp_path / "release"
    script.write_text(WAIT_FOR_RELEASE)
    with KernelSession(tmp_path) as ks:
        ks.run("%load_ext trainorch_jupyter\nfrom trainorch_jupyter import get_orchestrator\norch = get_orchestrator()")
        ks.run(f"job = %train submit --name slow --no-download --env RELEASE={release} -- python {script}")
        ks.run("import time\nwhile job.status.value != 'RUNNING': time.sleep(0.05)")
        free_lock = ("t0 = time.monotonic()\n"
                     "while orch._download_locks[job.id].locked() and time.monotonic() - t0 < 20: time.sleep(0.05)\n"
                     "print('LOCKED', orch._download_locks[job.id].locked(), 'STATE', job.status.value)")

        timed = ks.run("%train download --timeout 1", check=False)
        assert timed.error is None, timed.error
        assert timed.stderr.startswith("UsageError: ") and len(timed.stderr.strip().splitlines()) == 1, timed.stderr
        assert f"job {ks.run('print(job.id)').stdout.strip()} is still RUNNING after 1s" in timed.stderr
        assert "download stopped" in timed.stderr
        # The download was stopped, not left waiting in the background; the job goes on.
        assert ks.run(free_lock).stdout.split() == ["LOCKED", "False", "STATE", "RUNNING"]

        waiting = ks.submit("%train download")  # waits for the job's end
        wait_for(lambda: any(m.parent_id == waiting.msg_id and m.msg_type == "execute_input"
                             for m in ks.iter_messages()), timeout=30, what="the cell to start")
        time.sleep(2.0)  # into the wait
        assert ks.km is not None
        ks.km.interrupt_kernel()
        ks.wait(waiting, timeout=30)
        assert waiting.error is None, waiting.error  # no KeyboardInterrupt traceback
        assert "stopped waiting for job" in waiting.stderr and "which goes on" in waiting.stderr, waiting.stderr
        assert ks.run(free_lock).stdout.split() == ["LOCKED", "False", "STATE", "RUNNING"]

        release.touch()
        assert ks.run("print(job.wait(60).state.value)").stdout.strip() == "COMPLETED"
        done = ks.run("%train download slow --timeout 60")
        assert "late.txt" in done.stdout and "verified" in done.stdout
    assert (tmp_path / "artifacts").is_dir()
