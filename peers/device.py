"""What accelerator (or CPU) this node runs on, and how much memory it has.

`detect_device()` never raises: a capacity record must always be publishable, so every
probe that fails falls back to the next one and finally to the CPU.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEVICE_KINDS = ("cuda", "metal", "vulkan", "cpu")
_SMI_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # one of DEVICE_KINDS
    name: str
    memory_total: int  # bytes
    memory_free: int  # bytes


def detect_device() -> DeviceInfo:
    """Best device on this machine: NVIDIA GPU, Apple GPU (unified memory), else CPU + RAM."""
    for probe in (_probe_pynvml, _probe_nvidia_smi, _probe_metal):
        try:
            info = probe()
        except Exception as exc:  # why: a broken driver must not stop the daemon
            log.debug("device probe %s failed: %s", probe.__name__, exc)
            continue
        if info is not None:
            return info
    try:
        return _probe_cpu()
    except Exception as exc:
        log.debug("cpu probe failed: %s", exc)
        return DeviceInfo("cpu", platform.processor() or "cpu", 0, 0)


def _pick_gpu(gpus: list[DeviceInfo]) -> DeviceInfo | None:
    # why: with several GPUs, a model goes where the most memory is free
    return max(gpus, key=lambda g: (g.memory_free, g.memory_total)) if gpus else None


def _probe_pynvml() -> DeviceInfo | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(DeviceInfo("cuda", str(name), int(mem.total), int(mem.free)))
        return _pick_gpu(gpus)
    finally:
        pynvml.nvmlShutdown()


def parse_nvidia_smi(output: str) -> DeviceInfo | None:
    """Parse the output of `nvidia-smi --query-gpu=name,memory.total,memory.free
    --format=csv,noheader,nounits` (MiB)."""
    gpus = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3:
            continue
        name, total, free = parts
        try:
            mib = 1024 * 1024  # why: nounits reports MiB
            gpus.append(DeviceInfo("cuda", name, int(float(total)) * mib, int(float(free)) * mib))
        except ValueError:
            continue
    return _pick_gpu(gpus)


def _probe_nvidia_smi() -> DeviceInfo | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=_SMI_TIMEOUT_S,
        check=True,
    )
    return parse_nvidia_smi(out.stdout)


def _sysctl(name: str) -> str:
    out = subprocess.run(
        ["sysctl", "-n", name], capture_output=True, text=True, timeout=_SMI_TIMEOUT_S, check=True
    )
    return out.stdout.strip()


def _probe_metal() -> DeviceInfo | None:
    if sys.platform != "darwin":
        return None
    total = int(_sysctl("hw.memsize"))
    try:
        name = _sysctl("machdep.cpu.brand_string") or "Apple GPU"
    except Exception:
        name = "Apple GPU"
    try:
        free = _darwin_free_memory()
    except Exception:
        free = total // 2  # why: unknown; a conservative guess beats claiming all of it
    # Apple silicon shares memory between CPU and GPU, so RAM is the GPU's memory.
    kind = "metal" if platform.machine() == "arm64" else "cpu"
    return DeviceInfo(kind, name, total, min(free, total))


def _darwin_free_memory() -> int:
    out = subprocess.run(
        ["vm_stat"], capture_output=True, text=True, timeout=_SMI_TIMEOUT_S, check=True
    ).stdout
    page = 4096
    pages = 0
    for line in out.splitlines():
        if "page size of" in line:
            page = int(line.split("page size of")[1].split()[0])
        key, _, val = line.partition(":")
        if key.strip() in ("Pages free", "Pages inactive", "Pages speculative"):
            pages += int(val.strip().rstrip("."))
    return pages * page


def parse_meminfo(text: str) -> tuple[int, int] | None:
    """(total, available) bytes from /proc/meminfo text, or None."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key.strip()] = int(fields[0]) * 1024  # kB
    if "MemTotal" not in values:
        return None
    total = values["MemTotal"]
    avail = values.get("MemAvailable", values.get("MemFree", 0))
    return total, avail


def parse_cpu_model(text: str) -> str | None:
    for line in text.splitlines():
        key, _, val = line.partition(":")
        # x86 says "model name"; some ARM kernels say "Model" or "Hardware"
        if key.strip() in ("model name", "Model", "Hardware", "cpu model") and val.strip():
            return val.strip()
    return None


def _probe_cpu() -> DeviceInfo:
    name = None
    try:
        name = parse_cpu_model(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        pass
    if not name:
        name = platform.processor() or platform.machine() or "cpu"
    mem = None
    try:
        mem = parse_meminfo(Path("/proc/meminfo").read_text(errors="replace"))
    except OSError:
        pass
    if mem is None:
        mem = _sysconf_memory()
    total, free = mem
    return DeviceInfo("cpu", name, total, free)


def _sysconf_memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return 0, 0
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        free = total // 2
    return total, free
