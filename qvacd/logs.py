"""How the daemon logs: one logfmt line per record on stderr, and which libraries are quiet.

Kept apart from the CLI so the log format and the per-library levels have one home that
both `qvacd start` and tests can use without importing the command line.
"""

from __future__ import annotations

import logging
import os
import sys
import time

# Libraries that are chatty at INFO; held at WARNING unless --log-level debug. py-libp2p's
# expected events that it logs at WARNING/ERROR anyway (a dial to a gone peer, a reset
# stream) are demoted to DEBUG where they are known: peers/_libp2p_logs.py.
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
    _adopt_libp2p_logger()
    for noisy in NOISY_LOGGERS:  # libp2p and hypercorn are chatty at info
        logging.getLogger(noisy).setLevel(logging.NOTSET if level == "debug" else logging.WARNING)
    # Some py-libp2p modules set their own logger to INFO at import (auto_connector: "initiating
    # 200 new dials" every cycle), which would override the level held above: they inherit.
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if name.startswith("libp2p.") and isinstance(lg, logging.Logger):
            lg.setLevel(logging.NOTSET)


def _adopt_libp2p_logger() -> None:
    """Send py-libp2p's records through our handler like everyone else's.

    why: `import libp2p` configures its own "libp2p" logger once: no handler, level
    WARNING, propagate off. Its warnings and errors then bypassed our format and went
    to stderr bare through logging's last-resort handler (the mesh lab's floods of
    "MultiselectClient handshake: read failed"), and its DEBUG lines never showed, even
    at --log-level debug. Import it first so what we set here is not undone later.
    With LIBP2P_DEBUG set the operator asked for the library's own logging (its file and
    format); leave it alone then."""
    if os.environ.get("LIBP2P_DEBUG"):
        return
    import libp2p  # noqa: F401

    logging.getLogger("libp2p").propagate = True
