"""JupyterLab in headless Chromium (Debian's /usr/bin/chromium) through Playwright.

Never runs ``playwright install``: the Python package's bundled driver talks to the system Chromium.
The server is offline-friendly (no news, no update check, read-only extension manager) and keeps
its settings, workspaces and runtime files in a temporary folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Debian's Chromium (`make test` installs it where apt-get is there); TRAINORCH_CHROMIUM names another.
CHROMIUM = os.environ.get("TRAINORCH_CHROMIUM") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts" / "browser"


SKIP_VAR = "TRAINORCH_SKIP_BROWSER"


def require_browser(chromium: str = CHROMIUM, env: Mapping[str, str] | None = None) -> None:
    """Fail (not skip) when the browser tests cannot run, unless they were explicitly opted out of.

    ``make test`` installs Debian's Chromium where apt-get is there (see .ci/ensure-chromium); a machine
    without it must not go green having silently skipped the only real-browser tests.
    """
    env = os.environ if env is None else env
    missing = []
    if not Path(chromium).exists():
        missing.append(f"{chromium} is missing (install Debian's chromium: apt-get install chromium; never "
                       "`playwright install`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package is missing (make install)")
    if not missing:
        return
    why = "; ".join(missing)
    if env.get(SKIP_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip(f"browser tests skipped ({SKIP_VAR} is set): {why}")
    pytest.fail(f"the browser tests cannot run: {why}. Set {SKIP_VAR}=1 to skip them explicitly.", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}&reset"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_browser()
    base = tmp_path_factory.mktemp("lab")
    root = base / "workspace"
    root.mkdir()
    for d in ("settings", "workspaces", "runtime", "config"):
        (base / d).mkdir()
    token = secrets.token_hex(16)
    port = _free_port()
    log = base / "jupyter.log"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(base / "runtime"), "JUPYTER_CONFIG_DIR": str(base / "config"),
           "TRAINORCH_WORKSPACE": str(root), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
           f"--LabApp.user_settings_dir={base / 'settings'}", f"--LabApp.workspaces_dir={base / 'workspaces'}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield Lab(url, token, root, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, SHOTS / "jupyter.log")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()


class Shots:
    def __init__(self, page: Any, prefix: str) -> None:
        self.page, self.prefix, self.n = page, prefix, 0
        SHOTS.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> Path:
        self.n += 1
        path = SHOTS / f"{self.prefix}-{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def shots(page: Any, request: pytest.FixtureRequest) -> Shots:
    return Shots(page, request.node.name)
