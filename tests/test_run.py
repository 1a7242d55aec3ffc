"""`qvacd run MODEL` against a real daemon, typed into a real terminal (tmux).

tmux gives the chat a terminal, so `input()`, line editing and Ctrl-C (SIGINT to the
foreground process) behave as they do for a person; send-keys types, capture-pane
reads the screen. Each test has its own tmux server (-L) so parallel runs and a user's
own tmux are left alone. The one-line errors and the delegated chat (a node without
room for the model, its peer serving) need no terminal: they read piped stdin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import REPO, free_port

MODEL = "gemma3-270m"


class Pane:
    """One tmux pane running a command; it stays after the command exits, so its exit
    status can be read."""

    def __init__(self, command: str, tmp: Path) -> None:
        self.server = f"qvacd-test-{uuid.uuid4().hex[:8]}"
        self.tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "50")
        self.tmux("set-option", "-t", "t", "remain-on-exit", "on")
        self.tmux("respawn-pane", "-k", "-t", "t", command)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.server, *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def type_line(self, text: str) -> None:
        self.keys("-l", text)  # literally: no key names looked up in the text
        self.keys("Enter")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "t", "-S", "-2000")

    def exited(self) -> tuple[bool, str]:
        """(its process has ended, exit status). tmux 3.3a sometimes marks a pane dead
        and never reaps its process (seen under load: a zombie, its status never read);
        then the process must be gone or a zombie, and the status reads "?"."""
        dead, status, signal, pid = self.tmux(
            "display", "-p", "-t", "t",
            "#{pane_dead},#{pane_dead_status},#{pane_dead_signal},#{pane_pid}"
        ).strip().split(",")
        if dead != "1":
            return False, ""
        if status or signal:
            return True, status or f"signal {signal}"
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True, "?"  # gone
        except OSError:  # no /proc here: ask the kernel whether the pid exists
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True, "?"
            return False, ""
        zombie = stat.rsplit(")", 1)[1].split()[0] == "Z"
        return (True, "?") if zombie else (False, "")

    def wait_exit(self, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = self.exited()
            if done:
                return status
            time.sleep(0.1)
        raw = self.tmux("display", "-p", "-t", "t", "#{pane_dead} #{pane_pid}").split()
        ps = subprocess.run(["ps", "-o", "pid,ppid,stat,cmd", "-p", raw[-1]],
                            capture_output=True, text=True).stdout
        raise AssertionError(f"the chat did not exit in {timeout}s (pane dead {raw[0]};"
                             f" {ps}); the screen:\n{self.screen()}")

    def wait(self, cond: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.screen()
            if cond(s):
                return s
            time.sleep(0.1)
        raise AssertionError(f"{what} not seen in {timeout}s; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True)


@pytest.fixture
def pane(tmp_path: Path) -> Iterator[Callable[[str], Pane]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux); the chat needs a terminal")
    made: list[Pane] = []

    def make(api: str, *args: str) -> Pane:
        env = f"cd {REPO} && PYTHONPATH={REPO} exec {sys.executable} -m qvacd.cli run"
        p = Pane(f"{env} {MODEL} --api {api} {' '.join(args)}", tmp_path)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def prompts(screen: str) -> int:
    """How many `>>> ` prompts the screen shows (a bare one at the end is one too)."""
    return sum(1 for line in screen.splitlines() if line.startswith(">>>"))


def busy(api: str) -> int:
    st = httpx.get(api + "/qvac/status", timeout=10).json()
    return st["slots_total"] - st["slots_free"]


def test_chat_streams_keeps_the_conversation_stops_on_ctrl_c_and_exits(start_daemon,
                                                                       pane) -> None:
    d = start_daemon()
    p = pane(d.api.removeprefix("http://"), "--max-tokens", "3000", "--temperature", "0")
    p.wait(lambda s: s.rstrip().endswith(">>>"), "the first prompt")

    # a multi-line question, as in ollama: it opens and closes with """
    p.type_line('"""What is the capital')
    p.wait(lambda s: s.rstrip().endswith("..."), "the continuation prompt")
    p.type_line('of France?"""')
    s = p.wait(lambda s: prompts(s) >= 2, "an answer and a second prompt")
    answer = s.split('of France?"""', 1)[1].split(">>>", 1)[0]
    assert answer.strip(), s  # text came back between the question and the next prompt
    assert "Paris" in answer, s

    # the conversation is kept: the second turn sees the first (alone, this question
    # gets no Paris from this model at temperature 0)
    p.type_line("Say that again.")
    s = p.wait(lambda s: prompts(s) >= 3, "the second answer")
    assert "Paris" in s.split("Say that again.", 1)[1], s

    # a long answer, stopped with Ctrl-C once it is streaming: the prompt comes back,
    # the program stays, and the daemon frees the sequence (the closed stream cancels)
    p.type_line("/clear")  # a fresh conversation: this model answers it at length
    p.wait(lambda s: "conversation cleared" in s, "/clear's answer")
    before = p.screen()
    p.type_line("Write the numbers from 1 to 500, one per line.")
    p.wait(lambda s: len(s) > len(before) + 200, "the long answer streaming")
    assert busy(d.api) == 1, "the answer is not generating any more before Ctrl-C"
    p.keys("C-c")
    s = p.wait(lambda s: prompts(s) >= 5 and s.rstrip().endswith(">>>"),
               "the prompt after Ctrl-C", timeout=15)
    assert p.exited() == (False, ""), s
    deadline = time.monotonic() + 5
    while busy(d.api) and time.monotonic() < deadline:
        time.sleep(0.1)
    st = httpx.get(d.api + "/qvac/status", timeout=10).json()
    assert st["slots_free"] == st["slots_total"], st
    grown = p.screen()
    time.sleep(1.5)
    assert p.screen() == grown, "text still arrives after Ctrl-C"

    p.type_line("/bye")
    assert p.wait_exit() in ("0", "?"), p.screen()


def test_ctrl_c_and_ctrl_d_at_the_prompt_exit(start_daemon, pane) -> None:
    d = start_daemon("--no-preload")
    api = d.api.removeprefix("http://")
    for key in ("C-c", "C-d"):
        p = pane(api)
        p.wait(lambda s: s.rstrip().endswith(">>>"), "the prompt")
        p.keys(key)
        assert p.wait_exit() in ("0", "?"), (key, p.screen())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QVACD_")}
    return subprocess.run([sys.executable, "-m", "qvacd.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, input="")


def test_no_daemon_and_unknown_model_are_one_line(start_daemon, tmp_path: Path) -> None:
    r = run_cli("run", MODEL, "--api", f"127.0.0.1:{free_port()}",
                "--data-dir", str(tmp_path / "none"))
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and "no qvacd daemon answers" in r.stderr, r.stderr
    d = start_daemon("--no-preload")
    r = run_cli("run", "no-such-model", "--api", d.api.removeprefix("http://"))
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and "'no-such-model' is neither here" in r.stderr
    assert MODEL in r.stderr and "qvacd models pull no-such-model" in r.stderr


def test_a_chat_on_a_node_without_room_is_served_by_its_peer(mesh) -> None:
    mesh.add("laptop", "--memory-budget", "64MiB")  # the model does not fit here
    mesh.add("desktop")
    mesh.trust("laptop", "desktop", ["consumer", "provider", "seeder"])
    mesh.trust("desktop", "laptop", ["consumer", "provider", "seeder"])
    mesh.start("desktop")
    small = mesh.start("laptop", bootstrap=["desktop"])
    mesh.wait_peers("laptop", ["desktop"], timeout=30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QVACD_")}
    r = subprocess.run(
        [sys.executable, "-m", "qvacd.cli", "run", MODEL, "-v", "--temperature", "0",
         "--max-tokens", "40", "--api", small.api.removeprefix("http://")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        input='"""What is the capital\nof France?"""\n/bye\n')
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout
    assert f"served by {mesh.ids['desktop']}" in r.stderr, r.stderr
