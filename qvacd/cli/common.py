"""What every `qvacd` command module shares: the one-line error and the data dir.

A command that cannot do its job raises CliError with one line that says what happened
and what to do; `qvacd.cli.main` prints it as `qvacd: error: ...` and exits 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import add_data_dir_arg, default_data_dir


class CliError(Exception):
    """One line for the user: what went wrong and what to do about it."""


def data_dir_of(args: argparse.Namespace) -> Path:
    """--data-dir, else QVACD_DATA_DIR, else the platform's user data dir."""
    return Path(args.data_dir) if getattr(args, "data_dir", None) else default_data_dir()


def add_client_args(sp: argparse.ArgumentParser) -> None:
    """The options of a command that asks the running daemon: which data dir, which API."""
    add_data_dir_arg(sp)
    sp.add_argument("--api", default=None, help="daemon API HOST:PORT (env QVACD_API)")
