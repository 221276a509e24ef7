"""Where new instances go: their names, devices and ports. Pure functions over what is in use.

Devices: count x tp of one kind (GPUs or CPU slots for vLLM, simulated GPUs for the simulator), never
one that a running instance holds, contiguous where possible; a GPU that another process uses is
refused unless forced. When the request does not fit, the error says what is free.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from mvllmd.errors import Conflict, InvalidRequest, ResourceExhausted
from mvllmd.instances.spec import NAME_RE, EngineKind
from mvllmd.inventory import Device, DeviceKind, Inventory

KIND_WORDS = {DeviceKind.GPU: "gpu", DeviceKind.CPU_SLOT: "cpu-slot", DeviceKind.SIM_GPU: "sim-gpu"}
MAX_INSTANCES = 256


def device_ref(device: Device) -> str:
    return f"{KIND_WORDS[device.kind]}:{device.index}"


def slug(model: str) -> str:
    """A name prefix from the model's last path part: "Qwen/Qwen2.5-7B-Instruct" -> "qwen2-5-7b-instruct"."""
    last = model.rstrip("/").rsplit("/", 1)[-1]
    text = re.sub(r"[^a-z0-9]+", "-", last.lower()).strip("-")[:50].strip("-")
    return text or "instance"


def instance_names(prefix: str, count: int, taken: Collection[str]) -> list[str]:
    """PREFIX-i for the lowest free indexes i."""
    names: list[str] = []
    i = 0
    while len(names) < count:
        name = f"{prefix}-{i}"
        if not NAME_RE.fullmatch(name):
            raise InvalidRequest(f"instance name {name!r} must match [a-z0-9][a-z0-9-]{{0,62}}; choose another --name")
        if name not in taken:
            names.append(name)
        i += 1
    return names


def parse_devices(text: str) -> list[int]:
    """ "4-7" or "0,1,2,3" or "0-1,4-5" -> indexes, in order."""
    indexes: list[int] = []
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InvalidRequest(f"--devices {text!r}: expected indexes such as 4-7 or 0,1,2,3")
        low, high = int(m[1]), int(m[2] or m[1])
        if high < low:
            raise InvalidRequest(f"--devices {text!r}: the range {part} runs backwards")
        indexes.extend(range(low, high + 1))
    if len(set(indexes)) != len(indexes):
        raise InvalidRequest(f"--devices {text!r} names a device twice")
    return indexes


@dataclass(frozen=True)
class Pool:
    kind: DeviceKind
    devices: tuple[Device, ...]  # every device of the kind, by index
    held: dict[str, str]  # device ref -> instance holding it

    def free(self) -> list[Device]:
        return [d for d in self.devices if device_ref(d) not in self.held]


def pool_for(inventory: Inventory, engine: EngineKind, cpu: bool, held: dict[str, str]) -> Pool:
    """The devices an engine runs on: simulated GPUs for the simulator; GPUs for vLLM where the host has
    them (unless `cpu`), else CPU slots."""
    if engine is EngineKind.SIM:
        kind, hint = DeviceKind.SIM_GPU, "--sim-gpus N"
    elif inventory.of_kind(DeviceKind.GPU) and not cpu:
        kind, hint = DeviceKind.GPU, ""
    else:
        kind, hint = DeviceKind.CPU_SLOT, "--cpu-slots N"
    devices = inventory.of_kind(kind)
    if not devices:
        raise ResourceExhausted(f"this host has no {KIND_WORDS[kind]}s; start mvllmd with {hint} to declare some")
    return Pool(kind, devices, held)


def room(pool: Pool, tp: int, force: bool) -> int:
    """How many instances of `tp` devices the pool's free devices hold (as `assign` would place them)."""
    return sum(1 for d in pool.free() if force or not d.processes) // tp


def assign(pool: Pool, count: int, tp: int, explicit: str, force: bool) -> list[tuple[Device, ...]]:
    """Devices for `count` instances of `tp` devices each."""
    word = KIND_WORDS[pool.kind]
    need = count * tp
    if explicit:
        return _explicit(pool, parse_devices(explicit), count, tp, force)
    free = [d for d in pool.free() if force or not d.processes]
    if len(free) < need:
        raise ResourceExhausted(f"{count} x TP{tp} needs {need} {word}s; {len(free)} free: {_describe(pool, force)}")
    groups: list[tuple[Device, ...]] = []
    for _ in range(count):
        group = _contiguous(free, tp) or tuple(free[:tp])
        groups.append(group)
        free = [d for d in free if d not in group]
    return groups


def _explicit(pool: Pool, indexes: list[int], count: int, tp: int, force: bool) -> list[tuple[Device, ...]]:
    word = KIND_WORDS[pool.kind]
    if len(indexes) != count * tp:
        raise InvalidRequest(f"--devices names {len(indexes)} {word}s; {count} x TP{tp} needs {count * tp}")
    by_index = {d.index: d for d in pool.devices}
    chosen = []
    for i in indexes:
        if i not in by_index:
            raise InvalidRequest(f"there is no {word} {i}; this host has {word}s {_ranges(by_index)}")
        device = by_index[i]
        holder = pool.held.get(device_ref(device))
        if holder:
            raise Conflict(f"{word} {i} is held by instance {holder}; free: {_describe(pool, force)}")
        if device.processes and not force:
            pids = ", ".join(str(p.pid) for p in device.processes)
            raise Conflict(f"{word} {i} is in use by process {pids} (not ours); --force takes it anyway")
        chosen.append(device)
    return [tuple(chosen[k * tp : (k + 1) * tp]) for k in range(count)]


def _contiguous(free: Sequence[Device], tp: int) -> tuple[Device, ...] | None:
    for start in range(len(free) - tp + 1):
        run = free[start : start + tp]
        if run[-1].index - run[0].index == tp - 1:
            return tuple(run)
    return None


def _describe(pool: Pool, force: bool) -> str:
    free = [d.index for d in pool.free() if force or not d.processes]
    busy = [f"{d.index} (pid {d.processes[0].pid})" for d in pool.free() if d.processes and not force]
    held = sorted(pool.held.items())
    parts = [f"free {_ranges({i: None for i in free}) or 'none'}"]
    if held:
        parts.append("held " + ", ".join(f"{ref.split(':')[1]} by {name}" for ref, name in held))
    if busy:
        parts.append("used by other processes " + ", ".join(busy))
    return "; ".join(parts)


def _ranges(indexes: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    runs: list[list[int]] = []
    for i in sorted(indexes):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


def pick_ports(host: str, base: int, count: int, taken: Collection[int]) -> list[int]:
    """Ports from `base` upward, skipping those of other instances and those something listens on."""
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if port > 65535:
            raise ResourceExhausted(f"no free port from {base} up to 65535 for {count} instances")
        if port not in taken and _bindable(host, port):
            ports.append(port)
        port += 1
    return ports


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
