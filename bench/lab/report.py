"""The lab's report: Markdown tables (figures, not prose), a PNG chart of tokens/s and
time to first token per scenario, and one of delegated TTFT against RTT with its bound
(matplotlib, Agg backend)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.lab.scenarios import Result


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|").replace("\n", " ")
                                      for c in cols) + " |")
    return out


def write_markdown(path: Path, results: list[Result], meta: dict[str, str],
                   chart: Path | None, figures: dict[str, Path] | None = None) -> None:
    """`figures`: scenario name -> an image shown under that scenario's table."""
    lines = ["# qvacd mesh lab report", "",
             "Written by `python -m bench.lab`; every figure below was measured by that run.", ""]
    lines += _table([{"": k, " ": v} for k, v in meta.items()])
    lines += ["", "## Summary", ""]
    lines += _table([{"scenario": r.title, "result": r.verdict, "figures": r.summary,
                      "time s": f"{r.seconds:.0f}", "limit s": f"{r.limit_s:.0f}"}
                     for r in results])
    if chart is not None:
        rel = os.path.relpath(chart, path.parent)
        lines += ["", f"![tokens/s and time to first token per scenario]({rel})"]
    for r in results:
        lines += ["", f"## {r.title}: {r.verdict}", ""]
        lines += _table(r.rows)
        if figures and r.name in figures:
            rel = os.path.relpath(figures[r.name], path.parent)
            lines += ["", f"![{r.title}]({rel})"]
        if r.failures:
            lines += ["", "| failed check |", "|---|"]
            lines += ["| " + f.replace("|", "\\|").replace("\n", " ")[:600] + " |"
                      for f in r.failures]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_chart(path: Path, results: list[Result]) -> str | None:
    """Draw the chart; None when done, else why not (matplotlib missing, nothing to draw)."""
    points = [p for r in results for p in r.points]
    if not points:
        return "no scenario with tokens/s or TTFT figures ran"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]'"
    groups: list[str] = []
    series: list[str] = []
    for g, s, _, _ in points:
        if g not in groups:
            groups.append(g)
        if s not in series:
            series.append(s)
    val = {(g, s): (t, f) for g, s, t, f in points}
    colors = {s: f"C{k}" for k, s in enumerate(series)}
    fig, axes = plt.subplots(1, 2, figsize=(max(12, 1.2 * len(groups) + 5), 5.8))
    for ax, idx, title, scale in ((axes[0], 0, "tokens/s (higher is better)", 1.0),
                                  (axes[1], 1, ("time to first token, ms, log scale (lower is"
                                                " better; failover: kill/cut to next token)"),
                                   1e3)):
        labelled: set[str] = set()
        for j, g in enumerate(groups):
            present = [s for s in series if val.get((g, s), (None, None))[idx] is not None]
            width = 0.8 / max(1, len(present))
            for k, s in enumerate(present):
                v = val[(g, s)][idx] * scale
                x = j + (k - (len(present) - 1) / 2) * width
                bars = ax.bar([x], [v], width, color=colors[s],
                              label=None if s in labelled else s)
                labelled.add(s)
                ax.bar_label(bars, fmt="%.0f", fontsize=7)
        if idx == 1:
            ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("qvacd mesh lab", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _num(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _span(text: str | None) -> tuple[float | None, float | None]:
    """"12–80" -> (12.0, 80.0); (None, None) when absent."""
    lo, _, hi = (text or "").partition("–")
    return _num(lo), _num(hi)


def write_ttft_chart(path: Path, results: list[Result]) -> str | None:
    """Delegated minus local TTFT against RTT, with each row's bound and issue 16's
    1.3 RTT + 15 ms line; None when drawn, else why not."""
    rows = [row for r in results if r.name == "delegation" for row in r.rows]
    pts = [(_num(row.get("RTT ms")), _num(row.get("TTFT delta ms")), _num(row.get("bound ms")),
            row.get("network", ""), _span(row.get("delta spread ms"))) for row in rows]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if not pts:
        return "the delegation scenario did not run"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]'"
    fig, ax = plt.subplots(figsize=(7, 4.6))
    top = max(p[0] for p in pts) * 1.1 + 10
    ax.plot([0, top], [15, 1.3 * top + 15], "--", color="C3", label="1.3 × RTT + 15 ms")
    ax.plot([0, top], [0, top], ":", color="grey", label="1 × RTT")
    for rtt, delta, bound, name, (lo, hi) in pts:
        ax.scatter([rtt], [delta], color="C0", zorder=3)
        if lo is not None and hi is not None:  # the per-pair spread around the median
            ax.errorbar([rtt], [delta], yerr=[[max(0.0, delta - lo)], [max(0.0, hi - delta)]],
                        color="C0", capsize=3, lw=0.8, zorder=3)
        ax.annotate(f"{name}: {delta:.0f} ms", (rtt, delta), textcoords="offset points",
                    xytext=(6, -10), fontsize=7)
        if bound is not None:
            ax.scatter([rtt], [bound], marker="_", s=200, color="C1", zorder=2)
    ax.scatter([], [], marker="_", s=200, color="C1", label="this row's bound")
    ax.scatter([], [], color="C0", label="delegated − local TTFT (median of pairs, min–max)")
    ax.set_xlabel("round-trip time between the two hosts, ms")
    ax.set_ylabel("TTFT delta, ms")
    ax.set_title("delegated TTFT over local against RTT", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def machine_meta() -> dict[str, str]:
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
