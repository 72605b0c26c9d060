"""Issue 7 item 20: without Chromium the browser tests fail (they never skip silently), unless opted out;
`make test` installs Chromium first where it can (.ci/ensure-chromium) or says what to do. Fast: no browser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser.conftest import REPO, SKIP_VAR, require_browser

SCRIPT = REPO / ".ci" / "ensure-chromium"


def test_a_missing_chromium_fails_the_browser_tests_unless_opted_out(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=f"{SKIP_VAR}=1"):
        require_browser(str(tmp_path / "no-chromium"), env={})
    with pytest.raises(pytest.skip.Exception, match=f"{SKIP_VAR} is set"):
        require_browser(str(tmp_path / "no-chromium"), env={SKIP_VAR: "1"})
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    require_browser(str(fake), env={})  # there: nothing to say


@pytest.mark.slow  # two pytest runs (~20 s)
def test_the_browser_test_module_errors_without_chromium(tmp_path: Path) -> None:
    """The real module, run by pytest with a Chromium path that does not exist: an error, not a green skip."""
    env = {**os.environ, "TRAINORCH_CHROMIUM": str(tmp_path / "no-chromium")}
    env.pop(SKIP_VAR, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           str(REPO / "tests" / "browser" / "test_panel_browser.py"), "-k", "busy_cell_and_dashboard"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "the browser tests cannot run" in out.stdout and "no-chromium is missing" in out.stdout
    opted = subprocess.run(cmd, cwd=REPO, env={**env, SKIP_VAR: "1"}, capture_output=True, text=True, timeout=120)
    assert opted.returncode == 0, opted.stdout[-2000:]
    assert "1 skipped" in opted.stdout and f"{SKIP_VAR} is set" in opted.stdout


def _ensure(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != SKIP_VAR}
    return subprocess.run(["sh", str(SCRIPT)], env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_make_test_gets_chromium_or_says_what_to_do(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-chromium")
    no_apt = str(tmp_path / "no-apt-get")
    out = _ensure(tmp_path, TRAINORCH_CHROMIUM=missing, TRAINORCH_APT_GET=no_apt)
    assert out.returncode == 1 and "there is no apt-get here" in out.stderr and f"{SKIP_VAR}=1" in out.stderr
    out = _ensure(tmp_path, TRAINORCH_CHROMIUM=missing, TRAINORCH_APT_GET=no_apt, TRAINORCH_SKIP_BROWSER="1")
    assert out.returncode == 0 and "will be skipped" in out.stderr
    assert _ensure(tmp_path, TRAINORCH_CHROMIUM="/bin/sh").returncode == 0  # there already: nothing done
    # apt-get is there: a stand-in that records its calls and "installs" chromium where it is expected
    calls = tmp_path / "calls"
    apt = tmp_path / "apt-get"
    apt.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n"
                   f"case \"$*\" in *install*) printf '#!/bin/sh\\n' > {missing}; chmod +x {missing};; esac\n")
    apt.chmod(0o755)
    out = _ensure(tmp_path, TRAINORCH_CHROMIUM=missing, TRAINORCH_APT_GET=str(apt))
    if os.geteuid() == 0:
        assert out.returncode == 0, out.stderr
        assert calls.read_text().splitlines() == ["update -qq", "install -y -qq chromium"]
        assert os.access(missing, os.X_OK)
    else:
        assert out.returncode == 1 and "install it as root" in out.stderr and not calls.exists()
