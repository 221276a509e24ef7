"""The committed stubs are what grpcio-tools makes of the committed .proto files, byte for byte."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"


def test_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    sources = sorted(PROTOS.glob("mvllm/v1/*.proto"))
    assert sources, "no .proto files found"
    (tmp_path / "mvllm" / "v1").mkdir(parents=True)
    for source in sources:
        shutil.copy(source, tmp_path / "mvllm" / "v1")
    args = [
        f"-I{tmp_path}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
    ]
    relative = [str(s.relative_to(PROTOS)) for s in sources]
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *args, *relative],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    fresh = sorted(p.name for p in (tmp_path / "mvllm" / "v1").glob("*_pb2*"))
    committed = sorted(p.name for p in (PROTOS / "mvllm" / "v1").glob("*_pb2*"))
    assert fresh == committed, "stubs are missing or stale: run `make protos` and commit them"
    for name in fresh:
        assert filecmp.cmp(tmp_path / "mvllm" / "v1" / name, PROTOS / "mvllm" / "v1" / name, shallow=False), (
            f"{name} differs from a fresh generation: run `make protos` and commit it"
        )


def test_buf_standard_naming() -> None:
    """What buf's STANDARD lint checks and can be read off the descriptors: names and prefixes."""
    from mvllm.v1 import daemon_pb2

    file = daemon_pb2.DESCRIPTOR
    assert file.package == "mvllm.v1"
    for service in file.services_by_name.values():
        assert service.name.endswith("Service")
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
    for enum in file.enum_types_by_name.values():
        prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_")
        assert enum.values[0].name == f"{prefix}_UNSPECIFIED"
        assert all(v.name.startswith(prefix + "_") for v in enum.values)
