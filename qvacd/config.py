"""Daemon configuration: one declaration per option, read from TOML, then QVACD_*
environment variables, then command-line flags (later wins).

Each option is declared once in OPTIONS; the argparse flags, the environment variable
names, the TOML keys and `qvacd start --help` all come from that table, so they
cannot drift apart.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs


class ConfigError(Exception):
    """Bad configuration; one line that names the option and what to do."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'512MiB', '1.5G', '2gb', '1048576' -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    try:
        return int(float(text))  # plain numbers, including 40e6
    except ValueError:
        pass
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (try 512MiB or 2GiB)")
    n = float(m.group(1))
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(n * mult)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:11435)")
    return host.strip("[]"), int(port)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{v!r} is not true or false")


def _list(v: Any) -> list[str]:
    if isinstance(v, list):
        return [str(x) for x in v]
    return [x.strip() for x in str(v).split(",") if x.strip()]


def _choice(*choices: str):
    def conv(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
        return s

    return conv


@dataclass(frozen=True)
class Option:
    name: str  # attribute and TOML key
    conv: Any  # str -> value
    default: Any
    help: str
    kind: str = "value"  # value | flag (bool, with --no-x) | append (repeatable)
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "QVACD_" + self.name.upper()


OPTIONS: list[Option] = [
    Option("api", str, "127.0.0.1:11435", "HTTP API address (OpenAI + Ollama)", metavar="HOST:PORT"),
    Option("api_token", str, "", "bearer token required on the HTTP API; needed to listen beyond loopback", metavar="TOKEN"),
    Option("memory_budget", parse_size, 0, "memory models may use, e.g. 4GiB (default: half the available RAM, or free VRAM)", metavar="SIZE"),
    Option("ctx_size", int, 4096, "context length (tokens) of one sequence, i.e. one request", metavar="N"),
    Option("parallel", int, 0, "sequences per model decoded together (continuous batching); 0: as many as the memory budget holds, up to 8", metavar="N"),
    Option("slots", int, 0, "older name of --parallel (used when --parallel is not set)", metavar="N"),
    Option("queue_size", int, 16, "requests that may wait for a free sequence, per model; more get 429", metavar="N"),
    Option("threads", int, 0, "CPU threads for inference (0: all cores)", metavar="N"),
    Option("gpu_layers", int, -2, "layers to offload to the GPU (-1 all, 0 none, -2 auto)", metavar="N"),
    Option("preload", _bool, True, "load the default model at start so the first request is fast", kind="flag"),
    Option("default_model", _bool, True, "register the bundled default model (gemma3-270m) on first start", kind="flag"),
    Option("listen", _list, ["/ip4/0.0.0.0/tcp/4001"], "libp2p listen multiaddr (repeatable; port 0 picks one)", kind="append", metavar="MULTIADDR"),
    Option("bootstrap", _list, [], "peer to join through, MULTIADDR/p2p/PEERID (repeatable)", kind="append", metavar="MULTIADDR"),
    Option("mdns", _bool, True, "find peers on the LAN with mDNS", kind="flag"),
    Option("p2p", _bool, True, "run the peer-to-peer side at all", kind="flag"),
    Option("delegate", _choice("auto", "never", "always"), "auto", "route requests to trusted peers: auto (when this device cannot), never, always", metavar="POLICY"),
    Option("overflow", _bool, True, "when local slots are busy, send to a free trusted peer instead of queueing", kind="flag"),
    Option("public_donor", _bool, False, "serve inference to any peer, trusted or not (a donor box)", kind="flag"),
    Option("peer_max_streams", int, 2, "concurrent inference streams one peer may hold here", metavar="N"),
    Option("peer_tokens_per_minute", int, 20000, "tokens one peer may generate here per minute", metavar="N"),
    Option("shard_max_uploads", int, 4, "model-file uploads served to peers at once", metavar="N"),
    Option("shard_upload_rate", parse_size, 0, "upload cap for model files, bytes/s, e.g. 50MiB (0: none)", metavar="SIZE"),
    Option("layers_memory", parse_size, 0, "memory this node offers for layers of split models placed by peers with the layers role, e.g. 1GiB (0: none); set aside from --memory-budget, local models get the rest", metavar="SIZE"),
    Option("layers_idle_timeout", int, 600, "seconds a layer session may stay silent before this node ends it", metavar="S"),
    Option("relay", _list, [], "relay to reserve a slot on and be reached through, MULTIADDR/p2p/PEERID (repeatable)", kind="append", metavar="MULTIADDR"),
    Option("relay_service", _bool, False, "relay connections for peers behind NAT (circuit relay v2)", kind="flag"),
    Option("relay_allow", _list, [], "peer ids that may reserve a slot on this relay (repeatable; none: anyone, within the limits)", kind="append", metavar="PEERID"),
    Option("relay_max_reservations", int, 32, "reservations this relay holds at once", metavar="N"),
    Option("relay_reservation_ttl", int, 3600, "seconds a reservation on this relay lasts before it must be renewed", metavar="S"),
    Option("relay_circuit_duration", int, 3600, "seconds one relayed connection may last (0: no limit)", metavar="S"),
    Option("relay_circuit_bytes", parse_size, 1 << 30, "bytes one relayed connection may carry, both ways, e.g. 1GiB (0: no limit)", metavar="SIZE"),
    Option("relay_dht_max", int, 2, "relays found in the DHT to reserve on when this node is private and has no working reservation (0: never look)", metavar="N"),
    Option("hole_punch", _bool, True, "upgrade relayed connections to direct ones by hole punching (DCUtR)", kind="flag"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "info", "log verbosity", metavar="LEVEL"),
]


@dataclass(frozen=True)
class Config:
    data_dir: Path
    api: str = "127.0.0.1:11435"
    api_token: str = ""
    memory_budget: int = 0
    ctx_size: int = 4096
    parallel: int = 0
    slots: int = 0
    queue_size: int = 16
    threads: int = 0
    gpu_layers: int = -2
    preload: bool = True
    default_model: bool = True
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = True
    p2p: bool = True
    delegate: str = "auto"
    overflow: bool = True
    public_donor: bool = False
    peer_max_streams: int = 2
    peer_tokens_per_minute: int = 20000
    shard_max_uploads: int = 4
    shard_upload_rate: int = 0
    layers_memory: int = 0
    layers_idle_timeout: int = 600
    relay: list[str] = field(default_factory=list)
    relay_service: bool = False
    relay_allow: list[str] = field(default_factory=list)
    relay_max_reservations: int = 32
    relay_reservation_ttl: int = 3600
    relay_circuit_duration: int = 3600
    relay_circuit_bytes: int = 1 << 30
    relay_dht_max: int = 2
    hole_punch: bool = True
    log_level: str = "info"

    @property
    def api_host_port(self) -> tuple[str, int]:
        return parse_hostport(self.api)

    @property
    def sequences(self) -> int:
        """Parallel sequences per model; 0: chosen from the memory budget."""
        return self.parallel or self.slots

    def validate(self) -> None:
        host, port = self.api_host_port
        if not (0 <= port <= 65535):
            raise ConfigError(f"--api port {port} is out of range")
        if not _is_loopback(host) and not self.api_token:
            raise ConfigError(
                f"refusing to serve the API on {host}, beyond this machine, without a token;"
                " set api_token (QVACD_API_TOKEN or --api-token) or use --api 127.0.0.1:PORT"
            )
        if self.ctx_size < 1:
            raise ConfigError("ctx_size must be at least 1")
        for name in ("parallel", "slots"):
            if not 0 <= getattr(self, name) <= 256:
                raise ConfigError(f"{name} must be between 0 (automatic) and 256")
        if self.queue_size < 0:
            raise ConfigError("queue_size must be 0 or more")
        for name in ("relay_max_reservations", "relay_reservation_ttl"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.relay_dht_max < 0:
            raise ConfigError("relay_dht_max must be 0 (never look) or more")
        for name in ("relay_circuit_duration", "relay_circuit_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (no limit) or more")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_data_dir() -> Path:
    env = os.environ.get("QVACD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("qvacd", appauthor=False))


def add_data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where models, identity and trust live (env QVACD_DATA_DIR)")


def add_start_args(p: argparse.ArgumentParser) -> None:
    add_data_dir_arg(p)
    p.add_argument("--config", type=Path, default=None,
                   help="TOML config file (default: DATA_DIR/config.toml; env QVACD_CONFIG)")
    for opt in OPTIONS:
        help_ = f"{opt.help} [env {opt.env}; default {opt.default!r}]"
        if opt.kind == "flag":
            p.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_)
        elif opt.kind == "append":
            p.add_argument(opt.flag, dest=opt.name, action="append", default=None,
                           metavar=opt.metavar, help=help_)
        else:
            p.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.metavar,
                           help=help_)


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Config:
    environ = dict(os.environ if environ is None else environ)
    data_dir = Path(args.data_dir) if getattr(args, "data_dir", None) else default_data_dir()
    cfg_path = getattr(args, "config", None) or environ.get("QVACD_CONFIG")
    cfg_path = Path(cfg_path) if cfg_path else data_dir / "config.toml"
    values: dict[str, Any] = {}
    known = {o.name: o for o in OPTIONS}
    if cfg_path.exists():
        try:
            toml = tomllib.loads(cfg_path.read_text())
        except (tomllib.TOMLDecodeError, OSError) as e:
            raise ConfigError(f"{cfg_path}: cannot read config ({e}); fix or remove it") from e
        for key, val in toml.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{cfg_path}: unknown option {key!r}; see `qvacd start --help`")
            values[name] = ("file", val)
    elif getattr(args, "config", None):
        raise ConfigError(f"config file {cfg_path} does not exist")
    for opt in OPTIONS:
        if opt.env in environ:
            values[opt.name] = (opt.env, environ[opt.env])
        cli = getattr(args, opt.name, None)
        if cli is not None:
            if opt.kind == "append":
                cli = [x for item in cli for x in _list(item)]
            values[opt.name] = (opt.flag, cli)
    kwargs: dict[str, Any] = {}
    for name, (src, raw) in values.items():
        opt = known[name]
        try:
            kwargs[name] = opt.conv(raw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{opt.name} (from {src}): {e}") from e
    valid = {f.name for f in fields(Config)}
    cfg = Config(data_dir=data_dir, **{k: v for k, v in kwargs.items() if k in valid})
    cfg.validate()
    return cfg
