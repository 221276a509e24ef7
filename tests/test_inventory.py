"""The device inventory: nvidia-smi parsing, the declared kinds, and a host without GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mvllmd.errors import InventoryError
from mvllmd.inventory import (
    MIB,
    DeviceKind,
    GpuProcess,
    GpuSource,
    declared_devices,
    parse_nvidia_smi,
    read_gpus,
    read_inventory,
)

REPO = Path(__file__).resolve().parents[1]

# Real nvidia-smi output (format=csv,noheader,nounits) of a two-GPU host, one busy GPU.
GPUS = """\
0, GPU-5f1c2a3b-0000-1111-2222-333344445555, NVIDIA H100 80GB HBM3, 81559, 1234
1, GPU-6a2d3b4c-0000-1111-2222-333344445555, NVIDIA H100 80GB HBM3, 81559, 81003
"""
APPS = """\
GPU-5f1c2a3b-0000-1111-2222-333344445555, 4242, /usr/bin/python3, 80000
GPU-5f1c2a3b-0000-1111-2222-333344445555, 77, /opt/my, odd, name, [N/A]
"""


def test_parse_nvidia_smi() -> None:
    gpu0, gpu1 = parse_nvidia_smi(GPUS, APPS)
    assert gpu0.kind is DeviceKind.GPU
    assert (gpu0.index, gpu0.name) == (0, "NVIDIA H100 80GB HBM3")
    assert gpu0.uuid == "GPU-5f1c2a3b-0000-1111-2222-333344445555"
    assert gpu0.memory_total_bytes == 81559 * MIB
    assert gpu0.memory_free_bytes == 1234 * MIB
    assert gpu0.processes == (GpuProcess(77, "my, odd, name", 0), GpuProcess(4242, "python3", 80000 * MIB))
    assert gpu1.processes == ()


@pytest.mark.parametrize(("gpus", "apps"), [("0, GPU-x, name\n", ""), (GPUS, "GPU-x, notapid, p, 1\n")])
def test_parse_nvidia_smi_rejects_garbage(gpus: str, apps: str) -> None:
    with pytest.raises(InventoryError):
        parse_nvidia_smi(gpus, apps)


def test_declared_devices_are_never_gpus() -> None:
    devices = declared_devices(cpu_slots=2, sim_gpus=3)
    assert [d.kind for d in devices] == [DeviceKind.CPU_SLOT] * 2 + [DeviceKind.SIM_GPU] * 3
    assert [d.uuid for d in devices] == ["cpu-slot-0", "cpu-slot-1", "sim-gpu-0", "sim-gpu-1", "sim-gpu-2"]
    assert all(d.processes == () and d.instance == "" for d in devices)


def test_this_host_has_no_gpus() -> None:
    # This machine has neither the NVML library nor nvidia-smi: auto reports none, it does not fail.
    source, gpus = read_gpus("auto")
    assert (source, gpus) == (GpuSource.NONE, ())
    inventory = read_inventory("auto", cpu_slots=1, sim_gpus=0)
    assert inventory.of_kind(DeviceKind.GPU) == ()
    assert len(inventory.of_kind(DeviceKind.CPU_SLOT)) == 1


def test_a_named_source_that_fails_is_an_error() -> None:
    with pytest.raises(InventoryError, match="NVML"):
        read_gpus("nvml")
    with pytest.raises(InventoryError, match="nvidia-smi"):
        read_gpus("nvidia-smi")


def test_importable_and_runnable_without_grpc() -> None:
    # The GPU check runs this module on a host with nvidia-ml-py but no grpc: block grpc and see.
    code = (
        "import sys; sys.modules['grpc'] = None; sys.modules['google.protobuf'] = None\n"
        "from mvllmd import inventory; sys.exit(inventory.main(['auto']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "daemon"), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"gpu_source": "none", "devices": []}
