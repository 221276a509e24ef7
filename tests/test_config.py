"""The frozen config: TOML + flags + the env vars that locate directories; every key has a flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mvllmd.addresses import TcpAddress, UnixAddress
from mvllmd.cli import cli
from mvllmd.config import OPTIONS, Config, default_state_dir, load_config
from mvllmd.errors import AddressError, ConfigError

REPO = Path(__file__).resolve().parents[1]
ENV = {"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/u"}


def load(text: str | None = None, tmp: Path | None = None, env: dict[str, str] = ENV, **flags: Any) -> Config:
    path = None
    if text is not None:
        assert tmp is not None
        path = tmp / "c.toml"
        path.write_text(text)
    return load_config(path, flags, env, euid=1000)


def test_defaults() -> None:
    config = load()
    assert config.daemon.listen == (UnixAddress(Path("/run/user/1000/mvllmd/mvllmd.sock"), default=True),)
    assert config.daemon.state_dir == Path("/home/u/.local/state/mvllmd")
    assert config.daemon.unit_manager == "auto"
    assert config.inventory.cpu_slots == 0
    assert config.inventory.sim_gpus == 0
    assert config.daemon.drain_timeout_s == 30.0


def test_default_socket_precedence() -> None:
    systemd = load(env={**ENV, "RUNTIME_DIRECTORY": "/run/mvllmd:/run/other"})
    assert systemd.daemon.listen == (UnixAddress(Path("/run/mvllmd/mvllmd.sock")),)
    root = load_config(None, {}, {"HOME": "/root"}, euid=0)
    assert root.daemon.listen == (UnixAddress(Path("/run/mvllmd/mvllmd.sock"), default=True),)
    with pytest.raises(AddressError, match="XDG_RUNTIME_DIR is not set"):
        load_config(None, {}, {"HOME": "/home/u"}, euid=1000)


def test_default_state_dir_precedence() -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/mvllmd", "XDG_STATE_HOME": "/x"}) == Path("/var/lib/mvllmd")
    assert default_state_dir({"XDG_STATE_HOME": "/x", "HOME": "/h"}) == Path("/x/mvllmd")
    assert default_state_dir({"HOME": "/h"}) == Path("/h/.local/state/mvllmd")


def test_file_then_flags(tmp_path: Path) -> None:
    text = '[daemon]\nlisten = ["127.0.0.1:7070"]\nlog_level = "debug"\n'
    text += "[inventory]\ncpu_slots = 2\nsim_gpus = 8\n"
    config = load(text, tmp_path, **{"inventory.sim_gpus": 4, "daemon.listen": None})
    assert config.daemon.listen == (TcpAddress("127.0.0.1", 7070),)
    assert config.daemon.log_level == "debug"
    assert config.inventory.cpu_slots == 2
    assert config.inventory.sim_gpus == 4  # the flag wins
    assert config.config_file == tmp_path / "c.toml"


def test_config_is_frozen() -> None:
    config = load()
    with pytest.raises(AttributeError):
        config.daemon.state_dir = Path("/elsewhere")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[deamon]\n", "unknown section [deamon]; did you mean 'daemon'?"),
        ("[daemon]\nlissten = []\n", "unknown key 'lissten' in [daemon]; did you mean 'listen'?"),
        ("daemon = 3\n", "daemon must be a table"),
        ('[inventory]\ncpu_slots = "2"\n', "[inventory] cpu_slots: expected an integer, got '2'"),
        ("[inventory]\ncpu_slots = true\n", "expected an integer, got True"),
        ("[inventory]\nsim_gpus = -1\n", "[inventory] sim_gpus: -1 is below the minimum, 0"),
        ('[daemon]\nlisten = "unix:/x"\n', "[daemon] listen: expected a list of strings"),
        ("[daemon]\nlisten = [1]\n", "[daemon] listen: expected a list of strings"),
        ('[daemon]\nunit_manager = "docker"\n', "'docker' is not one of auto, systemd-system"),
        ('[daemon]\nstate_dir = "relative"\n', "state_dir must be an absolute path"),
        ('[daemon]\nsocket_group = "no-such-group-here"\n', "'no-such-group-here' is not a group"),
        ("[daemon]\ndrain_timeout_s = 1e9\n", "above the maximum, 3600"),
    ],
)
def test_invalid_file_values(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(text, tmp_path)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        (["unix:relative.sock"], "needs an absolute path"),
        (["localhost"], "expected unix:/abs/path or host:port"),
        (["127.0.0.1:http"], "the port must be a number"),
        (["::1:7070"], "an IPv6 address goes in brackets"),
        (["10.0.0.5:7070"], "refusing to listen on 10.0.0.5:7070"),
        (["example.com:7070"], "refusing to listen on example.com:7070"),
        (["127.0.0.1:7070", "127.0.0.1:7070"], "listen address given twice"),
        ([f"unix:/{'x' * 120}"], "at most 107 bytes"),
    ],
)
def test_invalid_listen(listen: list[str], message: str) -> None:
    with pytest.raises(AddressError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load(**{"daemon.listen": listen})


def test_loopback_tcp_needs_no_flag_but_others_do() -> None:
    for address in ("127.0.0.1:7070", "[::1]:7070", "localhost:7070", "127.3.4.5:1"):
        assert load(**{"daemon.listen": [address]}).daemon.listen[0].is_loopback  # type: ignore[union-attr]
    open_config = load(**{"daemon.listen": ["0.0.0.0:7070"], "daemon.insecure_tcp": True})
    assert open_config.daemon.listen == (TcpAddress("0.0.0.0", 7070),)
    assert str(load(**{"daemon.listen": ["unix:///tmp/m.sock"]}).daemon.listen[0]) == "unix:/tmp/m.sock"


def test_every_key_has_a_flag() -> None:
    flags = {opt for param in cli.params for opt in param.opts}
    for option in OPTIONS:
        assert option.flag in flags, f"[{option.section}] {option.key} has no flag {option.flag}"


def test_sample_config_loads_and_names_every_key() -> None:
    sample = REPO / "examples" / "mvllmd.toml"
    config = load_config(sample, {}, ENV, euid=1000)
    assert config.daemon.unit_manager == "auto"
    text = sample.read_text()
    for option in OPTIONS:
        assert f"{option.key} =" in text, f"examples/mvllmd.toml does not document {option.name}"


# --- the HTTP front door -------------------------------------------------------------------------


def test_the_front_door_listens_on_loopback_by_default_and_can_be_turned_off() -> None:
    (address,) = load().http.listen
    assert str(address) == "http://127.0.0.1:7080" and not address.tls
    assert load(**{"http.listen": ["none"]}).http.listen == ()
    with pytest.raises(AddressError, match="give it alone"):
        load(**{"http.listen": ["none", "http://127.0.0.1:1"]})
    for bad in ("127.0.0.1:7080", "ftp://127.0.0.1:1", "http://127.0.0.1:1/v1", "http://127.0.0.1:99999"):
        with pytest.raises(AddressError):
            load(**{"http.listen": [bad]})


def test_the_front_door_off_loopback_needs_tls_and_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# clients\nsecret-1\n\nsecret-2\n")
    tokens.chmod(0o600)
    with pytest.raises(AddressError, match="plain http would carry tokens"):
        load(**{"http.listen": ["http://0.0.0.0:7080"], "http.token_file": str(tokens)})
    with pytest.raises(AddressError, match="https needs the daemon's --tls-cert"):
        load(**{"http.listen": ["https://127.0.0.1:7080"]})
    opened = load(**{"http.listen": ["http://0.0.0.0:7080"], "http.insecure_http": True})
    assert str(opened.http.listen[0]) == "http://0.0.0.0:7080"
    assert load(**{"http.token_file": str(tokens)}).http.tokens == {"secret-1", "secret-2"}
    assert "secret" not in repr(load(**{"http.token_file": str(tokens)}))  # never in a log line
    tokens.chmod(0o644)
    with pytest.raises(ConfigError, match="may be read by others"):
        load(**{"http.token_file": str(tokens)})
    empty = tmp_path / "empty"
    empty.write_text("\n# none\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="holds no token"):
        load(**{"http.token_file": str(empty)})
