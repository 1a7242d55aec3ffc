"""The split planner (qvacd/split_plan.py) and the worker's RPC command guard
(protocol/_layers.py): pure logic, checked without daemons."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from protocol import (
    LAYERS_LIMITS,
    ErrorCode,
    LayersHello,
    LayersReady,
    ProtocolError,
    RpcCommandGuard,
    decode_frame,
    encode_frame,
)
from qvacd.services.layers import version_refusal
from qvacd.split_plan import WORKER_OVERHEAD, Device, ModelNeeds, PlanError, plan_split

MiB = 2**20
NEEDS = ModelNeeds(name="m", n_layers=18, layer_bytes=4 * MiB, kv_layer_bytes=1 * MiB,
                   head_fixed=200 * MiB)


def test_needs_count_weights_kv_and_what_stays_on_the_head() -> None:
    assert NEEDS.per_layer == 5 * MiB
    assert NEEDS.total == 200 * MiB + 18 * 5 * MiB


def test_needs_from_the_real_gguf(model_template: Path) -> None:
    from models.store import ModelStore

    store = ModelStore(model_template)
    info = store.info(store.resolve("gemma3-270m"))
    needs = ModelNeeds.from_gguf("gemma3-270m", info, 4096)
    assert needs.n_layers == info.n_layers == 18
    # the plan's total is the engine's own estimate, split into head part and layers
    assert abs(needs.total - info.memory_estimate(4096)) < 18 * 2
    assert 0 < info.block_tensor_bytes < info.tensor_bytes


def test_equal_speeds_split_evenly_when_both_fit() -> None:
    plan = plan_split(NEEDS, Device("local", 300 * MiB), [Device("w1", 200 * MiB)])
    assert (plan.head.layers, plan.workers[0].layers) == (9, 9)
    assert plan.gpu_layers == 9
    assert plan.workers[0].memory == WORKER_OVERHEAD + 9 * 5 * MiB
    d = plan.to_dict()
    assert [x["first_layer"] for x in d["devices"]] == [0, 9]


def test_memory_caps_a_device_and_the_rest_goes_elsewhere() -> None:
    # the head holds 200 MiB fixed + 4 layers of 5 MiB
    plan = plan_split(NEEDS, Device("local", 222 * MiB), [Device("w1", 500 * MiB)])
    assert plan.head.layers == 4 and plan.workers[0].layers == 14


def test_speed_weights_the_share() -> None:
    plan = plan_split(NEEDS, Device("local", 500 * MiB, 10.0),
                      [Device("w1", 500 * MiB, 20.0)])
    assert plan.head.layers == 6 and plan.workers[0].layers == 12


def test_three_devices_and_a_worker_left_out() -> None:
    plan = plan_split(NEEDS, Device("local", 500 * MiB),
                      [Device("w1", 500 * MiB), Device("tiny", WORKER_OVERHEAD)])
    assert plan.head.layers + sum(p.layers for p in plan.workers) == 18
    assert [p.device.name for p in plan.workers] == ["w1"]  # no room on "tiny"
    assert plan.tensor_split == [float(plan.workers[0].layers)]


def test_a_plan_that_cannot_fit_names_every_device_and_the_needs() -> None:
    with pytest.raises(PlanError) as e:
        plan_split(NEEDS, Device("local", 210 * MiB), [Device("12D3KooWworker", 40 * MiB)])
    msg = str(e.value)
    assert "needs 290 MiB" in msg and "this node has 210 MiB free" in msg
    assert "12D3KooWworker has 40 MiB free" in msg and "\n" not in msg
    with pytest.raises(PlanError, match="no workers|this node has 100 MiB"):
        plan_split(NEEDS, Device("local", 100 * MiB), [])


def test_rpc_version_rule() -> None:
    assert version_refusal((7, 0, 0), (7, 0, 0)) is None
    assert version_refusal((7, 0, 0), (7, 1, 3)) is None
    msg = version_refusal((8, 0, 0), (7, 0, 0))
    assert msg and "8.0.0" in msg and "7.0.0" in msg and "same llama-cpp-python" in msg
    assert version_refusal((7, 2, 0), (7, 1, 0))


# ---- the worker's check of the head's RPC bytes ------------------------------------------


def _cmd(cmd: int, payload: bytes) -> bytes:
    return bytes([cmd]) + struct.pack("<Q", len(payload)) + payload


HELLO = _cmd(14, bytes(24))


def test_guard_passes_real_commands_split_anywhere() -> None:
    stream = HELLO + _cmd(11, struct.pack("<I", 0)) + _cmd(6, b"x" * 1000) + _cmd(10, b"g" * 50)
    for cut in range(1, len(stream)):
        g = RpcCommandGuard(max_command=4096)
        g.feed(stream[:cut])
        g.feed(stream[cut:])
        assert g.commands == 4 and g.bytes == len(stream)


@pytest.mark.parametrize("stream, code, what", [
    (_cmd(11, b"\0\0\0\0"), ErrorCode.PROTOCOL, "first RPC command must be HELLO"),
    (_cmd(14, bytes(23)), ErrorCode.PROTOCOL, "first RPC command must be HELLO"),
    (HELLO + _cmd(19, b""), ErrorCode.PROTOCOL, "unknown RPC command 19"),
    (HELLO + _cmd(200, b""), ErrorCode.PROTOCOL, "unknown RPC command 200"),
    (HELLO + _cmd(14, bytes(24)), ErrorCode.PROTOCOL, "second RPC HELLO"),
    (HELLO + bytes([6]) + struct.pack("<Q", 2**63), ErrorCode.TOO_LARGE, "exceeds"),
])
def test_guard_refuses_bad_commands(stream: bytes, code: ErrorCode, what: str) -> None:
    g = RpcCommandGuard(max_command=1 << 20)
    with pytest.raises(ProtocolError) as e:
        g.feed(stream)
    assert e.value.code == code and what in e.value.message
    with pytest.raises(ProtocolError):  # stays failed
        g.feed(b"")


def test_guard_size_limit_is_the_memory_granted() -> None:
    g = RpcCommandGuard(max_command=1000)
    g.feed(HELLO + _cmd(6, b"x" * 1000))
    with pytest.raises(ProtocolError, match="1001 bytes exceeds the 1000 bytes granted"):
        g.feed(_cmd(6, b"x" * 1001))


# ---- the opening frames (golden vectors: docs/protocol.md) ---------------------------------

HELLO_VECTOR = (
    "860186a174a66c68656c6c6fa97270635f6d616a6f7207a97270635f6d696e6f7200a97270635f70617463"
    "6800a66d656d6f7279ce0c800000ac6d6f64656c5f736861323536d940" + "61" * 64)
READY_VECTOR = (
    "4486a174a66c7265616479a97270635f6d616a6f7207a97270635f6d696e6f7200a97270635f70617463"
    "6800a66d656d6f7279ce0c800000ab686f6c64735f6d6f64656cc3")


def test_golden_vectors() -> None:
    hello = LayersHello(7, 0, 0, 200 * MiB, "a" * 64)
    ready = LayersReady(7, 0, 0, 200 * MiB, True)
    assert encode_frame(hello).hex() == HELLO_VECTOR
    assert encode_frame(ready).hex() == READY_VECTOR
    assert decode_frame(bytes.fromhex(HELLO_VECTOR), LAYERS_LIMITS)[0] == hello
    assert decode_frame(bytes.fromhex(READY_VECTOR), LAYERS_LIMITS)[0] == ready


@pytest.mark.parametrize("kwargs, match", [
    ({"memory": 0}, "LayersHello.memory"),
    ({"rpc_major": 256}, "LayersHello.rpc_major"),
    ({"model_sha256": "A" * 64}, "64 lowercase hex"),
    ({"probe": 1}, "LayersHello.probe must be a bool"),
])
def test_hello_fields_are_checked(kwargs: dict, match: str) -> None:
    base = {"rpc_major": 7, "rpc_minor": 0, "rpc_patch": 0, "memory": 1}
    with pytest.raises(ProtocolError, match=match):
        LayersHello(**{**base, **kwargs})


def test_oversized_opening_frame_is_refused() -> None:
    big = encode_frame(LayersHello(7, 0, 0, 1, "a" * 64))[1:] + b"\0" * 9000
    frame = bytes([0x80 | (len(big) & 0x7F), len(big) >> 7]) + big
    with pytest.raises(ProtocolError) as e:
        decode_frame(frame, LAYERS_LIMITS)
    assert e.value.code == ErrorCode.TOO_LARGE
