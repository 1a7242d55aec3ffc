"""qvacd/pull/lanes.py, the pull's lane count per provider, driven by a fake clock and
fake providers: a capped uplink per provider (another lane on an uncapped one adds rate,
on a capped one nothing), and a CPU-bound pull (the aggregate is the same however many
lanes: loopback, where extra lanes and providers only cost)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qvacd.pull.lanes import LanePlan

MB = 1_000_000
TICK = 0.25


def plan(providers: list[str], **kw: object) -> LanePlan:
    args: dict = {"start_lanes": 4, "max_per_provider": 4, "max_total": 16, "now": 0.0}
    args.update(kw)
    return LanePlan(providers, **args)


def run(p: LanePlan, rate_of: Callable[[dict[str, int]], dict[str, float]], seconds: float,
        start: float = 0.0) -> float:
    """Feed `p` what each provider delivers (bytes/s, given the lanes wanted) for
    `seconds`, ticking like the puller's steer task; returns the clock at the end."""
    now = start
    while now < start + seconds - 1e-9:
        for peer, r in rate_of(dict(p.want)).items():
            if p.lanes(peer):
                p.delivered(peer, int(r * TICK))
        now += TICK
        p.tick(now)
    return now


def capped(caps: dict[str, float], per_lane: float) -> Callable[[dict[str, int]], dict[str, float]]:
    """Each provider gives `per_lane` per lane up to its uplink cap."""
    return lambda want: {p: min(caps[p], per_lane * n) for p, n in want.items()}


def cpu_bound(total: float) -> Callable[[dict[str, int]], dict[str, float]]:
    """The puller's CPU is the limit: `total` split by lanes, however many there are."""
    def rates(want: dict[str, int]) -> dict[str, float]:
        lanes = sum(want.values())
        return {p: total * n / lanes for p, n in want.items()}
    return rates


def test_a_pull_starts_with_one_providers_lanes_spread_over_all_each_tried():
    assert plan(["a"]).want == {"a": 4}
    assert plan(["a", "b"]).want == {"a": 2, "b": 2}
    assert plan(["a", "b", "c"]).want == {"a": 2, "b": 1, "c": 1}
    # more providers than starting lanes: every one still gets a lane, so a liar or a
    # staller among them is found at once
    six = plan(list("abcdef"))
    assert six.want == dict.fromkeys("abcdef", 1)
    assert plan(["a"], start_lanes=9, max_per_provider=4).want == {"a": 4}
    assert plan(list("ab"), start_lanes=12, max_per_provider=4, max_total=5).total() == 5


def test_cpu_bound_pull_takes_back_the_lane_that_added_nothing_and_waits():
    p = plan(["a", "b", "c"], cooldown_s=8.0)
    now = run(p, cpu_bound(50 * MB), 1.0)  # first window: a trial lane starts
    assert p.total() == 5 and p.trial is not None
    now = run(p, cpu_bound(50 * MB), 1.0, now)  # the same rate with it: taken back
    assert p.total() == 4 and p.taken_back == 1 and p.kept == 0
    now = run(p, cpu_bound(50 * MB), 7.0, now)  # held for the cooldown
    assert p.total() == 4 and p.taken_back == 1
    run(p, cpu_bound(50 * MB), 30.0, now)
    # a trial every cooldown, each taken back: never more than one lane over the start
    assert p.kept == 0 and p.taken_back >= 3
    assert p.total() in (4, 5)


def test_lanes_are_added_while_they_add_rate_and_go_where_delivery_per_lane_is_best():
    # a and b can carry 40 MB/s each, c only 4; one lane carries 8 MB/s
    p = plan(["a", "b", "c"], cooldown_s=5.0)
    rates = capped({"a": 40 * MB, "b": 40 * MB, "c": 4 * MB}, 8 * MB)
    run(p, rates, 40.0)
    assert p.want["a"] == 4 and p.want["b"] == 4, p.want  # the cap per provider
    assert p.want["c"] == 1, p.want  # its one lane fills its uplink; more add nothing
    assert p.kept >= 5


def test_capped_providers_keep_their_one_lane_each_and_trials_are_taken_back():
    p = plan(["a", "b", "c"])
    rates = capped(dict.fromkeys("abc", 4 * MB), 8 * MB)  # one lane fills each uplink
    run(p, rates, 30.0)
    assert p.kept == 0 and p.taken_back >= 2
    assert p.total() <= 5
    assert all(n >= 1 for n in p.want.values())


def test_a_dropped_provider_hands_its_lanes_to_the_others():
    p = plan(["a", "b", "c"])
    p.drop("a")
    assert "a" not in p.want and p.lanes("a") == 0
    assert p.total() == 4 and set(p.want) == {"b", "c"}
    p.drop("b")
    assert p.want == {"c": 4}
    p.drop("c")
    assert p.want == {} and p.total() == 0
    assert p.tick(100.0) is False  # nothing left to steer, no error


def test_a_trial_on_a_provider_that_is_then_dropped_is_forgotten():
    p = plan(["a", "b"], start_lanes=2)
    run(p, capped({"a": 100 * MB, "b": 100 * MB}, 8 * MB), 1.5)
    assert p.trial is not None
    p.drop(p.trial.peer)
    assert p.trial is None


def test_a_window_waits_for_enough_bytes_unless_it_is_long():
    p = plan(["a"], start_lanes=1, min_window_bytes=16 * MB, max_window_s=4.0)
    p.delivered("a", 1 * MB)
    assert p.tick(1.5) is False and p.window_bytes == 1 * MB  # too few bytes, still open
    assert p.tick(4.0) is True  # long enough: judged on what came, a trial starts
    assert p.last_rate == pytest.approx(1 * MB / 4.0)


def test_a_provider_that_delivered_nothing_gets_no_trial_lane():
    p = plan(["a", "b"], start_lanes=2)
    for t in range(1, 9):
        p.delivered("b", 4 * MB)  # a stalls: nothing from it
        p.tick(t * 0.5)
    assert p.want["a"] == 1
