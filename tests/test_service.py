"""`qvacd service install | uninstall | status`, run as real CLI subprocesses.

What a test may not do is install a real service into the session that runs it, so
every run gets a temporary HOME and XDG_CONFIG_HOME, and a PATH of our choosing: none
with systemctl (the "no systemd" case), or a small fake `systemctl` written here that
logs its arguments and fails where the test says (a user manager that is unreachable,
or one that refuses the unit). The unit itself is checked by the real
`systemd-analyze verify`.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qvacd.cli.common import CliError
from qvacd.cli.service import manager_for, systemd_quote

REPO = Path(__file__).resolve().parent.parent


def qvacd(tmp: Path, *args: str, path: str | None = None, cwd: Path | None = None,
          extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QVACD_", "XDG_", "DBUS_"))}
    env.update(HOME=str(tmp / "home"), XDG_CONFIG_HOME=str(tmp / "config"),
               PATH=path if path is not None else str(tmp / "empty-bin"), **(extra_env or {}))
    (tmp / "empty-bin").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "qvacd.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def fake_systemctl(tmp: Path, fail_on: str = "") -> tuple[str, Path]:
    """A bin dir whose `systemctl` logs each call and exits 1 with a systemd-like message
    when its arguments contain `fail_on` (empty: never fails)."""
    bindir, log = tmp / "fake-bin", tmp / "systemctl.log"
    bindir.mkdir(exist_ok=True)
    script = bindir / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        f'case "$*" in *"{fail_on}"*) if [ -n "{fail_on}" ]; then\n'
        '  echo "Failed to connect to bus: No medium found" >&2; exit 1; fi;;\n'
        "esac\n"
        'case "$*" in *is-active*) echo active;; *is-enabled*) echo enabled;; esac\n'
        "exit 0\n")
    script.chmod(0o755)
    return str(bindir), log


def unit_path(tmp: Path) -> Path:
    return tmp / "config" / "systemd" / "user" / "qvacd.service"


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvacd: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def no_files_under(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file() or p.is_symlink()] if d.exists() else []


# ---- the unit ------------------------------------------------------------------------


def test_dry_run_prints_the_unit_and_touches_nothing(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    r = qvacd(tmp_path, "service", "install", "--dry-run", "--data-dir", "rel/dd",
              cwd=tmp_path / "work")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.splitlines()[0] == f"# {unit_path(tmp_path)}"
    exec_line = next(x for x in out.splitlines() if x.startswith("ExecStart="))
    words = exec_line.removeprefix("ExecStart=").split()
    # an absolute command, and the data dir made absolute: the service runs from /
    assert Path(words[0]).is_absolute() and Path(words[0]).exists(), words
    assert words[-3:] == ["start", "--data-dir", str(tmp_path / "work" / "rel" / "dd")], words
    for line in ("Restart=on-failure", "RestartSec=5", "WantedBy=default.target",
                 "Type=simple", "[Unit]", "[Service]", "[Install]"):
        assert line in out.splitlines(), (line, out)
    assert "systemctl --user enable --now qvacd.service" in out
    assert not (tmp_path / "config").exists() and not (tmp_path / "work" / "rel").exists()


def test_dry_run_default_data_dir(tmp_path: Path) -> None:
    r = qvacd(tmp_path, "service", "install", "--dry-run",
              extra_env={"XDG_DATA_HOME": str(tmp_path / "data")})
    assert r.returncode == 0, r.stderr
    assert f"--data-dir {tmp_path / 'data' / 'qvacd'}" in r.stdout, r.stdout
    r = qvacd(tmp_path, "service", "install", "--dry-run",
              extra_env={"QVACD_DATA_DIR": str(tmp_path / "env dir")})
    assert f'--data-dir "{tmp_path / "env dir"}"' in r.stdout, r.stdout


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    for i, data_dir in enumerate([tmp_path / "plain", tmp_path / "with space 100% $HOME"]):
        r = qvacd(tmp_path, "service", "install", "--dry-run", "--data-dir", str(data_dir))
        assert r.returncode == 0, r.stderr
        unit = tmp_path / f"verify{i}" / "qvacd.service"
        unit.parent.mkdir()
        unit.write_text(r.stdout)
        runtime = tmp_path / f"runtime{i}"  # --user looks up XDG_RUNTIME_DIR, even to verify
        runtime.mkdir(mode=0o700)
        v = subprocess.run(["systemd-analyze", "--user", "verify", str(unit)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
        # verify prints problems of *our* file prefixed with its path; other noise (no
        # user manager in a container) is not about the unit
        ours = [x for x in (v.stdout + v.stderr).splitlines() if str(unit) in x]
        assert v.returncode == 0 and not ours, f"{v.returncode}\n{v.stdout}\n{v.stderr}"


def test_quoting_keeps_odd_paths_one_word() -> None:
    assert systemd_quote("/a/b") == "/a/b"
    assert systemd_quote("/a b/100%") == '"/a b/100%%"'
    assert systemd_quote('/x"$y') == '"/x\\"$$y"'


def test_launchd_agent_restarts_on_failure(tmp_path: Path) -> None:
    mgr = manager_for(tmp_path / "dd", "darwin")
    assert mgr.path.name == "org.qvacd.daemon.plist" and "LaunchAgents" in str(mgr.path)
    plist = plistlib.loads(mgr.text.encode())
    assert plist["ProgramArguments"][-3:] == ["start", "--data-dir", str(tmp_path / "dd")]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    with pytest.raises(CliError, match="qvacd start"):
        manager_for(tmp_path, "win32")


# ---- install / uninstall where systemd cannot be used ---------------------------------


def test_install_without_systemctl_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    r = qvacd(tmp_path, "service", "install", "--data-dir", str(tmp_path / "dd"))
    one_line_error(r, "no systemctl", "qvacd start")
    assert no_files_under(tmp_path / "config") == []
    r = qvacd(tmp_path, "service", "uninstall")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
    r = qvacd(tmp_path, "service", "status", "--api", "127.0.0.1:9")
    assert r.returncode == 0 and "not installed" in r.stdout and "daemon: none" in r.stdout


def test_install_without_user_bus_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    bindir, log = fake_systemctl(tmp_path, fail_on="show-environment")
    r = qvacd(tmp_path, "service", "install", path=bindir)
    one_line_error(r, "systemctl --user", "Failed to connect to bus", "qvacd start")
    assert no_files_under(tmp_path / "config") == []
    assert log.read_text().split("\n")[0] == "--user show-environment"


def test_refused_enable_removes_the_unit_again(tmp_path: Path) -> None:
    bindir, log = fake_systemctl(tmp_path, fail_on="enable")
    r = qvacd(tmp_path, "service", "install", path=bindir)
    one_line_error(r, "enable --now qvacd.service", "nothing was left behind")
    assert no_files_under(tmp_path / "config" / "systemd") == []
    calls = log.read_text().splitlines()
    assert calls[-1] == "--user daemon-reload", calls  # systemd forgets the removed unit


def test_install_status_uninstall_round_trip(tmp_path: Path) -> None:
    bindir, log = fake_systemctl(tmp_path)
    dd = tmp_path / "dd"
    r = qvacd(tmp_path, "service", "install", "--data-dir", str(dd), path=bindir)
    assert r.returncode == 0, r.stderr
    unit = unit_path(tmp_path)
    assert f"--data-dir {dd}" in unit.read_text() and "ran systemctl --user enable --now" \
        in r.stdout
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    assert [x for x in unit.parent.iterdir() if x.name.startswith(".")] == []  # no temp left
    assert log.read_text().splitlines()[:3] == [
        "--user show-environment", "--user daemon-reload", "--user enable --now qvacd.service"]
    r = qvacd(tmp_path, "service", "status", "--data-dir", str(dd), "--api", "127.0.0.1:9",
              path=bindir)
    assert r.returncode == 0 and "(installed)" in r.stdout, r.stdout
    assert "systemd: active, enabled at login" in r.stdout and "daemon: none" in r.stdout
    r = qvacd(tmp_path, "service", "uninstall", "--dry-run", path=bindir)
    assert "systemctl --user disable --now qvacd.service" in r.stdout and unit.exists()
    r = qvacd(tmp_path, "service", "uninstall", path=bindir)
    assert r.returncode == 0 and f"removed {unit}" in r.stdout, r.stderr
    assert not unit.exists()
    assert log.read_text().splitlines()[-2:] == [
        "--user disable --now qvacd.service", "--user daemon-reload"]


def test_uninstall_without_user_bus_still_removes_the_file(tmp_path: Path) -> None:
    bindir, _ = fake_systemctl(tmp_path)
    assert qvacd(tmp_path, "service", "install", path=bindir).returncode == 0
    wants = unit_path(tmp_path).parent / "default.target.wants"
    wants.mkdir()
    (wants / "qvacd.service").symlink_to(unit_path(tmp_path))  # what a real enable makes
    (tmp_path / "nobus").mkdir()
    bindir2, _ = fake_systemctl(tmp_path / "nobus", fail_on="show-environment")
    r = qvacd(tmp_path, "service", "uninstall", path=bindir2)
    one_line_error(r, "removed", "could not stop")
    assert no_files_under(tmp_path / "config") == []
