"""`qvacd trust` and `qvacd mesh`, run as real CLI subprocesses.

Each CLI call costs about a second (importing libp2p), so independent calls run
side by side through `run_many`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peers.identity import Identity
from peers.mesh import MeshStore
from peers.trust import TRUST_FILE, TrustStore

REPO = Path(__file__).resolve().parent.parent
DAY = 86400.0


def pid() -> str:
    return Identity.generate().peer_id_str


def run_many(*calls: tuple) -> list[subprocess.CompletedProcess]:
    """Run `qvacd ARGS` with QVACD_DATA_DIR=data_dir for each (data_dir, *ARGS[, {"input":
    stdin text}]) call, concurrently."""
    procs = []
    for call in calls:
        opts = call[-1] if isinstance(call[-1], dict) else {}
        data_dir, *args = call[:-1] if opts else call
        env = {k: v for k, v in os.environ.items() if not k.startswith("QVACD_")}
        env["QVACD_DATA_DIR"] = str(data_dir)
        p = subprocess.Popen(
            [sys.executable, "-m", "qvacd.cli", *map(str, args)], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((p, args, opts.get("input")))
    out = []
    for p, args, stdin in procs:
        stdout, stderr = p.communicate(stdin, timeout=60)
        out.append(subprocess.CompletedProcess(args, p.returncode, stdout, stderr))
    return out


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"qvacd {r.args} failed:\n{r.stdout}\n{r.stderr}"
    return r


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, f"qvacd {r.args}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvacd: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------
# trust


def test_trust_add_list_rm_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "node"
    a, b = pid(), pid()
    # two concurrent edits of a file that does not exist yet: the lock keeps both
    r1, r2 = run_many((d, "trust", "add", a, "--roles", "consumer,provider", "--note", "laptop"),
                      (d, "trust", "add", b, "--roles", "seeder"))
    assert a in ok(r1).stdout and b in ok(r2).stdout
    lj, lt = run_many((d, "trust", "list", "--json"), (d, "trust", "list"))
    peers = {p["peer_id"]: p for p in json.loads(ok(lj).stdout)["peers"]}
    assert peers[a]["roles"] == ["consumer", "provider"] and peers[a]["note"] == "laptop"
    assert peers[b]["roles"] == ["seeder"] and peers[b]["added"].endswith("Z")
    text = ok(lt).stdout
    assert "PEER" in text and "ROLES" in text and "NOTE" in text
    assert a in text and "consumer,provider" in text and "laptop" in text and b in text

    r1, r2 = run_many((d, "trust", "rm", a, "--roles", "consumer"), (d, "trust", "rm", b))
    assert "keeps provider" in ok(r1).stdout and "removed" in ok(r2).stdout
    entries = TrustStore.in_dir(d).list()
    assert [(e.peer_id, set(e.roles), e.note) for e in entries] == [(a, {"provider"}, "laptop")]

def test_trust_errors_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    a = pid()
    TrustStore.in_dir(good).add(a, ["consumer"], note="phone")
    before = (good / TRUST_FILE).read_bytes()
    bad.mkdir()
    corrupt = b'{"version": 1, "peers": [\n'
    (bad / TRUST_FILE).write_bytes(corrupt)

    res = run_many(
        (good, "trust", "add", "12D3KooWnotapeer", "--roles", "consumer"),
        (good, "trust", "add", a, "--roles", "consumer,admin"),
        (good, "trust", "add", pid()),  # no --roles
        (good, "trust", "rm", a, "--roles", "root"),
        (bad, "trust", "list"),
        (bad, "trust", "add", a, "--roles", "consumer"),
        (good, "trust", "rm", pid()),
    )
    one_line_error(res[0], "not a valid peer id", "qvacd id")
    one_line_error(res[1], "unknown role 'admin'", "consumer, provider, seeder")
    one_line_error(res[2], "--roles", "consumer,provider,seeder")
    one_line_error(res[3], "unknown role 'root'")
    one_line_error(res[4], str(bad / TRUST_FILE), "not valid JSON")
    one_line_error(res[5], str(bad / TRUST_FILE))
    one_line_error(res[6], "not in the trust file", "trust list")
    assert all(r.stdout == "" for r in res)
    assert (good / TRUST_FILE).read_bytes() == before
    assert (bad / TRUST_FILE).read_bytes() == corrupt


def test_cli_error_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through qvacd.cli.main (not `python -m`), errors still become one line and rc 1."""
    from qvacd.cli import main

    assert main(["trust", "add", "nope", "--roles", "consumer", "--data-dir",
                 str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qvacd: error: not a valid peer id") and err.count("\n") == 1
    assert not (tmp_path / TRUST_FILE).exists()


# ---------------------------------------------------------------------------------------
# mesh


def test_mesh_invite_join_status_revoke(tmp_path: Path) -> None:
    owner, node = tmp_path / "owner", tmp_path / "node"
    init, ident = run_many((owner, "mesh", "init", "--days", "30"), (node, "id"))
    assert "mesh owner" in ok(init).stdout and "mesh invite" in init.stdout
    node_id = ok(ident).stdout.split()[0]

    inv, zero = run_many(
        (owner, "mesh", "invite", node_id, "--roles", "consumer,provider", "--days", "30"),
        (owner, "mesh", "invite", node_id, "--roles", "consumer", "--days", "0"),
    )
    cert = ok(inv).stdout
    assert cert.count("\n") == 1 and cert.startswith("qvac-cert1:")  # only the cert
    one_line_error(zero, "--days 0")
    stranger = pid()
    other = MeshStore(owner).invite(stranger, ["consumer"], 30)
    expired = MeshStore(owner).invite(node_id, ["consumer"], 1, now=time.time() - 3 * DAY)

    j_other, j_expired, j_good = run_many(
        (node, "mesh", "join", other),
        (node, "mesh", "join", expired),
        (node, "mesh", "join", "-", {"input": cert}),
    )
    one_line_error(j_other, f"for peer {stranger}", node_id)
    one_line_error(j_expired, "expired", "new invite")
    assert "joined" in ok(j_good).stdout and "consumer,provider" in j_good.stdout

    s_node, tl = run_many((node, "mesh", "status", "--json"), (owner, "trust", "list", "--json"))
    sn = json.loads(ok(s_node).stdout)
    owner_key = MeshStore(owner).owner_key
    assert sn["in_mesh"] and not sn["is_owner"] and sn["peer_id"] == node_id
    assert owner_key is not None and sn["owner_id"] in init.stdout
    assert sn["certificate"]["roles"] == ["consumer", "provider"]
    assert sn["certificate"]["valid"] and sn["certificate"]["peer_id"] == node_id
    issued = {c["peer_id"]: c for c in json.loads(ok(tl).stdout)["mesh_certificates"]
              if c["state"] == "valid"}
    assert issued[node_id]["roles"] == ["consumer", "provider"] and stranger in issued
    assert MeshStore(node, node_id).roles_for(node_id) == {"consumer", "provider"}
    serial = sn["certificate"]["serial"]

    rv_owner, rv_node = run_many((owner, "mesh", "revoke", node_id),
                                 (node, "mesh", "revoke", str(serial)))
    assert "revoked peer" in ok(rv_owner).stdout and "revoked serial" in ok(rv_node).stdout
    assert node_id in MeshStore(owner).revoked_peers

    s_node, leave = run_many((node, "mesh", "status"), (owner, "mesh", "leave"))
    assert "member of" in ok(s_node).stdout and "NOT VALID" in s_node.stdout
    assert f"serial {serial}" in s_node.stdout and "revoked" in s_node.stdout
    assert MeshStore(node, node_id).roles_for(node_id) == frozenset()
    assert "left the mesh" in ok(leave).stdout and MeshStore(owner).owner_key is None
