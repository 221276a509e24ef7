"""`mvllmd certs`: the fleet CA and its hosts' and users' certificates, made by the real command, read back
by openssl, classified by `certs.identity`, and presented to a real mvllmd and a real gRPC server.
"""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from mvllmd import certs
from mvllmd.cli import run

from daemonkit import MVLLMD, Spawn

NOW = datetime.datetime.now(datetime.UTC)


def mvllmd_certs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MVLLMD, "certs", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60)


def made(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = mvllmd_certs(*args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet CA in pki/ with hosts host1 (127.0.0.1, localhost) and host2 and user alice, made by the
    command; a rogue CA with its own user in pki/rogue/; and an expired user, made by the library."""
    d = tmp_path_factory.mktemp("pki")
    made("ca", cwd=d)
    made("host", "host1", "--address", "127.0.0.1:7070", "--address", "localhost", cwd=d)
    addresses = ["10.0.0.3:7070", "[fd00::3]:7070", "gpu-2.lan"]
    made("host", "host2", *(f"--address={a}" for a in addresses), cwd=d)
    made("user", "alice", cwd=d)
    made("ca", "--dir", "rogue", "--name", "rogue fleet", cwd=d)
    made("user", "mallory", "--dir", "rogue", cwd=d)
    certs.make_user(d, "expired", days=1, valid_from=NOW - datetime.timedelta(days=10))
    return d


def openssl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60)


def openssl_text(path: Path) -> str:
    done = openssl("x509", "-in", str(path), "-noout", "-text")
    assert done.returncode == 0, done.stderr
    return done.stdout


def pem(pki: Path, name: str) -> bytes:
    return (pki / f"{name}.pem").read_bytes()


# --- what the command writes -----------------------------------------------------------------------


def test_the_command_writes_each_pair_and_says_what_it_is(tmp_path: Path) -> None:
    ca = made("ca", "--dir", "fleet", "--name", "lab", cwd=tmp_path)
    assert ca.stdout.splitlines() == [
        f"wrote fleet/ca.pem: CA 'lab', valid until {expiry(tmp_path / 'fleet/ca.pem')}",
        "wrote fleet/ca.key: private key (EC secp256r1), mode 0600",
    ]
    assert ca.stderr == "next: mvllmd certs host NAME --address HOST:PORT --dir fleet\n"

    host = made("host", "gpu-1", "--address", "10.0.0.2:7171", "--address", "https://gpu-1.lan:7080",
                "--dir", "out", "--ca-dir", "fleet", cwd=tmp_path)  # fmt: skip
    assert host.stdout.splitlines() == [
        "wrote out/gpu-1.pem: host 'gpu-1', names 10.0.0.2, gpu-1.lan, mvllm://host/gpu-1, "
        f"valid until {expiry(tmp_path / 'out/gpu-1.pem')}",
        "wrote out/gpu-1.key: private key (EC secp256r1), mode 0600",
    ]
    assert host.stderr.splitlines()[0] == (
        "next: mvllmd --tls-cert out/gpu-1.pem --tls-key out/gpu-1.key --tls-client-ca fleet/ca.pem "
        "--listen 0.0.0.0:7171"
    )
    assert "ca.key stays here" in host.stderr

    user = made("user", "bob", "--dir", "fleet", "--days", "30", cwd=tmp_path)
    assert user.stdout.splitlines()[0].startswith("wrote fleet/bob.pem: user 'bob', names mvllm://user/bob, ")
    assert "next: mvllmctl --tls-ca fleet/ca.pem --tls-cert fleet/bob.pem --tls-key fleet/bob.key" in user.stderr

    files = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    assert files == {
        "fleet/ca.pem": 0o644, "fleet/ca.key": 0o600, "fleet/bob.pem": 0o644, "fleet/bob.key": 0o600,
        "out/gpu-1.pem": 0o644, "out/gpu-1.key": 0o600,
    }  # fmt: skip
    assert (tmp_path / "out/gpu-1.pem").read_text().count("BEGIN") == 1  # the certificate alone, no chain


def expiry(path: Path) -> str:
    done = openssl("x509", "-in", str(path), "-noout", "-enddate", "-dateopt", "iso_8601")
    # notAfter=2036-12-01 04:42:17Z
    return done.stdout.strip().removeprefix("notAfter=")[:16] + " UTC"


def test_openssl_reads_the_extensions(pki: Path) -> None:
    ca = openssl_text(pki / "ca.pem")
    assert "Subject: CN=mvllm fleet, O=mvllm fleet" in ca.replace(" = ", "=")
    assert "CA:TRUE, pathlen:0" in ca
    assert "Certificate Sign, CRL Sign" in ca
    assert "Subject Key Identifier" in ca
    assert "ecdsa-with-SHA256" in ca and "prime256v1" in ca

    host = openssl_text(pki / "host2.pem")
    assert "Subject: CN=host2, O=mvllm fleet, OU=mvllm-host" in host.replace(" = ", "=")
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in host
    assert "IP Address:10.0.0.3, IP Address:FD00:0:0:0:0:0:0:3, DNS:gpu-2.lan, URI:mvllm://host/host2" in host
    assert "CA:FALSE" in host

    user = openssl_text(pki / "alice.pem")
    assert "Subject: CN=alice, O=mvllm fleet, OU=mvllm-user" in user.replace(" = ", "=")
    assert "TLS Web Client Authentication" in user and "Server Authentication" not in user
    assert "URI:mvllm://user/alice" in user and "IP Address" not in user

    names = ["host1.pem", "host2.pem", "alice.pem", "expired.pem"]
    done = openssl("verify", "-no_check_time", "-CAfile", "ca.pem", *names, cwd=pki)
    assert done.returncode == 0, done.stdout + done.stderr
    assert openssl("verify", "-CAfile", "ca.pem", "rogue/mallory.pem", cwd=pki).returncode != 0


def test_a_certificate_starts_five_minutes_back_and_never_outlives_its_ca(tmp_path: Path) -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    certs.make_ca(tmp_path, days=10)
    certs.make_user(tmp_path, "long", days=825)
    ca, user = (x509_dates(tmp_path / name) for name in ("ca.pem", "long.pem"))
    assert before - datetime.timedelta(minutes=5, seconds=1) <= user[0] <= before - datetime.timedelta(minutes=4)
    assert user[1] == ca[1]


def x509_dates(path: Path) -> tuple[datetime.datetime, datetime.datetime]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_before_utc, cert.not_valid_after_utc


# --- who is it ------------------------------------------------------------------------------------


def test_identity_tells_hosts_from_users(pki: Path) -> None:
    assert certs.identity(pem(pki, "host1")) == certs.Identity("host", "host1")
    assert certs.identity(pem(pki, "host2")) == certs.Identity("host", "host2")
    assert certs.identity(pem(pki, "alice")) == certs.Identity("user", "alice")
    assert certs.identity(pem(pki, "ca")) is None
    assert certs.identity(b"not a certificate") is None


def openssl_leaf(pki: Path, name: str, extensions: str) -> bytes:
    """A certificate the fleet CA signed, with extensions of our choosing: what a careless admin, or
    another tool, might make."""
    key, csr, ext = (pki / f"odd-{name}.{suffix}" for suffix in ("key", "csr", "ext"))
    ext.write_text(extensions + "\n")
    request = openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")  # fmt: skip
    assert request.returncode == 0, request.stderr
    done = openssl("x509", "-req", "-in", str(csr), "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "2",
                   "-extfile", str(ext), cwd=pki)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.encode()


BOTH, DIAL = "extendedKeyUsage=serverAuth,clientAuth\n", "extendedKeyUsage=clientAuth\n"


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [
        (DIAL + "subjectAltName=URI:mvllm://host/h", None),  # a host URI that cannot serve
        ("extendedKeyUsage=serverAuth\nsubjectAltName=URI:mvllm://host/h", None),  # nor dial
        ("subjectAltName=URI:mvllm://host/h", None),  # no EKU at all is no host either
        (DIAL + "subjectAltName=URI:mvllm://host/h,URI:mvllm://user/u", ("user", "u")),
        (BOTH + "subjectAltName=URI:mvllm://host/h,URI:mvllm://user/u", ("host", "h")),
        (BOTH + "subjectAltName=URI:mvllm://host/a,URI:mvllm://host/b", None),  # two hosts: neither
        (DIAL + "subjectAltName=URI:mvllm://user/u,URI:mvllm://user/v", None),
        (DIAL + "subjectAltName=URI:mvllm://user/bad%20name", None),
        (DIAL + "subjectAltName=URI:https://user/u,DNS:mvllm", None),
        (BOTH.strip(), None),  # the CN alone names nobody
    ],
)
def test_identity_follows_the_rule_for_any_certificate(
    pki: Path, extensions: str, expected: tuple[str, str] | None
) -> None:
    cert = openssl_leaf(pki, "odd", extensions)
    assert certs.identity(cert) == (certs.Identity(*expected) if expected else None)


def test_identity_reads_what_grpc_hands_a_servicer(pki: Path) -> None:
    """The PEM in a real call's auth context, as host1 serving sees its callers."""

    def who(_request: bytes, context: grpc.ServicerContext) -> bytes:
        found = certs.identity(context.auth_context()["x509_pem_cert"][0])
        return f"{found.kind} {found.name}".encode() if found else b"nobody"

    handler = grpc.method_handlers_generic_handler("test.Who", {"Ask": grpc.unary_unary_rpc_method_handler(who)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    credentials = grpc.ssl_server_credentials(
        [((pki / "host1.key").read_bytes(), pem(pki, "host1"))], pem(pki, "ca"), require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        assert ask(pki, port, "host2") == b"host host2"
        assert ask(pki, port, "alice") == b"user alice"
    finally:
        server.stop(None)


def ask(pki: Path, port: int, name: str) -> Any:
    key, cert = (pki / f"{name}.key").read_bytes(), pem(pki, name)
    credentials = grpc.ssl_channel_credentials(pem(pki, "ca"), key, cert)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        call: Callable[..., Any] = channel.unary_unary("/test.Who/Ask")
        return call(b"", timeout=30)


# --- a real mvllmd --------------------------------------------------------------------------------


def client(pki: Path, name: str, ca: str = "ca.pem") -> list[str]:
    return ["--tls-ca", str(pki / ca), "--tls-cert", str(pki / f"{name}.pem"), "--tls-key", str(pki / f"{name}.key")]


def test_mvllmd_lets_in_its_fleets_hosts_and_users_only(pki: Path, short_tmp: Path, spawn: Spawn) -> None:
    tls = ["--tls-cert", str(pki / "host1.pem"), "--tls-key", str(pki / "host1.key"),
           "--tls-client-ca", str(pki / "ca.pem")]  # fmt: skip
    daemon = spawn(["--listen", "127.0.0.1:0", "--state-dir", str(short_tmp / "s"), *tls])
    address = f"127.0.0.1:{daemon.tcp_port}"

    for name in ("host2", "alice"):  # a peer and a user: the TLS layer takes both (identity tells them apart)
        done = daemon.ctl(*client(pki, name), "info", "--json", address=address)
        assert done.returncode == 0, (name, done.stderr)
        assert '"version"' in done.stdout

    refused = {
        "another CA's user": client(pki, "rogue/mallory"),
        "an expired certificate": client(pki, "expired"),
    }
    for case, flags in refused.items():
        done = daemon.ctl(*flags, "info", address=address, timeout=30)
        assert done.returncode == 3, (case, done.stderr)  # unreachable: the handshake failed
        assert done.stderr.startswith("mvllmctl: ") and done.stderr.count("\n") == 1, (case, done.stderr)
    assert daemon.proc.poll() is None


# --- refusals -------------------------------------------------------------------------------------


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Certs:
    """`mvllmd certs ARGS` through the command line's own entry point, in this process (no second's
    start-up per case) and in `tmp_path`: its exit status and output, as a finished process's."""
    monkeypatch.chdir(tmp_path)

    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        code = run(["certs", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["mvllmd", "certs", *args], code, out, err)

    return _run


Certs = Callable[..., subprocess.CompletedProcess[str]]


def one_line_usage_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith("mvllmd: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert fragment in done.stderr, done.stderr
    assert done.stdout == ""


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_refusals_are_one_line_and_write_nothing(tmp_path: Path, in_process: Certs) -> None:
    certs.make_ca(tmp_path)
    certs.make_user(tmp_path, "alice")
    before = snapshot(tmp_path)
    one_line_usage_error(mvllmd_certs("user", "alice", cwd=tmp_path), "refusing to overwrite alice.pem and alice.key")
    cases = [
        (["ca"], "refusing to overwrite ca.pem and ca.key: they exist (--force replaces them)"),
        (["user", "alice", "--days", "9"], "refusing to overwrite alice.pem and alice.key"),
        (["user", "bad name"], "name 'bad name': use 1 to 63 letters, digits, '.', '_' or '-'"),
        (["user", "--", "-x"], "starting with a letter or digit"),
        (["user", "x" * 64], "([A-Za-z0-9][A-Za-z0-9._-]{0,62})"),
        (["user", "../up"], "name '../up'"),
        (["host", "CA", "--address", "10.0.0.2"], "ca.pem and ca.key are the fleet CA's own files"),
        (["host", "h", "--address", "not_a_host:70"], "address 'not_a_host:70': expected an IP address or a DNS"),
        (["user", "bob", "--dir", "new"], "no fleet CA in new: new/ca.pem does not exist"),
        (["user", "bob", "--ca-dir", "nowhere"], "no fleet CA in nowhere"),
        (["ca", "--dir", "x", "--name", "a\tb"], "fleet name 'a\\tb': use 1 to 64 printable characters"),
    ]
    for args, fragment in cases:
        one_line_usage_error(in_process(*args), fragment)
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["alice.key", "alice.pem", "ca.key", "ca.pem"]


def test_click_usage_errors_exit_2(tmp_path: Path, in_process: Certs) -> None:
    certs.make_ca(tmp_path)
    for args in (["host", "h"], ["user", "bob", "--days", "0"], ["user"], ["user", "bob", "--ca-dir", "ca.pem"]):
        done = in_process(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Error: " in done.stderr and "Traceback" not in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["ca.key", "ca.pem"]


def test_unreadable_or_mismatched_ca_files_are_named(tmp_path: Path, in_process: Certs) -> None:
    a, b, c = (certs.make_ca(tmp_path / name) for name in "abc")
    certs.make_user(tmp_path / "c", "u")
    a.key.write_bytes(b.key.read_bytes())
    one_line_usage_error(in_process("user", "u", "--dir", "a"), "a/ca.key is not the key of a/ca.pem")
    b.key.write_text("junk\n")
    one_line_usage_error(in_process("user", "u", "--dir", "b"), "b/ca.key holds no PEM private key")
    b.key.unlink()
    one_line_usage_error(in_process("user", "u", "--dir", "b"), "cannot read b/ca.key: No such file or directory")
    b.key.mkdir()
    one_line_usage_error(in_process("user", "u", "--dir", "b"), "cannot read b/ca.key: Is a directory")
    b.cert.write_text("junk\n")
    one_line_usage_error(in_process("user", "u", "--dir", "b"), "b/ca.pem holds no PEM certificate")
    c.cert.write_bytes((tmp_path / "c/u.pem").read_bytes())  # a leaf is no CA
    c.key.write_bytes((tmp_path / "c/u.key").read_bytes())
    one_line_usage_error(in_process("user", "v", "--dir", "c"), "c/ca.pem is not a CA certificate")
    assert sorted(os.listdir(tmp_path / "c")) == ["ca.key", "ca.pem", "u.key", "u.pem"]


def test_a_directory_it_cannot_make_is_a_failure(tmp_path: Path, in_process: Certs) -> None:
    certs.make_ca(tmp_path)
    (tmp_path / "file").write_text("")
    done = in_process("user", "u", "--dir", "file/sub", "--ca-dir", ".")
    assert done.returncode == 1, done.stderr
    assert done.stderr == "mvllmd: error: not a directory creating file/sub\n"


def test_force_replaces_a_pair_whole(tmp_path: Path) -> None:
    made("ca", cwd=tmp_path)
    made("host", "h", "--address", "10.0.0.2", cwd=tmp_path)
    old = snapshot(tmp_path)
    (tmp_path / "h.key").chmod(0o644)  # loosened by hand: --force writes a fresh 0600 file
    made("host", "h", "--address", "10.0.0.9", "--force", cwd=tmp_path)
    new = snapshot(tmp_path)
    assert new["h.key"] != old["h.key"] and new["h.pem"] != old["h.pem"] and new["ca.key"] == old["ca.key"]
    assert stat.S_IMODE((tmp_path / "h.key").stat().st_mode) == 0o600
    assert "IP Address:10.0.0.9" in openssl_text(tmp_path / "h.pem")
    assert sorted(os.listdir(tmp_path)) == ["ca.key", "ca.pem", "h.key", "h.pem"]  # no temporary left


def test_an_expired_ca_signs_nothing(tmp_path: Path) -> None:
    certs.make_ca(tmp_path, days=1, valid_from=NOW - datetime.timedelta(days=3))
    one_line_usage_error(mvllmd_certs("user", "u", cwd=tmp_path), "the fleet CA ca.pem expired on ")
