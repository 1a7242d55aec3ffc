"""`qvacd service install | uninstall | status`: run the daemon as a login service.

Linux: a systemd *user* unit (~/.config/systemd/user/qvacd.service, or under
$XDG_CONFIG_HOME), started at login and restarted on failure, managed with
`systemctl --user`. macOS: a launchd agent (~/Library/LaunchAgents/<label>.plist)
with KeepAlive on failure, managed with `launchctl`. Both run `qvacd start` with the
data dir this command was given (or the default one), written as an absolute path, so
the service serves the same models, identity and trust as the shell does.

Where neither exists, or `systemctl --user` cannot reach a user manager (containers,
ssh sessions without lingering), every action but `--dry-run` is one line saying what
to do instead, and exit 1. `install` writes the file atomically and removes it again
(or puts the previous one back) when the service manager refuses it, so a failed
install leaves nothing behind. The running daemon is asked through DaemonClient.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..daemon_file import running_daemon_api
from .client import DaemonClient
from .common import CliError, data_dir_of

UNIT = "qvacd.service"
LAUNCHD_LABEL = "org.qvacd.daemon"
RESTART_SEC = 5
INSTEAD = ("run `qvacd start` from your login shell's startup file or under a process"
           " supervisor (tmux, screen, runit, supervisord) instead")


def start_argv(data_dir: Path) -> list[str]:
    """The command the service runs: the `qvacd` console script installed beside this
    Python when there is one (not a shim found on PATH), else this Python with -m."""
    script = Path(sys.executable).parent / "qvacd"
    head = [str(script)] if script.is_file() and os.access(script, os.X_OK) \
        else [sys.executable, "-m", "qvacd.cli"]
    return [*head, "start", "--data-dir", str(data_dir)]


# ---- systemd ------------------------------------------------------------------------


def systemd_quote(arg: str) -> str:
    """One ExecStart word: % and $ escaped (systemd expands them), quoted when needed."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in " \t\n\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(argv: list[str], data_dir: Path) -> str:
    return "\n".join([
        "# written by `qvacd service install`; `qvacd service uninstall` removes it",
        f"# data dir: {data_dir}; options go in its config.toml (`qvacd start --help`)",
        "[Unit]",
        "Description=qvacd peer-to-peer inference daemon",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(systemd_quote(a) for a in argv),
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        # why: the daemon stops cleanly on SIGTERM; give it time to close its streams
        "TimeoutStopSec=20",
        "Environment=PYTHONUNBUFFERED=1",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def systemd_unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


# ---- launchd ------------------------------------------------------------------------


def launchd_plist(argv: list[str], data_dir: Path) -> str:
    log = str(Path.home() / "Library" / "Logs" / "qvacd.log")
    return plistlib.dumps({
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": argv,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart when it exits with a failure
        "ThrottleInterval": RESTART_SEC,
        "WorkingDirectory": str(data_dir),
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
    }).decode()


def launchd_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"


# ---- the platform's service manager -------------------------------------------------


@dataclass
class Manager:
    """The service manager of this platform: where its file goes, what it says, and
    the commands that load, unload and ask about it."""

    kind: str  # "systemd" or "launchd"
    path: Path
    text: str

    def tool(self) -> str:
        return "systemctl" if self.kind == "systemd" else "launchctl"

    def cmd(self, *words: str) -> list[str]:
        return ["systemctl", "--user", *words] if self.kind == "systemd" \
            else ["launchctl", *words]

    def check(self) -> None:
        """CliError (one line, what to do instead) unless the manager can be used."""
        tool = self.tool()
        if shutil.which(tool) is None:
            raise CliError(f"no {tool} on this system, so no login service; {INSTEAD}")
        if self.kind == "systemd":
            r = _call(self.cmd("show-environment"))
            if r.returncode != 0:
                why = _first_line(r) or f"exit status {r.returncode}"
                raise CliError(
                    f"`systemctl --user` cannot reach a user service manager ({why}); "
                    f"{INSTEAD} (or log in to a desktop or ssh session with"
                    " `loginctl enable-linger` and try again)")

    def load(self) -> list[list[str]]:
        if self.kind == "systemd":
            return [self.cmd("daemon-reload"), self.cmd("enable", "--now", UNIT)]
        return [self.cmd("load", "-w", str(self.path))]

    def unload(self) -> list[list[str]]:
        if self.kind == "systemd":
            return [self.cmd("disable", "--now", UNIT)]
        return [self.cmd("unload", "-w", str(self.path))]

    def after_remove(self) -> list[list[str]]:
        return [self.cmd("daemon-reload")] if self.kind == "systemd" else []

    def state(self) -> str:
        """What the manager says: active/inactive/failed/..., or loaded/running."""
        if self.kind == "systemd":
            active = _call(self.cmd("is-active", UNIT)).stdout.strip() or "unknown"
            enabled = _call(self.cmd("is-enabled", UNIT)).stdout.strip() or "unknown"
            return f"{active}, {enabled} at login"
        r = _call(self.cmd("list", LAUNCHD_LABEL))
        if r.returncode != 0:
            return "not loaded"
        return "running" if '"PID" =' in r.stdout else "loaded, not running"


def manager_for(data_dir: Path, platform: str | None = None) -> Manager:
    plat = platform or sys.platform
    argv = start_argv(data_dir)
    if plat == "darwin":
        return Manager("launchd", launchd_path(), launchd_plist(argv, data_dir))
    if plat.startswith("linux"):
        return Manager("systemd", systemd_unit_dir() / UNIT, systemd_unit(argv, data_dir))
    raise CliError(f"no login service support on {plat} (systemd and launchd only); {INSTEAD}")


def _call(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(argv, 127, "", str(e))


def _first_line(r: subprocess.CompletedProcess) -> str:
    for line in (r.stderr or r.stdout or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _run_all(steps: list[list[str]]) -> list[str]:
    """Run each command; the ones that ran, as text. CliError at the first that fails."""
    done = []
    for argv in steps:
        r = _call(argv)
        if r.returncode != 0:
            raise CliError(f"`{' '.join(argv)}` failed: {_first_line(r) or r.returncode}")
        done.append(" ".join(argv))
    return done


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- commands -----------------------------------------------------------------------


def _data_dir(args: argparse.Namespace) -> Path:
    return data_dir_of(args).expanduser().resolve()


def cmd_service_install(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    mgr = manager_for(data_dir, getattr(args, "platform", None))
    if args.dry_run:
        print(f"# {mgr.path}")
        print(mgr.text, end="")
        print("# then: " + "; ".join(" ".join(c) for c in mgr.load()))
        return 0
    mgr.check()
    api = running_daemon_api(data_dir)
    if api and not mgr.path.exists():
        try:
            DaemonClient(f"http://{api}").get_json("/qvac/status")
        except CliError:
            pass  # a stale daemon.json: nothing runs there
        else:
            raise CliError(f"a qvacd daemon already runs on {data_dir} (api {api}); stop it"
                           " first (Ctrl-C, or kill its process), then install the service")
    previous = mgr.path.read_text() if mgr.path.exists() else None
    try:
        _write_atomic(mgr.path, mgr.text)
        done = _run_all(mgr.load())
    except (CliError, OSError) as e:
        _restore(mgr, previous)
        msg = str(e) if isinstance(e, CliError) else f"cannot write {mgr.path} ({e})"
        left = "the previous one is back" if previous is not None else "nothing was left behind"
        raise CliError(f"{msg}; {left}; {INSTEAD}") from None
    print(f"wrote {mgr.path} (runs `qvacd start --data-dir {data_dir}`, restarts on failure)")
    for d in done:
        print(f"ran {d}")
    print(f"state: {mgr.state()}; `qvacd service status` checks it, "
          + ("`journalctl --user -u qvacd` shows its log" if mgr.kind == "systemd"
             else "~/Library/Logs/qvacd.log is its log"))
    if mgr.kind == "systemd":
        print("it starts at login; to keep it running while logged out: "
              "loginctl enable-linger $USER")
    return 0


def _restore(mgr: Manager, previous: str | None) -> None:
    """Undo a failed install: the previous file back, or none at all."""
    try:
        if previous is None:
            mgr.path.unlink(missing_ok=True)
            _wants_link(mgr).unlink(missing_ok=True)
        else:
            _write_atomic(mgr.path, previous)
    except OSError:
        pass
    for argv in mgr.after_remove():
        _call(argv)


def _wants_link(mgr: Manager) -> Path:
    """Where `systemctl enable` links the unit (removed by hand when it cannot run)."""
    return mgr.path.parent / "default.target.wants" / UNIT


def cmd_service_uninstall(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    mgr = manager_for(data_dir, getattr(args, "platform", None))
    if not mgr.path.exists():
        if args.dry_run:
            print(f"# nothing to do: {mgr.path} does not exist")
            return 0
        print(f"no qvacd service installed ({mgr.path} does not exist); nothing to do")
        return 0
    if args.dry_run:
        for c in [*mgr.unload(), *mgr.after_remove()]:
            print(" ".join(c))
        print(f"rm {mgr.path}")
        return 0
    try:
        mgr.check()
    except CliError as e:
        # why: the file alone would start it again at the next login; remove it anyway
        mgr.path.unlink(missing_ok=True)
        if mgr.kind == "systemd":
            _wants_link(mgr).unlink(missing_ok=True)
        raise CliError(f"removed {mgr.path}, but could not stop the service: {e}") from None
    problems = []
    for argv in mgr.unload():
        r = _call(argv)
        if r.returncode != 0:
            problems.append(f"`{' '.join(argv)}`: {_first_line(r) or r.returncode}")
        else:
            print(f"ran {' '.join(argv)}")
    mgr.path.unlink(missing_ok=True)
    if mgr.kind == "systemd":
        _wants_link(mgr).unlink(missing_ok=True)
    print(f"removed {mgr.path}")
    for argv in mgr.after_remove():
        _call(argv)
    if problems:
        raise CliError("the service file is gone, but " + "; ".join(problems))
    return 0


def cmd_service_status(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    mgr = manager_for(data_dir, getattr(args, "platform", None))
    installed = mgr.path.exists()
    print(f"service file: {mgr.path} ({'installed' if installed else 'not installed'})")
    if installed:
        print(f"{mgr.kind}: " + _state_or_reason(mgr))
    try:
        st = DaemonClient.for_args(args).get_json("/qvac/status")
    except CliError:
        print(f"daemon: none answers for {data_dir}")
    else:
        print(f"daemon: running, api http://{st.get('api')}, up {st.get('uptime_s', 0):.0f}s")
    if not installed:
        print("`qvacd service install` runs the daemon at login (`--dry-run` shows the file)")
    return 0


def _state_or_reason(mgr: Manager) -> str:
    if shutil.which(mgr.tool()) is None:
        return f"cannot ask: no {mgr.tool()} here"
    if mgr.kind == "systemd":
        r = _call(mgr.cmd("show-environment"))
        if r.returncode != 0:
            return f"cannot ask systemctl --user ({_first_line(r) or r.returncode})"
    return mgr.state()
