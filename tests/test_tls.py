"""TLS on mvllmd's TCP listeners, with real certificates (made by openssl) and real processes.

Off loopback mvllmd needs mutual TLS; mvllmctl dials it with --tls-ca, --tls-cert and --tls-key. The
daemon listens on 0.0.0.0 in one test, but every connection the tests make goes to 127.0.0.1.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mvllmd.addresses import TcpAddress, check_tcp_policy
from mvllmd.config import load_config
from mvllmd.errors import AddressError, ConfigError
from mvllmd.tls import TlsFiles, tls_files

from daemonkit import Spawn, assert_short_error, run_mvllmd

OPENSSL = "openssl"
ENV = {"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/u"}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _signed(cwd: Path, name: str, ca: str, extensions: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


def _ca(cwd: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server certificate for 127.0.0.1 and a client certificate, and a rogue CA's client."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _signed(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _signed(d, "client", "ca", "extendedKeyUsage=clientAuth")
    _ca(d, "rogue-ca")
    _signed(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth")
    return d


def daemon_tls(pki: Path) -> list[str]:
    return ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
            "--tls-client-ca", str(pki / "ca.pem")]  # fmt: skip


def client_tls(pki: Path, name: str = "client") -> list[str]:
    return ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / f"{name}.pem"),
            "--tls-key", str(pki / f"{name}.key")]  # fmt: skip


# --- the files and the policy ----------------------------------------------------------------------


def test_no_tls_settings_mean_no_tls() -> None:
    assert tls_files(None, None, None) is None


def test_tls_files_are_checked_with_clear_errors(pki: Path) -> None:
    cert, key, ca = pki / "server.pem", pki / "server.key", pki / "ca.pem"
    assert tls_files(cert, key, ca) == TlsFiles(cert, key, ca)
    with pytest.raises(ConfigError, match="needs both tls_cert"):
        tls_files(cert, None, ca)
    with pytest.raises(ConfigError, match="must be an absolute path"):
        load_config(None, {"daemon.tls_cert": "server.pem", "daemon.tls_key": str(key)}, ENV, euid=1000)
    with pytest.raises(ConfigError, match=r"tls_key: cannot read .*missing.key: No such file"):
        tls_files(cert, pki / "missing.key", None)
    with pytest.raises(ConfigError, match="are not a PEM certificate and its private key"):
        tls_files(cert, pki / "client.key", None)  # another certificate's key
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        tls_files(cert, key, pki / "server.ext")
    gone = TlsFiles(pki / "gone.pem", key)  # a file removed after the check, before the listeners bind
    with pytest.raises(ConfigError, match=r"cannot read .*gone.pem: No such file"):
        gone.server_credentials()


def test_off_loopback_needs_mutual_tls_or_insecure_tcp(pki: Path) -> None:
    anywhere, loopback = TcpAddress("0.0.0.0", 7070), TcpAddress("127.0.0.1", 7070)
    mutual = TlsFiles(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    server_only = TlsFiles(pki / "server.pem", pki / "server.key")
    check_tcp_policy(anywhere, insecure_tcp=False, tls=mutual)
    check_tcp_policy(anywhere, insecure_tcp=True, tls=None)
    check_tcp_policy(loopback, insecure_tcp=False, tls=server_only)
    with pytest.raises(AddressError, match="--tls-cert, --tls-key and --tls-client-ca"):
        check_tcp_policy(anywhere, insecure_tcp=False, tls=None)
    with pytest.raises(AddressError, match="TLS but no --tls-client-ca"):
        check_tcp_policy(anywhere, insecure_tcp=False, tls=server_only)


def test_mvllmd_refuses_tls_without_client_ca_off_loopback(
    pki: Path, short_tmp: Path, clean_env: dict[str, str]
) -> None:
    args = ["--listen", "0.0.0.0:7070", "--state-dir", str(short_tmp / "s"), *daemon_tls(pki)[:4]]
    done = run_mvllmd(args, clean_env)
    assert_short_error(done, 2, "refusing to listen on 0.0.0.0:7070 with TLS but no --tls-client-ca")


# --- a daemon and its clients ----------------------------------------------------------------------


def test_mutual_tls_lets_in_only_clients_of_its_ca(pki: Path, short_tmp: Path, spawn: Spawn) -> None:
    daemon = spawn(["--listen", "0.0.0.0:0", "--state-dir", str(short_tmp / "s"), *daemon_tls(pki)])
    address = f"127.0.0.1:{daemon.tcp_port}"

    ok = daemon.ctl(*client_tls(pki), "info", "--json", address=address)
    assert ok.returncode == 0, ok.stderr
    assert '"version"' in ok.stdout

    rogue_ca = ["--tls-ca", str(pki / "rogue-ca.pem"), *client_tls(pki)[2:]]
    cases = {
        "another CA's client": (client_tls(pki, "rogue"), "did the CA of its --tls-client-ca sign --tls-cert?"),
        "no client certificate": (client_tls(pki)[:2], "did the CA of its --tls-client-ca sign --tls-cert?"),
        "plaintext": ([], "if it listens with TLS, give --tls-ca"),
        "not our server's CA": (rogue_ca, "TLS handshake with mvllmd at 127.0.0.1:"),
    }
    for case, (flags, hint) in cases.items():
        done = daemon.ctl(*flags, "info", address=address, timeout=30)
        assert done.returncode == 3, (case, done.stderr)  # unreachable
        assert done.stderr.startswith("mvllmctl: ") and done.stderr.count("\n") == 1, (case, done.stderr)
        assert hint in done.stderr, (case, done.stderr)

    assert daemon.proc.poll() is None  # it goes on serving
    assert daemon.ctl(*client_tls(pki), "info", address=address).returncode == 0


def test_mvllmctl_names_an_unreadable_tls_file(pki: Path, short_tmp: Path, spawn: Spawn) -> None:
    daemon = spawn(["--listen", "127.0.0.1:0", "--state-dir", str(short_tmp / "s"), *daemon_tls(pki)])
    address = f"127.0.0.1:{daemon.tcp_port}"
    missing = daemon.ctl("--tls-ca", str(pki / "nope.pem"), "info", address=address)
    assert (missing.returncode, missing.stderr) == (
        2,
        f"mvllmctl: --tls-ca: cannot read {pki}/nope.pem: No such file or directory\n",
    )
    half = daemon.ctl("--tls-cert", str(pki / "client.pem"), "info", address=address)
    assert half.returncode == 2
    assert "needs both --tls-cert and --tls-key" in half.stderr
