from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from qvacd.config import ConfigError, add_start_args, load_config, parse_size


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_start_args(p)
    return p.parse_args(argv)


def test_precedence_file_env_flags(tmp_path: Path):
    (tmp_path / "config.toml").write_text('ctx_size = 1024\nslots = 3\nmemory_budget = "1GiB"\n')
    cfg = load_config(parse(["--data-dir", str(tmp_path)]), environ={})
    assert (cfg.ctx_size, cfg.slots, cfg.memory_budget) == (1024, 3, 1 << 30)
    cfg = load_config(parse(["--data-dir", str(tmp_path)]), environ={"QVACD_SLOTS": "5"})
    assert cfg.slots == 5 and cfg.ctx_size == 1024
    cfg = load_config(parse(["--data-dir", str(tmp_path), "--slots", "7", "--no-mdns"]),
                      environ={"QVACD_SLOTS": "5", "QVACD_MDNS": "true"})
    assert cfg.slots == 7 and cfg.mdns is False


def test_repeatable_and_lists(tmp_path: Path):
    cfg = load_config(parse(["--data-dir", str(tmp_path), "--bootstrap", "/ip4/1.2.3.4/tcp/1/p2p/X",
                             "--bootstrap", "/ip4/1.2.3.5/tcp/1/p2p/Y"]), environ={})
    assert len(cfg.bootstrap) == 2


def test_non_loopback_api_needs_token(tmp_path: Path):
    with pytest.raises(ConfigError, match="without a token"):
        load_config(parse(["--data-dir", str(tmp_path), "--api", "0.0.0.0:1234"]), environ={})
    cfg = load_config(parse(["--data-dir", str(tmp_path), "--api", "0.0.0.0:1234"]),
                      environ={"QVACD_API_TOKEN": "s3cret"})
    assert cfg.api_token == "s3cret"
    load_config(parse(["--data-dir", str(tmp_path), "--api", "[::1]:1234"]), environ={})


def test_bad_values_name_the_option(tmp_path: Path):
    with pytest.raises(ConfigError, match="memory_budget"):
        load_config(parse(["--data-dir", str(tmp_path), "--memory-budget", "lots"]), environ={})
    with pytest.raises(ConfigError, match="delegate"):
        load_config(parse(["--data-dir", str(tmp_path)]), environ={"QVACD_DELEGATE": "maybe"})
    (tmp_path / "config.toml").write_text("no_such_option = 1\n")
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(parse(["--data-dir", str(tmp_path)]), environ={})


def test_parse_size():
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_size("1.5 potatoes")
