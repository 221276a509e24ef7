"""mvllmd's configuration: one frozen object, built once at start-up from TOML, flags and a few env vars.

Precedence: a flag beats the config file, which beats the default. Every key has a flag (OPTIONS lists
them), and OPTIONS is the one home of every default: elsewhere they are read from it by name
(`defaults(JobSettings, "jobs")`, `DEFAULTS["jobs.stop_drain_s"]`), never written again. The only
environment variables read are those that locate directories (systemd's RUNTIME_DIRECTORY and
STATE_DIRECTORY, XDG_RUNTIME_DIR, XDG_STATE_HOME, HOME); they are read here and nowhere deeper.
Invalid input raises ConfigError or AddressError, naming the key and what it expects.
"""

from __future__ import annotations

import difflib
import grp
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from mvllmd.addresses import (
    HttpAddress,
    ListenAddress,
    check_http_policy,
    check_tcp_policy,
    default_socket,
    first_path,
    parse_address,
    parse_http_address,
)
from mvllmd.errors import AddressError, ConfigError
from mvllmd.hosts.membership import HostEntry, host_entry, parse_host
from mvllmd.inventory import GpuSourceChoice
from mvllmd.tls import TlsFiles, tls_files

LogLevel = Literal["debug", "info", "warning", "error"]
UnitManagerChoice = Literal["auto", "systemd-system", "systemd-user", "process"]

S = TypeVar("S")
MAX_DECLARED_DEVICES = 4096
TLS_KEYS = ("tls_cert", "tls_key", "tls_client_ca")


@dataclass(frozen=True)
class Option:
    """One config key: `[section] key`, its type, default, and the flag that sets it."""

    section: str
    key: str
    kind: type
    default: Any
    flag: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


OPTIONS: tuple[Option, ...] = (
    Option("daemon", "listen", list, [], "--listen"),
    Option("daemon", "state_dir", str, "", "--state-dir"),
    Option("daemon", "socket_group", str, "", "--socket-group"),
    Option("daemon", "insecure_tcp", bool, False, "--insecure-tcp"),
    Option("daemon", "tls_cert", str, "", "--tls-cert"),
    Option("daemon", "tls_key", str, "", "--tls-key"),
    Option("daemon", "tls_client_ca", str, "", "--tls-client-ca"),
    Option("daemon", "drain_timeout_s", float, 30.0, "--drain-timeout", minimum=0, maximum=3600),
    Option("daemon", "log_level", str, "info", "--log-level", choices=("debug", "info", "warning", "error")),
    Option(
        "daemon",
        "unit_manager",
        str,
        "auto",
        "--unit-manager",
        choices=("auto", "systemd-system", "systemd-user", "process"),
    ),
    Option("inventory", "cpu_slots", int, 0, "--cpu-slots", minimum=0, maximum=MAX_DECLARED_DEVICES),
    Option("inventory", "sim_gpus", int, 0, "--sim-gpus", minimum=0, maximum=MAX_DECLARED_DEVICES),
    Option("inventory", "gpu_source", str, "auto", "--gpu-source", choices=("auto", "nvml", "nvidia-smi", "none")),
    Option("engine.vllm", "python", str, "", "--vllm-python"),
    Option("engine", "hf_home", str, "", "--hf-home"),
    Option("engine", "hf_token_file", str, "", "--hf-token-file"),
    Option("instances", "port_base", int, 8000, "--port-base", minimum=1024, maximum=65535),
    Option("instances", "probe_interval_s", float, 2.0, "--probe-interval", minimum=0.05, maximum=600),
    Option("instances", "hang_timeout_s", float, 30.0, "--hang-timeout", minimum=0.5, maximum=3600),
    Option("instances", "max_restarts", int, 5, "--max-restarts", minimum=0, maximum=1000),
    Option("instances", "start_timeout_s", float, 1800.0, "--start-timeout", minimum=1, maximum=86400),
    Option("instances", "weight_updates", bool, False, "--weight-updates"),
    Option("jobs", "max_running", int, 4, "--max-running-jobs", minimum=1, maximum=1000),
    Option("jobs", "max_concurrent", int, 1024, "--job-max-concurrent", minimum=1, maximum=1_000_000),
    Option("jobs", "endpoint_max_num_seqs", int, 256, "--endpoint-max-num-seqs", minimum=1, maximum=100_000),
    Option("jobs", "hang_timeout_s", float, 120.0, "--job-hang-timeout", minimum=1, maximum=86400),
    Option("jobs", "stop_drain_s", float, 20.0, "--job-stop-drain", minimum=0, maximum=3600),
    Option("http", "listen", list, ["http://127.0.0.1:7080"], "--http-listen"),
    Option("http", "token_file", str, "", "--http-token-file"),
    Option("http", "insecure_http", bool, False, "--insecure-http"),
    Option("http", "session_idle_s", float, 600.0, "--http-session-idle", minimum=1, maximum=86400),
    Option("http", "sticky_factor", float, 2.0, "--http-sticky-factor", minimum=1, maximum=1000),
    Option("http", "reserve", float, 0.1, "--http-reserve", minimum=0, maximum=0.9),
    Option("fleet", "name", str, "", "--fleet-name"),
    Option("fleet", "hosts", list, [], "--fleet-host"),  # NAME=HOST:PORT; in the file, [[fleet.hosts]] tables
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class DaemonSettings:
    listen: tuple[ListenAddress, ...]
    state_dir: Path
    socket_group: str  # empty: the daemon's own group
    insecure_tcp: bool
    drain_timeout_s: float
    log_level: LogLevel
    unit_manager: UnitManagerChoice
    tls: TlsFiles | None = None  # TLS on every TCP listener; None: plaintext (loopback only)


@dataclass(frozen=True)
class InventorySettings:
    cpu_slots: int
    sim_gpus: int
    gpu_source: GpuSourceChoice


@dataclass(frozen=True)
class EngineSettings:
    vllm_python: Path | None  # the interpreter of the vLLM environment
    hf_home: Path | None  # passed to engines as HF_HOME
    hf_token_file: Path | None  # its content is passed to engines as HF_TOKEN, never logged


@dataclass(frozen=True)
class InstanceSettings:
    port_base: int
    probe_interval_s: float
    hang_timeout_s: float  # counters still this long and a probe request unanswered: UNHEALTHY
    max_restarts: int  # restarts within RESTART_WINDOW_S before an instance is FAILED
    start_timeout_s: float  # not READY this long after a (re)start: FAILED
    weight_updates: bool  # instances launched with vLLM's development routes on, unless a launch says


@dataclass(frozen=True)
class JobSettings:
    max_running: int  # jobs running at once; more wait QUEUED
    max_concurrent: int  # a job's samples in flight, unless it says
    endpoint_max_num_seqs: int  # the batch limit assumed for servers named by URL
    hang_timeout_s: float  # an endpoint with requests in flight that completes nothing this long is hung
    stop_drain_s: float  # on cancel or SIGTERM, how long requests in flight may finish


DEFAULTS: Mapping[str, Any] = {o.name: o.default for o in OPTIONS}  # the one home of every default


@dataclass(frozen=True)
class HttpSettings:
    listen: tuple[HttpAddress, ...]  # empty: no front door
    tokens: frozenset[str] = field(default=frozenset(), repr=False)  # from token_file; never logged
    insecure_http: bool = False
    session_idle_s: float = DEFAULTS["http.session_idle_s"]
    sticky_factor: float = DEFAULTS["http.sticky_factor"]
    reserve: float = DEFAULTS["http.reserve"]  # of each server's capacity, left free by jobs for the front door


@dataclass(frozen=True)
class FleetSettings:
    name: str = ""  # this host's name; empty: its certificate's, else the host name
    hosts: tuple[HostEntry, ...] = ()  # the peers of the config file and flags


def defaults(kind: type[S], section: str) -> S:
    """Settings of one section, every field at its default (OPTIONS)."""
    return _section(kind, section, DEFAULTS)


def _section(kind: type[S], section: str, values: Mapping[str, Any]) -> S:
    """A section's settings from the checked values: each field is the key of the same name."""
    return kind(**{f.name: values[f"{section}.{f.name}"] for f in fields(kind)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Config:
    daemon: DaemonSettings
    inventory: InventorySettings
    engine: EngineSettings = EngineSettings(None, None, None)
    instances: InstanceSettings = field(default_factory=lambda: defaults(InstanceSettings, "instances"))
    jobs: JobSettings = field(default_factory=lambda: defaults(JobSettings, "jobs"))
    config_file: Path | None = None
    http: HttpSettings = HttpSettings(())  # built by load_config; () here: no front door
    fleet: FleetSettings = FleetSettings()


def load_config(
    config_file: Path | None,
    overrides: Mapping[str, Any],
    environ: Mapping[str, str],
    euid: int,
) -> Config:
    """Build the Config. `overrides` maps option names ("daemon.listen") to flag values; None means unset."""
    values = {o.name: o.default for o in OPTIONS}
    if config_file is not None:
        values.update(_check_file_values(_read_toml(config_file), config_file))
    for name, value in overrides.items():
        if value is not None:
            values[name] = _check_value(_BY_NAME[name], value, where=_BY_NAME[name].flag)
    return _build(values, config_file, environ, euid)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _flatten(doc: dict[str, Any], sections: list[str], prefix: str = "") -> dict[str, Any]:
    """Nested tables ([engine.vllm]) become their dotted section; a table that is also a section keeps
    its own keys and hands its sub-tables on."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and any(s.startswith(name + ".") for s in sections):
            own = {k: v for k, v in value.items() if not (isinstance(v, dict) and f"{name}.{k}" in sections)}
            if own or name in sections:
                flat[name] = own
            flat.update(_flatten({k: v for k, v in value.items() if k not in own}, sections, name + "."))
        else:
            flat[name] = value
    return flat


def _check_file_values(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    sections = sorted({o.section for o in OPTIONS})
    values: dict[str, Any] = {}
    for section, table in _flatten(doc, sections).items():
        if section not in sections:
            raise ConfigError(f"{path}: unknown section [{section}]{_suggest(section, sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}]), not a single value")
        known = [o.key for o in OPTIONS if o.section == section]
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}]{_suggest(key, known)}")
            option = _BY_NAME[f"{section}.{key}"]
            where = f"{path}: [{section}] {key}"
            given = _host_tables(value, where) if option.name == "fleet.hosts" else value
            values[option.name] = _check_value(option, given, where=where)
    return values


def _host_tables(value: Any, where: str) -> list[str]:
    """`[[fleet.hosts]]` tables (name, address) as the --fleet-host flag's NAME=HOST:PORT."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{where}: expected [[fleet.hosts]] tables, each with a name and an address")
    for table in value:
        unknown = sorted(set(table) - {"name", "address"})
        if unknown or "name" not in table or "address" not in table:
            raise ConfigError(f"{where}: each [[fleet.hosts]] has a name and an address, and nothing else: {table}")
    return [f"{host_entry(t['name'], t['address']).name}={t['address']}" for t in value]


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"


def _check_value(option: Option, value: Any, where: str) -> Any:
    value = _check_type(option, value, where)
    if option.choices and value not in option.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(option.choices)}")
    if option.minimum is not None and value < option.minimum:
        raise ConfigError(f"{where}: {value} is below the minimum, {option.minimum:g}")
    if option.maximum is not None and value > option.maximum:
        raise ConfigError(f"{where}: {value} is above the maximum, {option.maximum:g}")
    return value


def _check_type(option: Option, value: Any, where: str) -> Any:
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
    ok = isinstance(value, option.kind) and not (option.kind is int and isinstance(value, bool))
    if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if option.kind is list:
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        expected[list] = "a list of strings"
    if not ok:
        raise ConfigError(f"{where}: expected {expected[option.kind]}, got {value!r}")
    return list(value) if option.kind is list else value


def _build(values: dict[str, Any], config_file: Path | None, environ: Mapping[str, str], euid: int) -> Config:
    tls = tls_files(*(_optional_path(values[f"daemon.{k}"], f"[daemon] {k}") for k in TLS_KEYS))
    daemon = DaemonSettings(
        listen=_listen(values["daemon.listen"], values["daemon.insecure_tcp"], tls, environ, euid),
        state_dir=_state_dir(values["daemon.state_dir"], environ),
        socket_group=_group(values["daemon.socket_group"]),
        insecure_tcp=values["daemon.insecure_tcp"],
        drain_timeout_s=values["daemon.drain_timeout_s"],
        log_level=cast(LogLevel, values["daemon.log_level"]),
        unit_manager=cast(UnitManagerChoice, values["daemon.unit_manager"]),
        tls=tls,
    )
    inventory = InventorySettings(
        cpu_slots=values["inventory.cpu_slots"],
        sim_gpus=values["inventory.sim_gpus"],
        gpu_source=cast(GpuSourceChoice, values["inventory.gpu_source"]),
    )
    engine = EngineSettings(
        vllm_python=_optional_path(values["engine.vllm.python"], "[engine.vllm] python"),
        hf_home=_optional_path(values["engine.hf_home"], "[engine] hf_home"),
        hf_token_file=_optional_path(values["engine.hf_token_file"], "[engine] hf_token_file"),
    )
    instances = _section(InstanceSettings, "instances", values)
    jobs = _section(JobSettings, "jobs", values)
    http = _http(values, tls)
    return Config(daemon, inventory, engine, instances, jobs, config_file, http, _fleet(values))


def _fleet(values: dict[str, Any]) -> FleetSettings:
    hosts = tuple(parse_host(text) for text in values["fleet.hosts"])
    names = [h.name for h in hosts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"[[fleet.hosts]]: host given twice: {', '.join(twice)}")
    name = values["fleet.name"]
    if name:
        host_entry(name, "127.0.0.1:0")  # the name's rule
    if name in names:
        raise ConfigError(f"[[fleet.hosts]]: {name} is this host's own name ([fleet] name)")
    return FleetSettings(name, hosts)


def _http(values: dict[str, Any], tls: TlsFiles | None) -> HttpSettings:
    texts: list[str] = values["http.listen"]
    if texts == ["none"]:
        return HttpSettings(())
    if "none" in texts:
        raise AddressError("--http-listen none turns the front door off: give it alone, not with addresses")
    token_file = _optional_path(values["http.token_file"], "[http] token_file")
    tokens = _tokens(token_file) if token_file is not None else frozenset()
    addresses = tuple(parse_http_address(t) for t in texts)
    for address in addresses:
        check_http_policy(address, values["http.insecure_http"], tls, bool(tokens))
    seen = [str(a) for a in addresses]
    duplicates = sorted({a for a in seen if seen.count(a) > 1})
    if duplicates:
        raise AddressError(f"http listen address given twice: {', '.join(duplicates)}")
    return HttpSettings(addresses, tokens, values["http.insecure_http"], values["http.session_idle_s"],
                        values["http.sticky_factor"], values["http.reserve"])  # fmt: skip


def _tokens(path: Path) -> frozenset[str]:
    """The front door's tokens: one per line (blank lines and # comments skipped), in a file that only
    its owner may read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"the token file {path} may be read by others (mode {mode & 0o777:o}); chmod 600 it")
    tokens = frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if not tokens:
        raise ConfigError(f"the token file {path} holds no token (one per line)")
    return tokens


def _optional_path(text: str, what: str) -> Path | None:
    if not text:
        return None
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(f"{what} must be an absolute path, got {text!r}")
    return path


def _listen(
    texts: list[str], insecure_tcp: bool, tls: TlsFiles | None, environ: Mapping[str, str], euid: int
) -> tuple[ListenAddress, ...]:
    addresses = [parse_address(t) for t in texts] or [default_socket(environ, euid)]
    for address in addresses:
        check_tcp_policy(address, insecure_tcp, tls)
    seen = [str(a) for a in addresses]
    duplicates = sorted({s for s in seen if seen.count(s) > 1})
    if duplicates:
        raise AddressError(f"listen address given twice: {', '.join(duplicates)}")
    return tuple(addresses)


def _state_dir(text: str, environ: Mapping[str, str]) -> Path:
    if not text:
        return default_state_dir(environ)
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(f"state_dir must be an absolute path, got {text!r}")
    return path


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY under systemd, else $XDG_STATE_HOME/mvllmd, else ~/.local/state/mvllmd."""
    state_directory = first_path(environ.get("STATE_DIRECTORY", ""))
    if state_directory:
        return Path(state_directory)
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg:
        return Path(xdg) / "mvllmd"
    home = environ.get("HOME", "") or str(Path.home())
    return Path(home) / ".local" / "state" / "mvllmd"


def _group(name: str) -> str:
    if name:
        try:
            grp.getgrnam(name)
        except KeyError as exc:
            raise ConfigError(f"socket_group {name!r} is not a group on this host") from exc
    return name
