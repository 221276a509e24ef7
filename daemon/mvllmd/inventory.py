"""The host's device inventory: real GPUs (NVML, else nvidia-smi) and the declared kinds.

Real GPUs are read through NVML (the `pynvml` module of nvidia-ml-py). Where NVML cannot be loaded,
`nvidia-smi` is asked instead; a host with neither reports no GPUs. Two declared kinds stand beside
them, each listed as what it is and never as a GPU:

- CPU slots (`[inventory] cpu_slots`): places for CPU engines such as the vLLM CPU build;
- simulated GPUs (`[inventory] sim_gpus`): assignable only to the simulator engine. They have a
  simulated reading (`sim_gpu_usage`) that follows what runs on them: 80 GiB each, in use what the
  instances placed there reserve, busy while one of them runs sequences.

This module imports neither grpc nor the rest of the daemon, so it can be checked on its own on a GPU
host: `python -m mvllmd.inventory` prints what it reads as JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

from mvllmd.errors import InventoryError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
NVIDIA_SMI_TIMEOUT_S = 15.0
SIM_GPU_NAME = "simulated GPU (mvllm-sim only)"
SIM_GPU_MEMORY_BYTES = 80 * 1024 * MIB  # a simulated GPU's memory in its reading: an H100 80GB's (mvllm-sim's default)

GpuSourceChoice = Literal["auto", "nvml", "nvidia-smi", "none"]


class DeviceKind(enum.StrEnum):
    GPU = "gpu"
    CPU_SLOT = "cpu_slot"
    SIM_GPU = "sim_gpu"


class GpuSource(enum.StrEnum):
    NVML = "nvml"
    NVIDIA_SMI = "nvidia-smi"
    NONE = "none"


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    used_memory_bytes: int  # 0 when the driver does not say


@dataclass(frozen=True)
class Device:
    kind: DeviceKind
    index: int
    uuid: str
    name: str
    memory_total_bytes: int = 0
    memory_free_bytes: int = 0
    processes: tuple[GpuProcess, ...] = ()
    instance: str = ""  # the instance holding the device; empty while free


@dataclass(frozen=True)
class Inventory:
    devices: tuple[Device, ...]
    gpu_source: GpuSource

    def of_kind(self, kind: DeviceKind) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.kind is kind)


def read_inventory(gpu_source: GpuSourceChoice = "auto", cpu_slots: int = 0, sim_gpus: int = 0) -> Inventory:
    """Read the real GPUs from `gpu_source` and add the declared devices.

    `auto` tries NVML, then nvidia-smi, then reports none. Naming a source makes its failure an
    `InventoryError`, so a GPU host whose driver broke does not quietly report no GPUs.
    """
    source, gpus = read_gpus(gpu_source)
    return Inventory(devices=gpus + declared_devices(cpu_slots, sim_gpus), gpu_source=source)


def read_gpus(choice: GpuSourceChoice = "auto") -> tuple[GpuSource, tuple[Device, ...]]:
    readers: dict[GpuSource, Callable[[], tuple[Device, ...]]] = {
        GpuSource.NVML: read_nvml,
        GpuSource.NVIDIA_SMI: read_nvidia_smi,
    }
    if choice == "none":
        return GpuSource.NONE, ()
    if choice != "auto":
        source = GpuSource(choice)
        return source, readers[source]()
    for source, reader in readers.items():
        try:
            return source, reader()
        except InventoryError as exc:
            log.debug("no GPUs from %s: %s", source, exc)
    return GpuSource.NONE, ()


def declared_devices(cpu_slots: int, sim_gpus: int) -> tuple[Device, ...]:
    slots = (Device(DeviceKind.CPU_SLOT, i, f"cpu-slot-{i}", "CPU slot (for CPU engines)") for i in range(cpu_slots))
    sims = (Device(DeviceKind.SIM_GPU, i, f"sim-gpu-{i}", SIM_GPU_NAME) for i in range(sim_gpus))
    return (*slots, *sims)


T = TypeVar("T")


# --- NVML -----------------------------------------------------------------------------------------


def read_nvml() -> tuple[Device, ...]:
    return _each_nvml_device(_nvml_device)


def _each_nvml_device(read: Callable[[Any, int], T]) -> tuple[T, ...]:
    """`read(pynvml, index)` of every GPU, NVML opened around it; InventoryError without NVML."""
    try:
        import pynvml  # noqa: PLC0415  (optional at import time: the module must load without it)
    except ImportError as exc:
        raise InventoryError("nvidia-ml-py is not installed") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise InventoryError(f"NVML could not be initialised: {exc}") from exc
    try:
        return tuple(read(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount()))
    except pynvml.NVMLError as exc:
        raise InventoryError(f"NVML failed while reading devices: {exc}") from exc
    finally:
        pynvml.nvmlShutdown()


@dataclass(frozen=True)
class GpuUsage:
    """A GPU's load now, for the metrics (read at each scrape)."""

    index: int
    uuid: str
    name: str
    utilization: float  # share of the last sample period a kernel ran (NVML's gpu utilization), 0 to 1
    memory_used_bytes: int
    memory_total_bytes: int
    kind: DeviceKind = DeviceKind.GPU  # SIM_GPU: a simulated reading (sim_gpu_usage)


def read_gpu_usage() -> tuple[GpuUsage, ...]:
    """Each real GPU's utilisation and memory, through NVML; InventoryError without NVML."""
    return _each_nvml_device(_nvml_usage)


# --- simulated GPUs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimLoad:
    """An instance on simulated GPUs, as their simulated reading follows it."""

    devices: tuple[int, ...]  # the simulated GPUs' indexes
    memory_share: float  # the share of each GPU's memory it reserves (vLLM's --gpu-memory-utilization)
    running: int  # the sequences it runs now (its /metrics)


def sim_gpu_usage(count: int, loads: Iterable[SimLoad]) -> tuple[GpuUsage, ...]:
    """A simulated reading of `count` simulated GPUs: nothing is measured, it follows what runs there.

    Memory: what the instances placed on a GPU reserve, each its `memory_share` of the total (vLLM takes
    its share of every GPU of its group at start, used or not), at most the total. Utilisation: 1 while
    an instance there runs sequences, else 0 (a GPU that runs a batch runs kernels all the time, as
    NVML's figure shows).
    """
    reserved = [0.0] * count
    busy = [False] * count
    for load in loads:
        for index in load.devices:
            if 0 <= index < count:
                reserved[index] += load.memory_share
                busy[index] = busy[index] or load.running > 0
    total = SIM_GPU_MEMORY_BYTES
    used = [int(min(1.0, share) * total) for share in reserved]
    return tuple(
        GpuUsage(i, f"sim-gpu-{i}", SIM_GPU_NAME, float(busy[i]), used[i], total, DeviceKind.SIM_GPU)
        for i in range(count)
    )


def _nvml_usage(nvml: Any, index: int) -> GpuUsage:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
    uuid, name = _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle))
    try:  # used as nvidia-smi shows it: v1 counts the driver's reserve as used (615 MiB on an idle H200)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    except nvml.NVMLError:  # a driver without the v2 reading
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuUsage(index, uuid, name, int(rates.gpu) / 100, int(memory.used), int(memory.total))


def _nvml_device(nvml: Any, index: int) -> Device:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return Device(
        kind=DeviceKind.GPU,
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.free),
        processes=_nvml_processes(nvml, handle),
    )


def _nvml_processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    found: dict[int, GpuProcess] = {}
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            running = query(handle)
        except nvml.NVMLError as exc:  # some GPUs (and MIG setups) refuse one of the two queries
            log.debug("NVML process query %s failed: %s", query.__name__, exc)
            continue
        for proc in running:
            used = proc.usedGpuMemory if isinstance(proc.usedGpuMemory, int) else 0
            found[int(proc.pid)] = GpuProcess(int(proc.pid), _process_name(int(proc.pid)), used)
    return tuple(sorted(found.values(), key=lambda p: p.pid))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _process_name(pid: int) -> str:
    """The short command name from /proc; empty for a process in another PID namespace."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# --- nvidia-smi -----------------------------------------------------------------------------------

GPU_QUERY = ("index", "uuid", "name", "memory.total", "memory.free")
APP_QUERY = ("gpu_uuid", "pid", "process_name", "used_memory")


def read_nvidia_smi() -> tuple[Device, ...]:
    gpus = _run_nvidia_smi("--query-gpu=" + ",".join(GPU_QUERY))
    apps = _run_nvidia_smi("--query-compute-apps=" + ",".join(APP_QUERY))
    return parse_nvidia_smi(gpus, apps)


def _run_nvidia_smi(query: str) -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise InventoryError("nvidia-smi is not on PATH")
    argv = [exe, query, "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InventoryError(f"nvidia-smi failed: {exc}") from exc
    if done.returncode != 0:
        raise InventoryError(f"nvidia-smi exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def parse_nvidia_smi(gpu_csv: str, app_csv: str) -> tuple[Device, ...]:
    """Parse `nvidia-smi --format=csv,noheader,nounits` output of GPU_QUERY and APP_QUERY (MiB)."""
    processes: dict[str, list[GpuProcess]] = {}
    for fields in _csv_rows(app_csv):
        if len(fields) < len(APP_QUERY):
            raise InventoryError(f"unexpected nvidia-smi process line: {', '.join(fields)!r}")
        # A process name may itself hold ", ": the fixed fields are read from both ends.
        uuid, pid, used = fields[0], fields[1], fields[-1]
        name = ", ".join(fields[2:-1])
        processes.setdefault(uuid, []).append(GpuProcess(_int(pid), Path(name).name, _mib(used)))
    devices = []
    for fields in _csv_rows(gpu_csv):
        if len(fields) < len(GPU_QUERY):
            raise InventoryError(f"unexpected nvidia-smi GPU line: {', '.join(fields)!r}")
        index, uuid, total, free = fields[0], fields[1], fields[-2], fields[-1]
        name = ", ".join(fields[2:-2])
        procs = tuple(sorted(processes.get(uuid, []), key=lambda p: p.pid))
        devices.append(Device(DeviceKind.GPU, _int(index), uuid, name, _mib(total), _mib(free), procs))
    return tuple(sorted(devices, key=lambda d: d.index))


def _csv_rows(text: str) -> Iterable[list[str]]:
    for line in text.splitlines():
        if line.strip():
            yield [field.strip() for field in line.split(", ")]


def _int(field: str) -> int:
    try:
        return int(field)
    except ValueError as exc:
        raise InventoryError(f"nvidia-smi gave {field!r} where a number was expected") from exc


def _mib(field: str) -> int:
    """MiB as bytes; nvidia-smi writes "[N/A]" (or "[Not Supported]") when it cannot say."""
    return 0 if field.startswith("[") else _int(field) * MIB


# --- stand-alone check ----------------------------------------------------------------------------


def inventory_as_dict(inventory: Inventory) -> dict[str, Any]:
    return {
        "gpu_source": str(inventory.gpu_source),
        "devices": [dataclasses.asdict(d) for d in inventory.devices],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mvllmd.inventory [auto|nvml|nvidia-smi|none]`: print what the inventory reads."""
    args = list(sys.argv[1:] if argv is None else argv)
    choice = args[0] if args else "auto"
    if choice not in get_args(GpuSourceChoice):
        print(f"usage: python -m mvllmd.inventory [auto|nvml|nvidia-smi|none] (got {choice!r})", file=sys.stderr)
        return 2
    try:
        inventory = read_inventory(cast(GpuSourceChoice, choice))
    except InventoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(inventory_as_dict(inventory), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
