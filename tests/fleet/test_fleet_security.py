"""The fleet's security, tested from other network namespaces (hostkit): the test's own, where a caller
reaches each host over the bridge as another machine would, and other emulated hosts.

Host 1 coordinates host 2 and serves clients (its HTTP listener has the front door's tokens); host 2
has one simulated instance with vLLM's development routes on (--weight-updates), and an HTTP listener
without tokens, which serves the fleet alone. Hosts 3 to 6 run a daemon each with a certificate that
does not fit (expired, another CA's, a user's, one naming another address): each coordinates host 2,
and host 1 is told of each, so that both ends of each refusal are seen.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import ssl
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from mvllm.v1 import fleet_pb2, fleet_pb2_grpc
from mvllmd import certs
from mvllmd.hosts.link import FLEET_PROTOCOL

import hostkit
from daemonkit import MVLLMCTL, assert_short_error, instance_status, wait_for
from fleetkit import FleetDaemon, make_pki
from hostkit import Host

pytestmark = pytest.mark.skipif(hostkit.available() is not None, reason=str(hostkit.available()))

INSTANCE = "m-0"
FRONT_TOKEN = "front-door-token-of-host-1"
PAST = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
# A daemon's certificate that does not fit, on hosts 3 to 6: pki/CERT.pem, and how it was made.
MISFITS = {"expired": "expired/host-3", "another CA": "rogue/host-4", "a user's": "tester",
           "another address": "elsewhere/host-6"}  # fmt: skip
ELSEWHERE = "192.0.2.6"  # the address host 6's certificate names (TEST-NET-1: nobody's)
# Prints "open", or the name of the error that connecting to ADDRESS PORT raised.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("open")
except OSError as exc:
    print(type(exc).__name__)
"""
# Prints the body of GET URL (an engine's, read on its own host).
READ = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


@dataclass
class Secured:
    first: FleetDaemon  # the coordinator, with the front door's tokens
    second: FleetDaemon  # its peer: one instance, a listener for the fleet only
    spare: list[Host]  # hosts 3 to 6
    pki: Path
    tmp: Path
    engine_url: str = ""  # host 2's instance, as host 2 reaches it (http://127.0.0.1:PORT)

    def call(
        self, base: str, method: str, path: str, token: str | None = None, body: dict[str, Any] | None = None,
        scheme: str = "Bearer",
    ) -> tuple[int, Any]:  # fmt: skip
        """`method path` on the HTTPS listener `base`, sent as written (http.client leaves `..` and `%2e`
        alone), trusting the fleet CA; the status and the JSON body (else the text)."""
        parts = urllib.parse.urlsplit(base)
        context = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=context, timeout=15)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode()

    def serves(self) -> bool:
        """Whether host 1's front door, with its token, lists host 2's model."""
        status, body = self.call(self.first.http, "GET", "/v1/models", FRONT_TOKEN)
        return status == 200 and [m["id"] for m in body["data"]] == ["m"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("secure")
    with hostkit.Fleet(6) as hosts:
        first_host, second_host, *spare = hosts.hosts
        pki = make_misfit_pki(tmp / "pki", hosts.hosts)
        tokens = tmp / "tokens"
        tokens.write_text(f"{FRONT_TOKEN}\n")
        tokens.chmod(0o600)
        second = FleetDaemon(second_host, pki, tmp)
        first = FleetDaemon(first_host, pki, tmp)
        first.extra = ["--fleet-host", f"host-2={second.address}", "--http-token-file", str(tokens)]
        secured = Secured(first, second, spare, pki, tmp)
        try:
            second.start()
            first.start()
            done = second.ctl("launch", "m", "--engine", "sim", "--weight-updates", "--", "--time-scale", "0")
            assert done.returncode == 0, done.stderr
            wait_for(lambda: ready(second) == [INSTANCE], timeout=30)
            wait_for(secured.serves, timeout=30)  # host 1 reaches it through its route
            (engine,) = instance_status(second.ctl)
            secured.engine_url = engine["url"]
            yield secured
        finally:
            first.stop()
            second.stop()


def make_misfit_pki(folder: Path, hosts: list[Host]) -> Path:
    """The fleet's CA and certificates for hosts 1 and 2 and user tester (mvllmd certs), and those that do
    not fit: MISFITS, an expired user, another CA's user; and hosts `probe` and `visitor`, whose certificates
    the test joins with (not host 1's: joining again replaces a host's route token, host 1's on host 2 too)."""
    pki = make_pki(folder, hosts[:2])
    for name in ("probe", "visitor"):
        certs.make_host(pki, name, ["192.0.2.1"])
    certs.make_host(pki / "expired", "host-3", [hosts[2].address], days=1, valid_from=PAST, ca_dir=pki)
    certs.make_user(pki / "expired", "tester", days=1, valid_from=PAST, ca_dir=pki)
    certs.make_ca(pki / "rogue", "rogue fleet")
    certs.make_host(pki / "rogue", "host-4", [hosts[3].address])
    certs.make_user(pki / "rogue", "mallory")
    certs.make_host(pki / "elsewhere", "host-6", [ELSEWHERE], ca_dir=pki)
    return pki


@pytest.fixture(scope="module")
def misfits(fleet: Secured) -> Iterator[dict[str, FleetDaemon]]:
    """A daemon on each spare host with a certificate of MISFITS, coordinating host 2; host 1 told of each."""
    started = {}
    try:
        for (case, cert), host in zip(MISFITS.items(), fleet.spare, strict=True):
            daemon = FleetDaemon(host, fleet.pki, fleet.tmp, cert=cert)
            daemon.extra = ["--fleet-host", f"host-2={fleet.second.address}"]
            started[case] = daemon
            daemon.start()
            added = fleet.first.ctl("hosts", "add", host.name, daemon.address)
            assert added.returncode == 0, added.stderr
        daemons = [fleet.first, *started.values()]
        wait_for(lambda: all(h["message"] != "not reached yet" for d in daemons for h in peers(d)), timeout=30)
        yield started
    finally:
        for daemon in started.values():
            daemon.stop()


# --- helpers ---------------------------------------------------------------------------------------


def ready(daemon: FleetDaemon) -> list[str]:
    return [i["name"] for i in instance_status(daemon.ctl) if i["state"] == "INSTANCE_STATE_READY"]


def peers(daemon: FleetDaemon) -> list[dict[str, Any]]:
    done = daemon.ctl("hosts", "--json")
    assert done.returncode in (0, 1), done.stderr  # 1: some peer is unreachable
    return [h for h in json.loads(done.stdout)["hosts"] if not h["local"]]


def peer(daemon: FleetDaemon, name: str) -> dict[str, Any]:
    (found,) = [h for h in peers(daemon) if h["name"] == name]
    return found


def credentials(pki: Path, cert: str | None) -> Any:
    """Channel credentials trusting the fleet CA, with the client certificate pki/CERT.pem (None: none)."""
    root = (pki / "ca.pem").read_bytes()
    if cert is None:
        return grpc.ssl_channel_credentials(root)
    return grpc.ssl_channel_credentials(root, (pki / f"{cert}.key").read_bytes(), (pki / f"{cert}.pem").read_bytes())


def join(daemon: FleetDaemon, cert: str | None, protocol: int = FLEET_PROTOCOL) -> fleet_pb2.JoinFleetResponse:
    request = fleet_pb2.JoinFleetRequest(version="0.0.test", protocol=protocol)
    with grpc.secure_channel(daemon.address, credentials(daemon.pki, cert)) as channel:
        response: fleet_pb2.JoinFleetResponse = fleet_pb2_grpc.FleetServiceStub(channel).JoinFleet(request, timeout=15)
    return response


def refused(daemon: FleetDaemon, cert: str | None, protocol: int = FLEET_PROTOCOL) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        join(daemon, cert, protocol)
    return caught.value


def connect(where: Host | None, address: str, port: int) -> str:
    """Connect to address:port from host `where` (None: the test's namespace): "open" or the error's name."""
    argv = [sys.executable, "-c", CONNECT, address, str(port)]
    if where is None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    else:
        done = where.run(argv)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def engine_state(fleet: Secured) -> dict[str, Any]:
    """What host 2's engine says of itself, read on host 2 from its development routes."""
    state: dict[str, Any] = {}
    for path in ("/is_paused", "/is_sleeping", "/weight_info"):
        done = fleet.second.host.run([sys.executable, "-c", READ, fleet.engine_url + path])
        assert done.returncode == 0, done.stderr
        state.update(json.loads(done.stdout))
    return state


def one_line(message: str, *fragments: str) -> None:
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def route_token(fleet: Secured) -> str:
    """A route token of host 2, as a daemon with a host certificate gets one."""
    return join(fleet.second, "probe").route_token


# --- JoinFleet: host certificates only ---------------------------------------------------------------


def test_join_without_a_client_certificate_is_refused_at_the_handshake(fleet: Secured) -> None:
    error = refused(fleet.second, None)
    assert error.code() is grpc.StatusCode.UNAVAILABLE, error
    assert "Socket closed" in (error.details() or ""), error.details()


def test_join_with_a_users_certificate_is_permission_denied(fleet: Secured) -> None:
    error = refused(fleet.second, "tester")
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED, error
    one_line(error.details() or "", "JoinFleet is for the fleet's daemons", "mvllmd certs host NAME")


def test_join_with_another_cas_host_certificate_is_refused(fleet: Secured) -> None:
    error = refused(fleet.second, "rogue/host-4")
    assert error.code() is grpc.StatusCode.UNAVAILABLE, error


def test_join_with_a_host_certificate_gets_a_route_token(fleet: Secured) -> None:
    joined = join(fleet.second, "visitor")
    assert (joined.name, joined.protocol) == ("host-2", FLEET_PROTOCOL)
    assert list(joined.http_urls) == [fleet.second.http]
    models = f"/i/{INSTANCE}/v1/models"
    assert fleet.call(fleet.second.http, "GET", models, joined.route_token)[0] == 200
    again = join(fleet.second, "visitor").route_token  # joining again replaces the token
    assert again != joined.route_token
    assert fleet.call(fleet.second.http, "GET", models, joined.route_token)[0] == 401
    assert fleet.call(fleet.second.http, "GET", models, again)[0] == 200


def test_join_of_another_fleet_protocol_names_both(fleet: Secured) -> None:
    error = refused(fleet.second, "probe", protocol=FLEET_PROTOCOL + 1)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error
    one_line(
        error.details() or "",
        f"probe runs mvllm 0.0.test (fleet protocol {FLEET_PROTOCOL + 1})",
        f"(fleet protocol {FLEET_PROTOCOL}): run one release on every host",
    )


# --- certificates that do not fit: refused, with what to check -----------------------------------------


# What the misfit's daemon shows of host 2 (it coordinates host 2).
CLIENT_SIDE = {
    "expired": ("closed the connection at the TLS handshake", "--tls-cert must be signed by the fleet CA", "in date"),
    "another CA": ("closed the connection at the TLS handshake", "--tls-cert must be signed by the fleet CA"),
    "a user's": ("refused: JoinFleet is for the fleet's daemons", "mvllmd certs host NAME"),
}


@pytest.mark.parametrize("case", sorted(CLIENT_SIDE))
def test_a_coordinator_whose_certificate_does_not_fit_says_what_to_check(
    fleet: Secured, misfits: dict[str, FleetDaemon], case: str
) -> None:
    done = misfits[case].ctl("hosts")  # as its admin sees it: host 2 unreachable, and why, on one line
    assert done.returncode == 1, done
    assert done.stdout.splitlines()[2].split()[:3] == ["host-2", fleet.second.address, "no"], done.stdout
    (line,) = done.stderr.splitlines()
    one_line(line, f"host-2: host host-2 at {fleet.second.address}", *CLIENT_SIDE[case])


def test_a_coordinator_whose_certificate_names_another_address_still_joins(
    misfits: dict[str, FleetDaemon],
) -> None:
    """A peer does not check which address a coordinator's certificate names: it dials, it is not dialled."""
    wait_for(lambda: peer(misfits["another address"], "host-2")["reachable"], timeout=30)


# What host 1 shows of the misfit (it dials it: the misfit's certificate is its server's).
SERVER_SIDE = {
    "expired": ("the TLS handshake failed (certificate has expired)", "in date"),
    "another CA": ("the TLS handshake failed (unable to get local issuer certificate)", "of the fleet CA"),
    "a user's": ("the TLS handshake failed (unsupported certificate purpose)", "a host certificate (mvllmd certs"),
    "another address": ("its certificate does not name {address}, the address dialled",
                        "mvllmd certs host host-6 --address {address}:7070"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SERVER_SIDE))
def test_a_peer_whose_certificate_does_not_fit_says_what_to_check(
    fleet: Secured, misfits: dict[str, FleetDaemon], case: str
) -> None:
    misfit = misfits[case]
    host = peer(fleet.first, misfit.host.name)
    assert host["reachable"] is False, host
    fragments = [f.format(address=misfit.host.address) for f in SERVER_SIDE[case]]
    one_line(host["message"], f"host {misfit.host.name} at {misfit.address}: ", *fragments)
    done = fleet.first.ctl("hosts")  # as its admin sees it: one line for each peer it cannot reach
    assert f"{misfit.host.name}: {host['message']}" in done.stderr.splitlines(), done.stderr


@pytest.mark.parametrize(
    ("cert", "fragment"),
    [("expired/tester", "is --tls-cert in date?"), ("rogue/mallory", "did the CA of its --tls-client-ca sign"),
     (None, "did the CA of its --tls-client-ca sign --tls-cert?")],
)  # fmt: skip
def test_mvllmctl_with_a_certificate_that_does_not_fit_gets_one_line(
    fleet: Secured, cert: str | None, fragment: str
) -> None:
    pki = fleet.pki
    mine = ["--tls-cert", f"{pki}/{cert}.pem", "--tls-key", f"{pki}/{cert}.key"] if cert else []
    argv = [MVLLMCTL, "--address", fleet.second.address, "--tls-ca", f"{pki}/ca.pem", *mine, "hosts"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVLLM_")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert_short_error(done, 3, "mvllmctl: cannot reach mvllmd at ", fragment)
    assert done.stderr.count("\n") == 1, done.stderr


def test_mvllmctl_with_the_fleets_user_certificate_is_let_in(fleet: Secured) -> None:
    done = fleet.second.remote_ctl("hosts", "--json")
    assert done.returncode == 0, done.stderr
    assert [h["name"] for h in json.loads(done.stdout)["hosts"]] == ["host-2"]


@pytest.mark.parametrize(
    ("case", "fragment"),
    [("expired", "certificate has expired)"), ("another CA", "unable to get local issuer certificate)"),
     ("another address", "(Hostname Verification Check failed.)")],
)  # fmt: skip
def test_mvllmctl_to_a_daemon_whose_certificate_does_not_fit_gets_one_line(
    misfits: dict[str, FleetDaemon], case: str, fragment: str
) -> None:
    done = misfits[case].remote_ctl("info")
    assert_short_error(done, 3, f"the TLS handshake with mvllmd at {misfits[case].address} failed", fragment,
                       "--tls-ca must hold the CA of the daemon's certificate")  # fmt: skip
    assert done.stderr.count("\n") == 1, done.stderr


# --- an instance's port -------------------------------------------------------------------------------


def test_an_instances_port_is_reachable_only_on_its_host(fleet: Secured, route_token: str) -> None:
    engine = urllib.parse.urlsplit(fleet.engine_url)
    assert engine.hostname == "127.0.0.1" and engine.port, engine
    second, attacker = fleet.second.host, fleet.spare[0]
    assert connect(second, "127.0.0.1", engine.port) == "open"  # it is there
    for where in (fleet.first.host, attacker, None):
        assert connect(where, second.address, engine.port) == "ConnectionRefusedError", where
    assert connect(attacker, "127.0.0.1", engine.port) == "ConnectionRefusedError"  # its own loopback, not host 2's
    status, _ = fleet.call(fleet.second.http, "GET", f"/i/{INSTANCE}/v1/models", route_token)
    assert status == 200  # the way in: the route


# --- the per-instance route ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token", [None, "", "not-a-token", "x" * 43, FRONT_TOKEN], ids=["missing", "empty", "wrong", "same-length", "front"]
)
def test_the_route_refuses_a_missing_or_wrong_token(fleet: Secured, route_token: str, token: str | None) -> None:
    for path in (f"/i/{INSTANCE}/v1/models", f"/i/{INSTANCE}/metrics", "/i/no-such/v1/models"):
        status, body = fleet.call(fleet.second.http, "GET", path, token)
        assert status == 401, (path, body)
        one_line(body["error"]["message"], "route token (FleetService.JoinFleet)")


def test_the_route_wants_its_token_as_a_bearer_token(fleet: Secured, route_token: str) -> None:
    for scheme in ("Basic", "Token", ""):
        status, _ = fleet.call(fleet.second.http, "GET", f"/i/{INSTANCE}/v1/models", route_token, scheme=scheme)
        assert status == 401, scheme
    assert fleet.call(fleet.second.http, "GET", f"/i/{INSTANCE}/v1/models", route_token, scheme="bearer")[0] == 200


def test_a_route_token_opens_the_instances_job_routes(fleet: Secured, route_token: str) -> None:
    base = fleet.second.http
    status, models = fleet.call(base, "GET", f"/i/{INSTANCE}/v1/models", route_token)
    assert status == 200 and [m["id"] for m in models["data"]] == ["m"], models
    status, metrics = fleet.call(base, "GET", f"/i/{INSTANCE}/metrics", route_token)
    assert status == 200 and "vllm:" in metrics
    prompt = {"model": "m", "prompt": "hello", "max_tokens": 4}
    status, completion = fleet.call(base, "POST", f"/i/{INSTANCE}/v1/completions", route_token, prompt)
    assert status == 200 and completion["choices"], completion
    status, text = fleet.call(base, "POST", f"/i/{INSTANCE}/detokenize", route_token, {"model": "m", "tokens": [1, 2]})
    assert status == 200 and "prompt" in text, text
    status, missing = fleet.call(base, "GET", "/i/no-such/v1/models", route_token)
    assert status == 404 and "no instance named no-such" in missing["error"]["message"]


# vLLM's development routes (served: --weight-updates), asked for through the route in every spelling.
DEV_ROUTES = [
    ("POST", "/pause"), ("POST", "/pause?mode=abort"), ("POST", "/resume"), ("GET", "/is_paused"),
    ("POST", "/sleep?level=2"), ("POST", "/wake_up"), ("POST", "/collective_rpc"),
    ("POST", "/update_weight_version"), ("GET", "/weight_info"), ("POST", "/reset_prefix_cache"),
    ("POST", "/update_weights"), ("GET", "/server_info"),
    ("POST", "/v1/../pause"), ("POST", "/v1/./../sleep"), ("POST", "/metrics/../pause"),
    ("POST", "/tokenize/../pause"), ("POST", "/v1/models/../../sleep"), ("POST", "/%2e%2e/pause"),
    ("POST", "/v1/%2e%2e/pause"), ("POST", "/v1/..%2fpause"), ("POST", "/v1%2f..%2fpause"), ("POST", "//pause"),
    ("POST", "/v1//../pause"), ("POST", "/./pause"), ("POST", "/pause/"), ("POST", "/PAUSE"),
    ("POST", "/metrics/"), ("POST", "/metricsx"), ("GET", "/v1"),
]  # fmt: skip
DEV_BODIES = {"/collective_rpc": {"method": "reload_weights", "kwargs": {"weights_path": "/nowhere"}},
              "/update_weight_version": {"new_version": "attacker"}}  # fmt: skip


def test_development_routes_are_never_forwarded(fleet: Secured, route_token: str) -> None:
    before = engine_state(fleet)
    assert before["is_paused"] is False and before["is_sleeping"] is False, before
    for method, path in DEV_ROUTES:
        body = DEV_BODIES.get(path, {}) if method == "POST" else None
        status, answer = fleet.call(fleet.second.http, method, f"/i/{INSTANCE}{path}", route_token, body)
        assert status == 404, (method, path, answer)
        assert answer["error"]["type"] == "InstanceRouteError", (path, answer)
    assert engine_state(fleet) == before  # not paused, not asleep, its weights' version unchanged
    assert fleet.call(fleet.second.http, "GET", f"/i/{INSTANCE}/v1/models", route_token)[0] == 200


# --- the listeners ------------------------------------------------------------------------------------


def test_a_listener_without_tokens_serves_the_fleet_alone(fleet: Secured, route_token: str) -> None:
    for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
                         ("POST", "/v1/completions"), ("POST", "/tokenize")):  # fmt: skip
        for token in (None, route_token, FRONT_TOKEN):
            status, body = fleet.call(fleet.second.http, method, path, token, {"model": "m", "prompt": "x"})
            assert status == 401, (path, body)
            one_line(body["error"]["message"], "serves only the fleet's per-instance routes", "--http-token-file")


def test_the_front_doors_tokens_and_route_tokens_do_not_cross(fleet: Secured) -> None:
    first = fleet.first
    assert fleet.serves()  # its own token, on its front door: the fleet's models
    first_route_token = join(first, "visitor").route_token
    for token in (None, first_route_token, "not-a-token"):
        status, body = fleet.call(first.http, "GET", "/v1/models", token)
        assert status == 401, body
        one_line(body["error"]["message"], "give a token of this front door")
    for token in (FRONT_TOKEN, None):
        status, body = fleet.call(first.http, "GET", f"/i/{INSTANCE}/v1/models", token)
        assert status == 401, body
    status, _ = fleet.call(fleet.second.http, "GET", f"/i/{INSTANCE}/v1/models", first_route_token)
    assert status == 401  # host 1's route token is host 1's alone
