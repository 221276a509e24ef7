"""`mvllmd install-units`: where units go and what is written into them."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvllmd.errors import ConfigError
from mvllmd.instances.install import install_units, systemd_quote, unit_dir


def test_unit_dirs() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/7", "HOME": "/home/u"}
    assert unit_dir("system", False, env) == Path("/etc/systemd/system")
    assert unit_dir("system", True, env) == Path("/run/systemd/system")
    assert unit_dir("user", False, env) == Path("/home/u/.config/systemd/user")
    assert unit_dir("user", False, {**env, "XDG_CONFIG_HOME": "/cfg"}) == Path("/cfg/systemd/user")
    assert unit_dir("user", True, env) == Path("/run/user/7/systemd/user")
    with pytest.raises(ConfigError, match="XDG_RUNTIME_DIR"):
        unit_dir("user", True, {"HOME": "/home/u"})


@pytest.mark.parametrize(
    ("word", "quoted"),
    [
        ("/usr/bin/mvllmd", "/usr/bin/mvllmd"),
        ("--config", "--config"),
        ("a b", '"a b"'),
        ("$HOME", '"$$HOME"'),
        ("100%", '"100%%"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("", '""'),
    ],
)
def test_systemd_quote(word: str, quoted: str) -> None:
    assert systemd_quote(word) == quoted


@pytest.mark.parametrize("word", ["new\nline", "tab\there", "bell\x07"])
def test_control_characters_never_reach_a_unit(word: str) -> None:
    with pytest.raises(ConfigError, match="control characters"):
        systemd_quote(word)


def test_install_writes_the_rendered_unit(tmp_path: Path) -> None:
    config = tmp_path / "x y.toml"
    (path,) = install_units(tmp_path / "units", config)
    text = path.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(f'--config "{config}"')
    assert "@" not in exec_start
    assert "Type=notify" in text
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir()] == ["mvllmd.service"]  # no temp file left
