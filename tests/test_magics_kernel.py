"""The %train magics in a real kernel (nbclient), with real local jobs."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

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
    out = run_cells(["%load_ext trainorch_jupyter", "%train submit -h", "%train?", "%train"], tmp_path)
    assert "--max-runtime" in text_of(out[1]) and "--lora-r" in text_of(out[1])
    # %train? shows the docstring in the pager (a payload), %train alone prints the overview.
    assert "%train logs" in text_of(out[3]) and "%%train submit" in text_of(out[3])


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
    import pytest
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
