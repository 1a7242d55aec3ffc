"""How the daemon logs: one logfmt line per record on stderr, and which libraries are quiet.

Kept apart from the CLI so the log format and the per-library levels have one home that
both `qvacd start` and tests can use without importing the command line.
"""

from __future__ import annotations

import logging
import sys
import time

# Libraries that are chatty at INFO; held at WARNING unless --log-level debug.
NOISY_LOGGERS = ("libp2p", "hypercorn", "multiaddr", "async_service")


class _LogfmtFormatter(logging.Formatter):
    """One structured line per record: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage().replace('"', "'")
        line = f'{ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} ' \
               f'logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += ' exc="' + self.formatException(record.exc_info).replace("\n", " | ") + '"'
        return line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if level != "debug":  # libp2p and hypercorn are chatty at info
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
