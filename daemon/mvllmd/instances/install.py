"""`mvllmd install-units`: render the unit sources in systemd/ and install them for a systemd manager.

Only two values are filled in: the absolute path of this mvllmd and, when given, `--config FILE`. Both
are quoted by `systemd_quote`, so no text reaches the unit file unescaped.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from mvllmd.errors import ConfigError

Scope = Literal["system", "user"]
UNITS = ("mvllmd.service",)
_PLAIN = re.compile(r"[A-Za-z0-9_./:=@+,-]+")


def unit_dir(scope: Scope, runtime: bool, environ: Mapping[str, str]) -> Path:
    """Where units go: the manager's persistent directory, or its runtime one (gone at reboot)."""
    if scope == "system":
        return Path("/run/systemd/system" if runtime else "/etc/systemd/system")
    if runtime:
        xdg_runtime = environ.get("XDG_RUNTIME_DIR", "")
        if not xdg_runtime:
            raise ConfigError("--user --runtime needs XDG_RUNTIME_DIR, the user manager's runtime directory")
        return Path(xdg_runtime) / "systemd" / "user"
    config_home = environ.get("XDG_CONFIG_HOME", "") or str(Path(environ.get("HOME", "~")).expanduser() / ".config")
    return Path(config_home) / "systemd" / "user"


def systemd_quote(arg: str) -> str:
    """Quote one command-line word for ExecStart= (systemd.service(5), "Command lines")."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in arg):
        raise ConfigError(f"{arg!r}: control characters cannot go into a unit file")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(arg):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def mvllmd_executable() -> Path:
    """The mvllmd console script beside this interpreter (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).with_name("mvllmd")
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("mvllmd")
    if found is None:
        raise ConfigError("cannot find the mvllmd executable to put in ExecStart=; is mvllm installed?")
    return Path(found).absolute()


def render_text(name: str, replacements: dict[str, str]) -> str:
    """A unit source from systemd/ with each @FIELD@ replaced by an already quoted value."""
    text = importlib.resources.files("mvllmd.units").joinpath(name).read_text()
    for field, value in replacements.items():
        text = text.replace(field, value)
    return text


def render(name: str, exec_start: Sequence[str]) -> str:
    return render_text(name, {"@EXEC_START@": " ".join(systemd_quote(a) for a in exec_start)})


def install_units(target: Path, config_file: Path | None) -> list[Path]:
    """Write the rendered units into `target` (created if missing) and return their paths."""
    argv = [str(mvllmd_executable())]
    if config_file is not None:
        argv += ["--config", str(config_file.absolute())]
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in UNITS:
        path = target / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(render(name, argv))
        os.chmod(tmp, 0o644)
        tmp.replace(path)  # a manager never reads a half-written unit
        written.append(path)
    return written


def reload_manager(scope: Scope) -> str | None:
    """`systemctl [--user] daemon-reload`; None when it worked, else what went wrong."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return "systemctl is not installed"
    argv = [systemctl, *(["--user"] if scope == "user" else []), "daemon-reload"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else done.stderr.strip() or f"exit status {done.returncode}"
