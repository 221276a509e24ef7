"""The fleet's certificates: one CA, and a certificate for each host (an mvllmd) and each user (mvllmctl),
made with `cryptography`'s x509 builder: EC P-256 keys, SHA-256 signatures.

    DIR/ca.pem     the fleet CA's certificate: every host's --tls-client-ca, every user's --tls-ca
    DIR/ca.key     the CA's key: it signs new hosts and users, and stays on the admin's machine
    DIR/NAME.pem   a host's or a user's certificate (that certificate alone, no chain)
    DIR/NAME.key   its private key

Keys are written with mode 0600, and no file is ever overwritten unless the caller says `force`.
A certificate is valid from 5 minutes before it is made (clocks drift) and never outlives its CA.

Who is on the other end of a connection (`identity`), from the client certificate that the TLS layer
has already checked against the fleet CA:

- a **host** (a peer mvllmd) only if its extended key usage holds BOTH serverAuth and clientAuth AND it
  has the URI SAN `mvllm://host/NAME`;
- a **user** if it has the URI SAN `mvllm://user/NAME` and is not a host;
- anything else: no identity (None). A certificate that names two hosts, or two users, is neither.

A user's certificate carries clientAuth alone, so it can never act as a peer: what it may do is what a
user may do, whatever URIs it holds.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mvllmd.errors import ConfigError, storage_error

Kind = Literal["host", "user"]

CA_FILE, CA_KEY_FILE = "ca.pem", "ca.key"
FLEET_NAME = "mvllm fleet"  # the CA's name, and its O, unless the admin names the fleet
HOST_OU, USER_OU = "mvllm-host", "mvllm-user"
URI_PREFIX = "mvllm://"
SKEW = datetime.timedelta(minutes=5)  # a certificate is valid this long before it is made
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Identity:
    kind: Kind
    name: str


class Pair(NamedTuple):
    cert: Path
    key: Path


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: CaKey


# --- making certificates ---------------------------------------------------------------------------


def make_ca(
    directory: Path, name: str = FLEET_NAME, *, days: int = 3650, force: bool = False,
    valid_from: datetime.datetime | None = None,
) -> Pair:  # fmt: skip
    """Write DIR/ca.pem and DIR/ca.key: a new fleet CA called `name` (its CN and O)."""
    _check_fleet_name(name)
    _check_days(days)
    pair = Pair(directory / CA_FILE, directory / CA_KEY_FILE)
    _check_free(pair, force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
    ])  # fmt: skip
    not_before, not_after = _validity(valid_from, days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    _write_pair(pair, builder.sign(key, hashes.SHA256()), key, force)
    return pair


def make_host(
    directory: Path, name: str, addresses: list[str], *, days: int = 825, force: bool = False,
    ca_dir: Path | None = None, valid_from: datetime.datetime | None = None,
) -> Pair:  # fmt: skip
    """Write DIR/NAME.pem and DIR/NAME.key for a host that serves and dials (serverAuth + clientAuth),
    named by each of `addresses` (IP or DNS name; a port is dropped) and by mvllm://host/NAME."""
    check_name(name)
    if not addresses:
        raise ConfigError(f"host {name!r}: give at least one address that peers dial, e.g. 10.0.0.2:7070")
    names = _san_names(addresses)
    return _make_leaf(directory, name, "host", names, days=days, force=force, ca_dir=ca_dir, valid_from=valid_from)


def make_user(
    directory: Path, name: str, *, days: int = 825, force: bool = False, ca_dir: Path | None = None,
    valid_from: datetime.datetime | None = None,
) -> Pair:  # fmt: skip
    """Write DIR/NAME.pem and DIR/NAME.key for an mvllmctl user: clientAuth only, mvllm://user/NAME."""
    check_name(name)
    return _make_leaf(directory, name, "user", [], days=days, force=force, ca_dir=ca_dir, valid_from=valid_from)


def _make_leaf(
    directory: Path, name: str, kind: Kind, names: list[x509.GeneralName], *, days: int, force: bool,
    ca_dir: Path | None, valid_from: datetime.datetime | None,
) -> Pair:  # fmt: skip
    _check_days(days)
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _check_free(pair, force)
    ca = _load_ca(ca_dir or directory)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(valid_from, days)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind == "host":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    san = [*names, x509.UniformResourceIdentifier(uri(kind, name))]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_leaf_subject(name, kind, ca.cert))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    _write_pair(pair, builder.sign(ca.key, hashes.SHA256()), key, force)
    return pair


def uri(kind: Kind, name: str) -> str:
    return f"{URI_PREFIX}{kind}/{name}"


def _leaf_subject(name: str, kind: Kind, ca: x509.Certificate) -> x509.Name:
    fleet = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(fleet[0].value) if fleet else FLEET_NAME),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, HOST_OU if kind == "host" else USER_OU),
    ])  # fmt: skip


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _authority_key_id(ca: _Ca) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # a CA made elsewhere
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _validity(valid_from: datetime.datetime | None, days: int) -> tuple[datetime.datetime, datetime.datetime]:
    """From SKEW before `valid_from` (now, unless a test asks for a certificate already expired) to
    `days` after it."""
    start = valid_from or datetime.datetime.now(datetime.UTC)
    return start - SKEW, start + datetime.timedelta(days=days)


# --- checks ----------------------------------------------------------------------------------------


def check_name(name: str) -> None:
    """A host's or user's name: it names files and a URI, so it is a short, plain word."""
    if not NAME_RULE.fullmatch(name):
        raise ConfigError(
            f"name {name!r}: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "([A-Za-z0-9][A-Za-z0-9._-]{0,62})"
        )
    if name.lower() == "ca":
        raise ConfigError(f"name {name!r}: ca.pem and ca.key are the fleet CA's own files; choose another name")


def _check_fleet_name(name: str) -> None:
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise ConfigError(f"fleet name {name!r}: use 1 to 64 printable characters")


def _check_days(days: int) -> None:
    if days < 1:
        raise ConfigError(f"days {days}: a certificate must be valid for at least 1 day")


def _check_free(pair: Pair, force: bool) -> None:
    taken = [str(path) for path in pair if os.path.lexists(path)]
    if taken and not force:
        exist = "they exist" if len(taken) > 1 else "it exists"
        raise ConfigError(f"refusing to overwrite {' and '.join(taken)}: {exist} (--force replaces them)")


def _san_names(addresses: list[str]) -> list[x509.GeneralName]:
    """The SAN entries for the addresses that peers dial, each once, in the order given."""
    names: list[x509.GeneralName] = []
    for address in addresses:
        entry = _san_name(address)
        if entry not in names:
            names.append(entry)
    return names


def _san_name(address: str) -> x509.GeneralName:
    """10.0.0.2, 10.0.0.2:7070, [::1]:7070, ::1, gpu-1.lan:7070, https://gpu-1.lan:7080: the host part,
    as an IP address when it is one, else as a DNS name."""
    host, _ = split_address(address)
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"address {address!r}: expected an IP address or a DNS name, with or without a port")
    return x509.DNSName(host.removesuffix(".").lower())


def split_address(address: str) -> tuple[str, str | None]:
    """An address's host and port (None without one), from host, host:port, [v6]:port, a bare IPv6
    address, or a URL (scheme://host:port/...)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]")
        return host, port.removeprefix(":") or None
    if rest.count(":") == 1:
        host, _, port = rest.partition(":")
        return host, port or None
    return rest, None  # no port, or a bare IPv6 address


# --- reading ---------------------------------------------------------------------------------------


def _load_ca(directory: Path) -> _Ca:
    cert_path, key_path = directory / CA_FILE, directory / CA_KEY_FILE
    if not cert_path.exists():
        raise ConfigError(
            f"no fleet CA in {directory}: {cert_path} does not exist (make one with `mvllmd certs ca --dir "
            f"{directory}`, or give --ca-dir)"
        )
    cert = _read_cert(cert_path)
    key = _read_key(key_path)
    if not _is_ca(cert):
        raise ConfigError(f"{cert_path} is not a CA certificate (its basic constraints say CA:FALSE)")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ConfigError(f"{key_path} is not the key of {cert_path}")
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise ConfigError(f"the fleet CA {cert_path} expired on {_date(cert)}; make a new one (and new certificates)")
    return _Ca(cert, key)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError:
        raise ConfigError(f"{path} holds no PEM certificate") from None


def _read_key(path: Path) -> CaKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except TypeError:  # a passphrase protects it
        raise ConfigError(f"{path} is encrypted; mvllmd certs reads unencrypted keys only") from None
    except ValueError:
        raise ConfigError(f"{path} holds no PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{path}: the CA's key must be an EC or RSA key")
    return key


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


# --- who is it -------------------------------------------------------------------------------------


def identity(pem: bytes) -> Identity | None:
    """Host, user or nobody, by the rule in this module's docstring. `pem` is the client certificate that
    gRPC's `context.auth_context()["x509_pem_cert"][0]` holds (already checked against the fleet CA)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return _identity(cert)


def _identity(cert: x509.Certificate) -> Identity | None:
    hosts, users = _uri_names(cert, "host"), _uri_names(cert, "user")
    if len(hosts) == 1 and {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= _usages(cert):
        return Identity("host", hosts[0])
    if len(users) == 1:
        return Identity("user", users[0])
    return None


def _uri_names(cert: x509.Certificate, kind: Kind) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    prefix = uri(kind, "")
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return [u[len(prefix) :] for u in uris if u.startswith(prefix) and NAME_RULE.fullmatch(u[len(prefix) :])]


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def describe(path: Path) -> str:
    """One line about a certificate (CN, kind, SAN names, expiry) or a key file, for the CLI."""
    data = _read(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        key = _read_key(path)
        kind = f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey) else f"RSA {key.key_size}"
        return f"{path}: private key ({kind}), mode {path.stat().st_mode & 0o777:04o}"
    cert = _read_cert(path)
    who = _identity(cert)
    kind = "CA" if _is_ca(cert) else who.kind if who else "certificate"
    cn = ", ".join(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    names = ", ".join(_san_strings(cert))
    return f"{path}: {kind} {cn!r}" + (f", names {names}" if names else "") + f", valid until {_date(cert)}"


def _san_strings(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san]


def _date(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")


# --- writing ---------------------------------------------------------------------------------------


def _write_pair(pair: Pair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, force: bool) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    directory = pair.cert.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, "creating", directory) from None
    try:
        _write(pair.key, key_pem, 0o600, force)
        try:
            _write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
        except BaseException:
            pair.key.unlink(missing_ok=True)  # a key without its certificate is of no use
            raise
    except FileExistsError as exc:  # made between the check and the write
        raise ConfigError(f"refusing to overwrite {exc.filename}: it exists (--force replaces it)") from None
    except OSError as exc:
        raise storage_error(exc, "writing", exc.filename or directory) from None


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create `path` with `mode`; never over an existing file, unless `force`: then replace it whole."""
    if not force:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)  # the umask may have taken bits that a certificate needs
            file.write(data)
        return
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
