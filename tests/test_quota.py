"""Per-peer quotas of the infer service (pure logic; the service itself is exercised
against real daemons in test_infer_wire.py and test_delegation.py)."""

from protocol import ErrorCode
from qvacd.services.infer import PeerQuota


def test_concurrent_streams_limit():
    q = PeerQuota(max_streams=2, tokens_per_minute=10_000)
    q.active["p"] = 2
    err = q.check("p", now=0)
    assert err is not None and err.code == ErrorCode.BUSY and err.retry_after >= 1
    assert q.check("other", now=0) is None  # one greedy peer does not block others
    q.active["p"] = 1
    assert q.check("p", now=0) is None


def test_tokens_per_minute_window_slides():
    q = PeerQuota(max_streams=4, tokens_per_minute=100)
    q.spend("p", 60, now=0)
    assert q.check("p", now=1) is None
    q.spend("p", 50, now=10)
    err = q.check("p", now=20)
    assert err is not None and "110 tokens" in err.message
    assert 35 <= err.retry_after <= 41  # until the first spend leaves the window
    assert q.check("p", now=61) is None  # the 60 from t=0 aged out
