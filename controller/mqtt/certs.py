"""A small private CA for the broker's TLS listener (`fleetctl certs`).

    STATE_DIR/pki/ca.key, ca.crt            the CA (ECDSA P-256, self-signed)
                                            (or an operator's own: ECDSA or RSA)
    STATE_DIR/pki/NAME.key, NAME.crt        a host's client certificate: CN=NAME,
                                            SAN DNS:NAME, extendedKeyUsage clientAuth
    STATE_DIR/pki/NAME.key, NAME.crt        with --server: the broker's certificate,
                                            SAN DNS:NAME, DNS:localhost, IP:127.0.0.1
                                            (+ --san), extendedKeyUsage serverAuth

Private keys are written 0600 (atomically: temp file, fsync, rename) and never
printed. The broker's `cafile` and the clients' `--ca-file` are ca.crt.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import InputError, StateError, UsageError
from protocol.numbers import whole
from protocol.topics import validate_host

PKI_DIR = "pki"
CA_NAME = "ca"
DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A top-level label is never all digits (RFC 1123 2.1, RFC 3696 2), so "999.1.1.1" is
# neither an IP address nor a DNS name.
DNS_RE = re.compile(rf"^(?=.{{1,253}}$)(?!(.*\.)?[0-9]+$){DNS_LABEL}(\.{DNS_LABEL})*$")
DNS_RULE = "letters, digits, '-' and '.', its last label not all digits"
KEY_MODE = 0o600
CN_MAX = 64  # X.509's upper bound for a commonName (RFC 5280 ub-common-name)
# 100 years. A validity is added to today's date, and X.509 (and Python's datetime) end
# with the year 9999: a bigger --days made the date computation overflow.
MAX_DAYS = 36500
# What a CA brought by an operator may sign with (`certs init` makes an ECDSA one).
CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Issued:
    key: Path
    cert: Path
    subject: str
    sans: tuple[str, ...]
    not_after: dt.datetime


def pki_dir(state_dir: Path) -> Path:
    return state_dir / PKI_DIR


def valid_days(value: int | str) -> int:
    """A certificate's validity in days: a whole number from 1 to MAX_DAYS."""
    return whole(value, minimum=1, maximum=MAX_DAYS)


def _days(value: int | str) -> int:
    try:
        return valid_days(value)
    except UsageError as exc:
        raise UsageError(f"--days {exc}") from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it, never widened it
        os.replace(tmp, path)
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror}") from None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ensure_dir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StateError(f"cannot create {d}: {exc.strerror}") from None


def init_ca(state_dir: Path, *, days: int = 3650, force: bool = False,
            name: str = "Flotilla fleet CA") -> Issued:
    """Create the CA key (0600) and self-signed certificate in STATE_DIR/pki."""
    days = _days(days)
    d = pki_dir(state_dir)
    key_path, cert_path = d / f"{CA_NAME}.key", d / f"{CA_NAME}.crt"
    if key_path.exists() and not force:
        raise InputError(f"{key_path} exists already (use --force to replace the CA; every "
                         "certificate it signed stops being trusted)")
    _ensure_dir(d)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Flotilla")])
    now = _now()
    not_after = now + dt.timedelta(days=days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), KEY_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(key_path, cert_path, name, (), not_after)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_ca(state_dir: Path) -> tuple[CAKey, x509.Certificate]:
    """The CA's key and certificate, made by `certs init` or brought by the operator:
    refused in one line unless the key is ECDSA or RSA, the certificate is a CA's, not
    expired, and is for that very key (else what it signs verifies against nothing)."""
    d = pki_dir(state_dir)
    key_path, cert_path = d / f"{CA_NAME}.key", d / f"{CA_NAME}.crt"
    if not key_path.exists() or not cert_path.exists():
        raise InputError(f"no CA in {d}: run 'fleetctl certs init' first")
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InputError(f"cannot load the CA key {key_path}: {_one_line(exc)}") from None
    if not isinstance(key, CAKey):
        raise InputError(f"{key_path} is not an ECDSA or RSA private key, the kinds the CA "
                         "can sign with")
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path))
        cert_key = _spki(cert.public_key())
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None  # a version 1 certificate, or one without the extension
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(f"cannot load the CA certificate {cert_path}: "
                         f"{_one_line(exc)}") from None
    if cert_key != _spki(key.public_key()):
        raise InputError(f"{key_path} does not match {cert_path}: the certificate is for "
                         "another key (put back the pair, or make a new CA with "
                         "'fleetctl certs init --force')")
    if constraints is not None and not constraints.ca:
        raise InputError(f"{cert_path} is not a CA certificate (basicConstraints CA:FALSE)")
    if cert.not_valid_after_utc <= _now():
        raise InputError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: make "
                         "a new CA with 'fleetctl certs init --force'")
    return key, cert


def _authority_key_id(ca_key: CAKey, ca_cert: x509.Certificate
                      ) -> x509.AuthorityKeyIdentifier:
    """What names the CA in a certificate it signs: its SubjectKeyIdentifier, or for a CA
    certificate without one (it is optional in a self-signed certificate) the same
    identifier computed from its public key (RFC 5280 4.2.1.2, method 1)."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def san_entry(value: str) -> x509.GeneralName:
    """One --san: an IP address (without an IPv6 zone, which a certificate cannot hold)
    or a DNS name."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise UsageError(f"invalid --san {value!r}: a certificate cannot hold the zone "
                             f"'%{address.scope_id}' of an IPv6 address (give "
                             f"{value.partition('%')[0]})")
        return x509.IPAddress(address)
    if not DNS_RE.fullmatch(value):
        raise UsageError(f"invalid --san {value!r}: not an IP address, nor a DNS name "
                         f"({DNS_RULE})")
    return x509.DNSName(value.lower())


def issue(state_dir: Path, name: str, *, server: bool = False, extra_sans: list[str] | None = None,
          days: int = 825, force: bool = False) -> Issued:
    """Key (0600) and certificate for host NAME (client) or the broker (server)."""
    days = _days(days)
    if server:
        if not DNS_RE.fullmatch(name):
            raise UsageError(f"invalid broker name {name!r}: use its DNS name ({DNS_RULE}; "
                             "an IP address goes in --san)")
        if len(name) > CN_MAX:  # a longer DNS name can still be a --san
            raise UsageError(f"invalid broker name {name!r}: a certificate's CN holds at "
                             f"most {CN_MAX} characters (give a shorter name, and this one "
                             "as --san)")
    else:
        validate_host(name)
    if name == CA_NAME:
        raise UsageError(f"{name!r} is reserved for the CA's own files")
    sans: list[x509.GeneralName] = [x509.DNSName(name.lower())]
    if server:
        sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for extra in extra_sans or []:
        entry = san_entry(extra)
        if entry not in sans:
            sans.append(entry)
    ca_key, ca_cert = load_ca(state_dir)
    d = pki_dir(state_dir)
    key_path, cert_path = d / f"{name}.key", d / f"{name}.crt"
    if key_path.exists() and not force:
        raise InputError(f"{key_path} exists already (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
            content_commitment=False, data_encipherment=False, key_agreement=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(_authority_key_id(ca_key, ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _ensure_dir(d)
    _write(key_path, _key_pem(key), KEY_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(key_path, cert_path, name, tuple(_san_text(s) for s in sans), not_after)


def _san_text(entry: x509.GeneralName) -> str:
    if isinstance(entry, x509.IPAddress):
        return f"IP:{entry.value}"
    return f"DNS:{entry.value}"
