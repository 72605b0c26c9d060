"""The JupyterLab extension's build plumbing: the hatch build function, and one version for the wheel and the
extension. (The extension itself is tested in a browser: tests/browser/test_sidebar.py.)"""

from __future__ import annotations

import json
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest

import hatch_labextension

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def npm_builder(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    fake = types.ModuleType("hatch_jupyter_builder")
    fake.npm_builder = lambda target, version, **kw: calls.append((target, version, kw))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hatch_jupyter_builder", fake)
    monkeypatch.delenv(hatch_labextension.ENV, raising=False)
    return calls


def test_an_editable_install_skips_the_frontend_build(npm_builder: list[tuple[Any, ...]]) -> None:
    hatch_labextension.build("wheel", "editable", build_cmd="build", npm=["jlpm"])
    assert npm_builder == []


@pytest.mark.parametrize("value", ["1", "true"])
def test_an_editable_install_builds_it_when_asked(npm_builder: list[tuple[Any, ...]], value: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hatch_labextension.ENV, value)
    hatch_labextension.build("wheel", "editable", build_cmd="build", npm=["jlpm"])
    assert npm_builder == [("wheel", "editable", {"build_cmd": "build", "npm": ["jlpm"]})]


@pytest.mark.parametrize("target", ["wheel", "sdist"])
def test_a_wheel_or_an_sdist_always_builds_it(npm_builder: list[tuple[Any, ...]], target: str) -> None:
    hatch_labextension.build(target, "standard", build_cmd="build:prod", npm=["jlpm"])
    assert npm_builder == [(target, "standard", {"build_cmd": "build:prod", "npm": ["jlpm"]})]


def test_the_extension_and_the_wheel_have_one_version() -> None:
    package = json.loads((REPO / "package.json").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert package["version"] == project["version"]
    assert package["jupyterlab"]["outputDir"] == "trainorch_jupyter/labextension"
    install = json.loads((REPO / "install.json").read_text())
    assert install["packageName"] == project["name"]
