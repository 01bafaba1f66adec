"""Serving certificates: a tls.crt/tls.key pair from --cert-path, or a self-signed one made at start;
and the CA bundle (--client-ca-file) that client certificates must chain to for mutual TLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True, slots=True)
class KeyPair:
    """PEM-encoded certificate chain and private key."""

    cert: bytes
    key: bytes


def self_signed(hosts: list[str] | None = None, days: int = 3650) -> KeyPair:
    """A self-signed ECDSA P-256 certificate for the picker (Envoy's cluster skips validation)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = hosts or [socket.gethostname(), "localhost"]
    san: list[x509.GeneralName] = []
    for h in [*names, "127.0.0.1"]:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            san.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "epp"),
                         x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
    )


def load_dir(path: str) -> KeyPair | None:
    """tls.crt and tls.key from a directory (a mounted Secret); None when either is missing."""
    crt, key = os.path.join(path, "tls.crt"), os.path.join(path, "tls.key")
    if not (os.path.isfile(crt) and os.path.isfile(key)):
        return None
    with open(crt, "rb") as f1, open(key, "rb") as f2:
        return KeyPair(cert=f1.read(), key=f2.read())


def read_ca(path: str) -> bytes:
    """The PEM CA bundle at `path`, checked: ValueError when it holds no valid certificate (gRPC
    would otherwise fail later, at the first handshake, with a less clear message)."""
    with open(path, "rb") as f:
        pem = f.read()
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ValueError(f"{path}: no valid PEM certificate ({e})") from None
    if not certs:
        raise ValueError(f"{path}: no PEM certificate")
    return pem


class ReloadingCert:
    """Serves tls.crt/tls.key from a directory, re-read when either file changes (cert-manager
    or a rotated Secret), and the client CA bundle `ca_file` (when given) when it changes; gRPC
    asks at each new TLS handshake, so open streams are unaffected."""

    def __init__(self, path: str, ca_file: str = "") -> None:
        self.path = path
        self.ca_file = ca_file
        self._stamp = self._mtimes()
        pair = load_dir(path)
        if pair is None:
            raise FileNotFoundError(f"{path}: tls.crt and tls.key are required for certificate reload")
        self.current = pair
        self.ca: bytes | None = read_ca(ca_file) if ca_file else None

    def _mtimes(self) -> tuple[int, ...]:
        files = [os.path.join(self.path, "tls.crt"), os.path.join(self.path, "tls.key")]
        if self.ca_file:
            files.append(self.ca_file)
        try:
            return tuple(os.stat(f).st_mtime_ns for f in files)
        except OSError:
            return (0,) * len(files)

    def fetch(self) -> KeyPair | None:
        """The new pair when a file changed and all load cleanly (the CA bundle too: `ca`), else
        None (keep the current ones: a half-written or bad file never replaces a good one)."""
        stamp = self._mtimes()
        if stamp == self._stamp:
            return None
        pair = load_dir(self.path)
        if pair is None:
            return None
        ca = self.ca
        if self.ca_file:
            try:
                ca = read_ca(self.ca_file)
            except (OSError, ValueError):
                return None
        self._stamp = stamp
        self.current, self.ca = pair, ca
        return pair
