"""Compare mvllmd's GPU inventory with nvidia-smi on a real GPU host.

It needs neither grpc nor vLLM: only the inventory and placement modules, nvidia-ml-py, and PyTorch for
the busy-GPU step (skipped without it). From the repository root:

    PYTHONPATH=daemon python3 scripts/gpu_inventory_check.py [--hold-gib 4] [--json result.json]

Steps:
1. nvidia-smi's own table (header and units, parsed here, apart from mvllmd's parser) against the
   inventory read through NVML and through nvidia-smi: index, UUID, name, total and free memory.
2. The utilisation readings (`read_gpu_usage`, what /metrics and `mvllmctl top` show) against nvidia-smi's
   utilization.gpu and memory.used.
3. A child process takes --hold-gib GiB on GPU 0 and keeps it computing. Both readings must list it (PID,
   memory), free memory must drop by about as much, placement must refuse that GPU unless forced, and the
   utilisation readings must show it busy, as nvidia-smi does.
4. The child ends; the GPU must read free and idle again.

It prints a table of checks and exits 0 when all pass, 1 when one fails.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mvllmd.errors import ResourceExhausted
from mvllmd.instances.placement import Pool, assign
from mvllmd.inventory import (
    MIB,
    Device,
    DeviceKind,
    GpuUsage,
    Inventory,
    inventory_as_dict,
    read_gpu_usage,
    read_inventory,
)

GIB = 1024 * MIB
FREE_SLACK = 256 * MIB  # free memory moves between two readings; the driver's own use is small
UTIL_SLACK = 0.2  # NVML's utilisation is a share of its last sample period; two readings are apart in time
BUSY = 0.5  # a GPU that multiplies matrices back to back reads near 1; below this it is not seen busy
HOLDER = """
import sys, time, torch
x = torch.empty(int(sys.argv[1]) * 1024**3, dtype=torch.uint8, device="cuda:0")
x.fill_(1)
a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda:0")
torch.cuda.synchronize()
print("ready", flush=True)
end = time.monotonic() + 600
while time.monotonic() < end:  # busy: matrix products back to back, about 1.5 ms each on an H100-class GPU
    for _ in range(20):
        b = a @ a
    torch.cuda.synchronize()
"""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def smi_csv(query: str) -> list[dict[str, str]]:
    """One nvidia-smi query with header and units, as a user reads it: a dict per row."""
    exe = shutil.which("nvidia-smi") or "nvidia-smi"
    done = subprocess.run([exe, query, "--format=csv"], capture_output=True, text=True, check=True)
    rows = list(csv.reader(io.StringIO(done.stdout), skipinitialspace=True))
    header = [h.split(" [")[0] for h in rows[0]]
    return [dict(zip(header, row, strict=True)) for row in rows[1:]]


def smi_table() -> list[dict[str, str]]:
    return smi_csv("--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,driver_version")


def smi_usage() -> list[dict[str, str]]:
    return smi_csv("--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total")


def smi_apps() -> list[dict[str, str]]:
    return smi_csv("--query-compute-apps=gpu_uuid,pid,process_name,used_memory")


def mib(text: str) -> int:
    return int(text.removesuffix(" MiB")) * MIB


def timed_read(source: str) -> tuple[Inventory, float]:
    start = time.perf_counter()
    inventory = read_inventory(source)  # type: ignore[arg-type]
    return inventory, time.perf_counter() - start


def identity_checks(table: list[dict[str, str]], gpus: Sequence[Device | GpuUsage], label: str) -> list[Check]:
    """As many GPUs as nvidia-smi lists, each with its index, UUID and name."""
    checks = [Check(f"{label}: GPU count", len(gpus) == len(table), f"{len(gpus)} read, nvidia-smi {len(table)}")]
    for row, gpu in zip(table, gpus, strict=False):
        want = (int(row["index"]), row["uuid"], row["name"])
        got = (gpu.index, gpu.uuid, gpu.name)
        checks.append(Check(f"{label}: GPU {gpu.index} index/uuid/name", got == want, f"{got} vs {want}"))
    return checks


def compare(table: list[dict[str, str]], inventory: Inventory, label: str) -> list[Check]:
    gpus = inventory.of_kind(DeviceKind.GPU)
    checks = identity_checks(table, gpus, label)
    for row, gpu in zip(table, gpus, strict=False):
        total_diff = abs(gpu.memory_total_bytes - mib(row["memory.total"]))
        checks.append(
            Check(
                f"{label}: GPU {gpu.index} total memory",
                total_diff < MIB,
                f"{gpu.memory_total_bytes / MIB:.1f} MiB vs {row['memory.total']}",
            )
        )
        free_diff = abs(gpu.memory_free_bytes - mib(row["memory.free"]))
        checks.append(
            Check(
                f"{label}: GPU {gpu.index} free memory",
                free_diff < FREE_SLACK,
                f"{gpu.memory_free_bytes / MIB:.0f} MiB vs {row['memory.free']}",
            )
        )
    return checks


def percent(text: str) -> float:
    return int(text.removesuffix(" %")) / 100


def usage_checks(table: list[dict[str, str]], usage: tuple[GpuUsage, ...], label: str) -> list[Check]:
    """read_gpu_usage against nvidia-smi's utilization.gpu and memory.used, read just before."""
    checks = identity_checks(table, usage, label)
    for row, gpu in zip(table, usage, strict=False):
        smi_util = percent(row["utilization.gpu"])
        checks.append(
            Check(
                f"{label}: GPU {gpu.index} utilisation",
                0 <= gpu.utilization <= 1 and abs(gpu.utilization - smi_util) <= UTIL_SLACK,
                f"{gpu.utilization:.0%} vs {row['utilization.gpu']}",
            )
        )
        used_diff = abs(gpu.memory_used_bytes - mib(row["memory.used"]))
        total_diff = abs(gpu.memory_total_bytes - mib(row["memory.total"]))
        checks.append(
            Check(
                f"{label}: GPU {gpu.index} memory used/total",
                used_diff < FREE_SLACK and total_diff < MIB,
                f"{gpu.memory_used_bytes / MIB:.0f}/{gpu.memory_total_bytes / MIB:.0f} MiB vs "
                f"{row['memory.used']}/{row['memory.total']}",
            )
        )
    return checks


def busy_usage_checks(usage: tuple[GpuUsage, ...], hold: int, idle_used: int) -> list[Check]:
    gpu0 = usage[0]
    rise = gpu0.memory_used_bytes - idle_used
    return [
        Check("usage while computing: GPU 0 busy", gpu0.utilization >= BUSY, f"{gpu0.utilization:.0%}"),
        Check("usage while computing: memory used rose", rise >= hold, f"by {rise / MIB:.0f} MiB"),
    ]


def holder_checks(inventory: Inventory, label: str, pid: int, hold: int, idle_free: int) -> list[Check]:
    gpu0 = inventory.of_kind(DeviceKind.GPU)[0]
    pids = {p.pid: p for p in gpu0.processes}
    listed = pid in pids
    checks = [
        Check(f"{label}: holder listed on GPU 0", bool(gpu0.processes), f"processes {sorted(pids)}; holder pid {pid}"),
        Check(f"{label}: holder's PID is ours", listed, "same PID namespace" if listed else "PIDs differ"),
    ]
    if listed:
        used = pids[pid].used_memory_bytes
        checks.append(
            Check(f"{label}: holder's memory", used >= hold, f"{used / MIB:.0f} MiB (holds {hold / MIB:.0f} MiB)")
        )
    drop = idle_free - gpu0.memory_free_bytes
    checks.append(Check(f"{label}: free memory dropped", drop >= hold, f"by {drop / MIB:.0f} MiB"))
    return checks


def placement_checks(inventory: Inventory) -> list[Check]:
    gpus = inventory.of_kind(DeviceKind.GPU)
    pool = Pool(DeviceKind.GPU, gpus, {})
    try:
        assign(pool, len(gpus), 1, "", force=False)
        refused = Check("placement refuses a busy GPU", False, "all GPUs were assigned")
    except ResourceExhausted as exc:
        refused = Check("placement refuses a busy GPU", "used by other processes" in str(exc), str(exc))
    forced = assign(pool, len(gpus), 1, "", force=True)
    return [refused, Check("placement --force takes it", len(forced) == len(gpus), f"{len(forced)} assigned")]


def free_again(inventory: Inventory, idle_free: int) -> list[Check]:
    gpu0: Device = inventory.of_kind(DeviceKind.GPU)[0]
    back = abs(gpu0.memory_free_bytes - idle_free) < FREE_SLACK
    return [
        Check("after the holder: no processes on GPU 0", not gpu0.processes, f"{len(gpu0.processes)} listed"),
        Check("after the holder: free memory back", back, f"{gpu0.memory_free_bytes / MIB:.0f} MiB"),
    ]


def idle_again() -> tuple[GpuUsage, ...]:
    """GPU 0's usage once its utilisation has fallen back (NVML averages over its last sample period)."""
    usage = read_gpu_usage()
    for _ in range(20):
        if usage[0].utilization < BUSY:
            break
        time.sleep(0.5)
        usage = read_gpu_usage()
    return usage


def start_holder(gib: int) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(gib)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise SystemExit(f"the GPU memory holder did not start (it said {line!r}, exit {child.wait()})")
    return child


def busy_step(hold: int, idle_free: int, idle_used: int, report: dict[str, Any]) -> list[Check]:
    """A child holds `hold` bytes of GPU 0 and computes; the readings must see it, and see it go."""
    checks: list[Check] = []
    holder = start_holder(hold // GIB)
    try:
        report["holder_pid"] = holder.pid
        report["busy_nvidia_smi_apps"] = smi_apps()
        for source in ("nvml", "nvidia-smi"):
            busy, _ = timed_read(source)
            report[f"busy_{source}"] = inventory_as_dict(busy)
            checks += holder_checks(busy, source, holder.pid, hold, idle_free)
        checks += placement_checks(read_inventory("nvml"))
        time.sleep(1.5)  # NVML's utilisation covers its last sample period (up to a second)
        report["busy_usage_nvidia_smi"] = smi_usage()
        busy_usage = read_gpu_usage()
        report["busy_usage"] = [u.__dict__ for u in busy_usage]
        checks += usage_checks(report["busy_usage_nvidia_smi"], busy_usage, "usage while computing")
        checks += busy_usage_checks(busy_usage, hold, idle_used)
    finally:
        holder.kill()
        holder.wait()
    after = read_inventory("nvml")
    for _ in range(20):  # the driver takes a moment to let go of a killed process's memory
        if not after.of_kind(DeviceKind.GPU)[0].processes:
            break
        time.sleep(0.5)
        after = read_inventory("nvml")
    report["after_nvml"] = inventory_as_dict(after)
    checks += free_again(after, idle_free)
    after_usage = idle_again()
    report["after_usage"] = [u.__dict__ for u in after_usage]
    checks.append(
        Check("after the holder: GPU 0 idle", after_usage[0].utilization < BUSY, f"{after_usage[0].utilization:.0%}")
    )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hold-gib", type=int, default=4, help="GiB the busy-GPU step takes on GPU 0")
    parser.add_argument("--json", help="write the readings and checks to this file")
    args = parser.parse_args()
    if shutil.which("nvidia-smi") is None:
        print("nvidia-smi is not on PATH: this check needs a GPU host", file=sys.stderr)
        return 2

    report: dict[str, Any] = {"nvidia_smi": smi_table()}
    checks: list[Check] = []
    idle: dict[str, Inventory] = {}
    for source in ("nvml", "nvidia-smi", "auto"):
        inventory, seconds = timed_read(source)
        idle[source] = inventory
        report[f"idle_{source}"] = inventory_as_dict(inventory) | {"read_s": round(seconds, 4)}
    checks.append(Check("auto picks NVML", str(idle["auto"].gpu_source) == "nvml", str(idle["auto"].gpu_source)))
    table = report["nvidia_smi"]
    for source in ("nvml", "nvidia-smi"):
        checks += compare(table, idle[source], source)
    report["usage_nvidia_smi"] = smi_usage()
    idle_usage = read_gpu_usage()
    report["usage_idle"] = [u.__dict__ for u in idle_usage]
    checks += usage_checks(report["usage_nvidia_smi"], idle_usage, "usage")

    if importlib.util.find_spec("torch") is None:  # only the busy-GPU step needs it
        checks.append(Check("busy-GPU step", True, "skipped: no PyTorch here"))
    else:
        idle_free = idle["nvml"].of_kind(DeviceKind.GPU)[0].memory_free_bytes
        checks += busy_step(args.hold_gib * GIB, idle_free, idle_usage[0].memory_used_bytes, report)

    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}")
    for source in ("nvml", "nvidia-smi", "auto"):
        print(f"read through {source}: {report[f'idle_{source}']['read_s'] * 1000:.1f} ms")
    report["checks"] = [c.__dict__ for c in checks]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
