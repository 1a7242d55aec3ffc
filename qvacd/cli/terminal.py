"""Text that fits the terminal: short peer ids, folded lines, plain tables that fit.

`qvacd status` and `qvacd peers` are read in 80-column terminals (a laptop split in two,
an ssh session on a phone). A 52-character peer id and a multiaddr holding two of them
are longer than half of that, and a table that the terminal wraps is unreadable. So
every line these commands print passes through here: a peer id is shown as its first 8
and last 4 characters (enough to tell peers apart; `--json` has the whole ids), a list
too long for one line is folded onto indented continuation lines by us, at item
boundaries, and a table narrows its widest columns (cutting cells with an ellipsis)
until it fits.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from collections.abc import Iterable, Sequence

MIN_WIDTH = 40
ELLIPSIS = "…"
_P2P = re.compile(r"/p2p/([1-9A-HJ-NP-Za-km-z]{20,})")


def width() -> int:
    """Columns to fit in: COLUMNS or the terminal's size, else 80 (a pipe, a file)."""
    return max(MIN_WIDTH, shutil.get_terminal_size((80, 24)).columns)


def short_id(peer_id: str) -> str:
    """`12D3KooW…phfT`: the first 8 and last 4 characters of a long peer id."""
    return peer_id if len(peer_id) <= 14 else f"{peer_id[:8]}{ELLIPSIS}{peer_id[-4:]}"


def short_addr(addr: str, own_peer_id: str | None = None) -> str:
    """A multiaddr with its peer ids shortened; a trailing /p2p/<own id> is dropped (the
    status shows that id once, whole)."""
    if own_peer_id and addr.endswith(f"/p2p/{own_peer_id}"):
        addr = addr[: -len(own_peer_id) - 5]
    return _P2P.sub(lambda m: "/p2p/" + short_id(m.group(1)), addr)


def cut(text: str, n: int) -> str:
    """`text` in at most `n` characters, an ellipsis marking the cut."""
    return text if len(text) <= n else text[: max(0, n - 1)] + ELLIPSIS


def wrap(line: str, cols: int, indent: str = "  ") -> list[str]:
    """One logical line as terminal lines of at most `cols`, continuations indented;
    words longer than a line (an address) are broken."""
    if len(line) <= cols:
        return [line]
    return textwrap.wrap(line, cols, subsequent_indent=indent, break_on_hyphens=False,
                         break_long_words=True) or [""]


def fold(head: str, items: Iterable[str], cols: int, sep: str = ", ") -> list[str]:
    """`head` then the items joined by `sep`, continued on lines indented under the first
    item when they do not fit; never splits an item unless it alone is too long."""
    indent = " " * min(len(head), cols // 3)
    lines: list[str] = []
    cur = head
    first = True
    for item in items:
        candidate = cur + ("" if first else sep) + item
        if first or len(candidate) <= cols:
            cur = candidate
        else:
            lines.append(cur + sep.rstrip())
            cur = indent + item
        first = False
    lines.append(cur)
    out: list[str] = []
    for ln in lines:
        out.extend(wrap(ln, cols, indent))
    return out


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cols: int,
          right: Iterable[int] = (), shrink: Iterable[int] | None = None) -> list[str]:
    """A plain table, two spaces between columns, of at most `cols` characters a line:
    while it is too wide the widest column among `shrink` (default: all) is narrowed,
    never below its header, and its cells cut with an ellipsis. `right`: columns of
    numbers, aligned right."""
    right = set(right)
    n = len(header)
    widths = [max([len(header[i]), *(len(r[i]) for r in rows)]) for i in range(n)]
    allowed = list(range(n)) if shrink is None else list(shrink)
    while sum(widths) + 2 * (n - 1) > cols:
        can = [i for i in allowed if widths[i] > max(len(header[i]), 3)]
        if not can:
            break
        i = max(can, key=lambda k: widths[k])
        widths[i] -= 1
    out = []
    for row in [list(header), *[list(r) for r in rows]]:
        cells = [cut(c, w).rjust(w) if i in right else cut(c, w).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return out
