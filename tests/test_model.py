"""The data model: state machine, spec validation, lossless serialisation."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainorch_jupyter.model import (
    LEGAL_TRANSITIONS,
    ArtifactInfo,
    IllegalTransition,
    Job,
    JobSpec,
    JobState,
    Resources,
    SpecError,
    TrainerConfig,
    TrainingState,
    new_job_id,
    parse_duration,
)

STATES = list(JobState)


def test_training_state_is_the_seed_name() -> None:
    assert TrainingState is JobState
    assert TrainingState.COMPLETED.value == "COMPLETED"


def test_happy_path_and_endings() -> None:
    job = Job(id="x", spec=JobSpec(name="x", command=("true",)))
    for s in (JobState.PROVISIONING, JobState.RUNNING, JobState.DOWNLOADING, JobState.COMPLETED):
        job.transition(s)
    assert job.state is JobState.COMPLETED and job.ended_at is not None and job.started_at is not None
    for s in STATES:
        with pytest.raises(IllegalTransition):
            job.transition(s)


@pytest.mark.parametrize("live", [s for s in JobState if not s.is_terminal])
@pytest.mark.parametrize("end", [JobState.FAILED, JobState.CANCELLED])
def test_failed_and_cancelled_reachable_from_every_live_state(live: JobState, end: JobState) -> None:
    assert live.can_become(end)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(STATES), max_size=30))
def test_state_machine_never_reaches_an_illegal_state(events: list[JobState]) -> None:
    job = Job(id="x", spec=JobSpec(name="x", command=("true",)))
    history = [job.state]
    for dst in events:
        before = job.state
        try:
            job.transition(dst)
        except IllegalTransition:
            assert job.state is before  # a refused change changes nothing
            assert dst not in LEGAL_TRANSITIONS[before]
            continue
        assert dst in LEGAL_TRANSITIONS[before]
        history.append(job.state)
    # Once terminal, always terminal and never changed again.
    for i, s in enumerate(history):
        if s.is_terminal:
            assert history[i:] == [s]
    # The order follows the lifecycle.
    order = [JobState.PENDING, JobState.PROVISIONING, JobState.RUNNING, JobState.DOWNLOADING]
    live = [order.index(s) for s in history if s in order]
    assert live == sorted(live)


def test_job_ids_are_readable_and_unique() -> None:
    now = datetime(2026, 11, 29, 12, 30, 5, tzinfo=UTC)
    ids = {new_job_id("demo", now) for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"demo-20261129-123005-[0-9a-f]{6}", i) for i in ids)


names = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@st.composite
def specs(draw: st.DrawFn) -> JobSpec:
    train = None
    command = None
    if draw(st.booleans()):
        train = TrainerConfig(model=draw(st.sampled_from(["tiny", "/m/llama"])), data="/d/train.jsonl",
                              steps=draw(st.none() | st.integers(1, 1000)),
                              lr=draw(st.floats(1e-6, 1e-2)), lora_r=draw(st.integers(1, 64)),
                              target_modules=draw(st.none() | st.tuples(st.sampled_from(["q_proj", "v_proj"]))))
    else:
        command = tuple(draw(st.lists(text, min_size=1, max_size=4)))
    return JobSpec(
        name=draw(names), provider=draw(st.sampled_from(["local", "runpod"])), command=command, train=train,
        inputs=tuple(draw(st.lists(st.sampled_from(["/a/x.txt", "/b/y.csv"]), max_size=2, unique=True))),
        resources=Resources(gpu=draw(st.none() | st.sampled_from(["A100 80GB", "RTX 4090"])),
                            gpu_count=draw(st.integers(1, 8)),
                            max_price_per_hour=draw(st.none() | st.floats(0.1, 10))),
        env=draw(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True), text, max_size=3)),
        max_runtime=draw(st.floats(1, 86400)), auto_download=draw(st.booleans()),
    )


@given(specs(), st.sampled_from(STATES), st.none() | st.integers(-15, 255), st.none() | text)
def test_job_round_trips_through_dict_and_json(spec: JobSpec, state: JobState, exit_code: int | None,
                                               error: str | None) -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    job = Job(id=new_job_id(spec.name, now), spec=spec, state=state, provider=spec.provider, machine_id="pod1",
              runner_url="http://127.0.0.1:1", created_at=now, updated_at=now + timedelta(seconds=1),
              started_at=now, ended_at=None, exit_code=exit_code, error=error,
              diagnosis={"cause": "x", "suggestions": ["a"]}, price_per_hour=1.5, gpu="A100",
              artifacts=[ArtifactInfo("j:a", "j", Path("/w/a"), 3, "ab" * 32, now, {"name": "a", "verified": True})],
              machine={"pid": 3})
    back = Job.from_dict(json.loads(json.dumps(job.to_dict())))
    assert back == job
    assert back.to_dict() == job.to_dict()


def test_spec_validation_names_the_field(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hi"}\n')
    ok = JobSpec(name="ok", train=TrainerConfig(model="tiny", data=str(data)))
    ok.validate(known_providers={"local"})
    cases: list[tuple[JobSpec, str]] = [
        (JobSpec(name="Bad Name", command=("true",)), "name"),
        (JobSpec(name="x", command=None), "command"),
        (JobSpec(name="x", command=("true",), train=ok.train), "command"),
        (JobSpec(name="x", provider="nope", command=("true",)), "provider"),
        (JobSpec(name="x", command=("true",), max_runtime=0), "max_runtime"),
        (JobSpec(name="x", command=("true",), env={"TRAINORCH_X": "1"}), "env.TRAINORCH_X"),
        (JobSpec(name="x", command=("true",), env={"RUNPOD_API_KEY": "k"}), "env.RUNPOD_API_KEY"),
        (JobSpec(name="x", command=("true",), env={"1BAD": "k"}), "env.1BAD"),
        (JobSpec(name="x", command=("true",), inputs=(str(tmp_path / "missing.txt"),)), "inputs[0]"),
        (JobSpec(name="x", command=("true",), resources=Resources(gpu_count=0)), "resources.gpu_count"),
        (JobSpec(name="x", train=TrainerConfig(model="tiny", data=str(tmp_path / "no.jsonl"))), "train.data"),
        (JobSpec(name="x", train=TrainerConfig(model="tiny", data=str(data), lr=-1)), "train.lr"),
        (JobSpec(name="x", train=TrainerConfig(model="tiny", data=str(data), steps=5, epochs=1.0)), "train.steps"),
        (JobSpec(name="x", train=TrainerConfig(model="tiny", data=str(data), lora_r=0)), "train.lora_r"),
        (JobSpec(name="x", train=TrainerConfig(model="tiny", data=str(data), device="tpu")), "train.device"),
    ]
    for spec, field_name in cases:
        with pytest.raises(SpecError) as info:
            spec.validate(known_providers={"local"})
        assert info.value.field == field_name, (spec, info.value)
        assert str(info.value).startswith(field_name + ":")


def test_from_dict_rejects_unknown_fields_and_parses_durations() -> None:
    with pytest.raises(SpecError, match=r"spec\.nmae: unknown field"):
        JobSpec.from_dict({"nmae": "x"})
    with pytest.raises(SpecError, match=r"train\.lora_rank: unknown field"):
        JobSpec.from_dict({"name": "x", "train": {"model": "tiny", "data": "d.jsonl", "lora_rank": 3}})
    spec = JobSpec.from_dict({"name": "x", "command": "python -c 'print(1)'", "max_runtime": "15m",
                              "train": None})
    assert spec.command == ("python", "-c", "print(1)")
    assert spec.max_runtime == 900.0
    assert parse_duration("2h") == 7200.0
    with pytest.raises(SpecError, match="max_runtime"):
        parse_duration("soon")


def test_trainer_cli_args() -> None:
    cfg = TrainerConfig.from_dict({"model": "tiny", "data": "d.jsonl", "steps": 80, "lora-r": 4,
                                   "target_modules": "q_proj, v_proj", "gradient_checkpointing": True})
    args = cfg.cli_args("${TRAINORCH_INPUT_DIR}/data.jsonl", "/out")
    assert args[:6] == ["--model", "tiny", "--data", "${TRAINORCH_INPUT_DIR}/data.jsonl", "--output-dir", "/out"]
    assert "--steps" in args and args[args.index("--steps") + 1] == "80"
    assert args[args.index("--lora-r") + 1] == "4"
    assert args[args.index("--target-modules") + 1] == "q_proj,v_proj"
    assert "--gradient-checkpointing" in args and "--epochs" not in args


def test_yaml_style_numeric_strings_are_taken_for_numeric_fields() -> None:
    import yaml

    data = yaml.safe_load("model: tiny\ndata: d.jsonl\nlr: 3e-3\nsteps: '80'\n")
    assert data["lr"] == "3e-3"  # what YAML 1.1 gives
    cfg = TrainerConfig.from_dict(data)
    assert cfg.lr == 0.003 and cfg.steps == 80
    with pytest.raises(SpecError, match=r"train\.lr"):
        TrainerConfig.from_dict({"model": "tiny", "data": "d.jsonl", "lr": "fast"}).validate(check_files=False)


@pytest.mark.parametrize(("name", "vram", "canonical"), [
    ("NVIDIA GeForce RTX 4090", None, "RTX4090"), ("RTX 4090", None, "RTX4090"), ("rtx-4090", None, "RTX4090"),
    ("1x A100 (40 GB SXM4)", None, "A100-40GB"), ("NVIDIA A100 80GB PCIe", None, "A100-80GB"),
    ("A100 SXM4", 80, "A100-80GB"), ("A100 SXM4", 40, "A100-40GB"), ("gpu_1x_a100_sxm4", None, "A100"),
    ("NVIDIA H100 80GB HBM3", None, "H100"), ("H100 SXM5", None, "H100"), ("RTX A6000", None, "A6000"),
    ("NVIDIA RTX A4000", None, "A4000"), ("A40", None, "A40"), ("NVIDIA L40S", None, "L40S"), ("L4", None, "L4"),
    ("NVIDIA RTX 6000 Ada Generation", None, "RTX6000-ADA"), ("MI300X", None, "MI300X"),
])
def test_gpu_names_map_to_one_vocabulary(name: str, vram: float | None, canonical: str) -> None:
    from trainorch_jupyter.gpus import canonical_gpu, matches

    assert canonical_gpu(name, vram) == canonical
    assert matches(name if vram is None else canonical, canonical)
