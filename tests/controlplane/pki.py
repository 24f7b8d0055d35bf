"""Certificates for a throwaway control plane, generated per run: a CA, the API server's serving certificate
(127.0.0.1 and the in-cluster names), client certificates, and the service-account signing key."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

_VALID = datetime.timedelta(days=2)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common: str, organisation: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if organisation:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    return x509.Name(parts)


@dataclass(frozen=True)
class Pki:
    """Paths of every PEM file the control plane needs."""

    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def ca_cert(self) -> Path:
        return self.path("ca.crt")


def _sign(
    ca_key: rsa.RSAPrivateKey,
    ca_name: x509.Name,
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    *,
    server: bool,
    ips: tuple[str, ...] = ("127.0.0.1",),
    dns: tuple[str, ...] = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server:
        alt = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        usage = x509.ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = x509.ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def generate(
    folder: Path, clients: dict[str, tuple[str, str | None]], server_ips: tuple[str, ...] = ("127.0.0.1",)
) -> Pki:
    """Write ca.crt/key, apiserver.crt/key (for `server_ips` and the in-cluster names), sa.key/pub and
    `<name>.crt/key` for each client (CN, O)."""
    folder.mkdir(parents=True, exist_ok=True)
    pki = Pki(folder)
    ca_key, ca_name = _key(), _name("batchinfer-test-ca")
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki.path("ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.path("ca.key").write_bytes(_pem_key(ca_key))
    issued = {"apiserver": (_name("kube-apiserver"), True)}
    issued.update({name: (_name(cn, org), False) for name, (cn, org) in clients.items()})
    for name, (subject, server) in issued.items():
        key = _key()
        cert = _sign(ca_key, ca_name, subject, key, server=server, ips=server_ips)
        pki.path(f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pki.path(f"{name}.key").write_bytes(_pem_key(key))
    sa = _key()
    pki.path("sa.key").write_bytes(_pem_key(sa))
    pki.path("sa.pub").write_bytes(
        sa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pki


def issue(
    pki: Pki,
    name: str,
    common: str,
    organisation: str | None = None,
    server_ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
) -> tuple[Path, Path]:
    """Sign `<name>.crt/key` with the run's CA: a server certificate for `server_ips` and `dns` names when given,
    else a client certificate (CN, O). Returns the certificate's and the key's paths."""
    ca_key = serialization.load_pem_private_key(pki.path("ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    ca_name = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).subject
    key = _key()
    server = bool(server_ips or dns)
    cert = _sign(ca_key, ca_name, _name(common, organisation), key, server=server, ips=server_ips, dns=dns)
    pki.path(f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.path(f"{name}.key").write_bytes(_pem_key(key))
    return pki.path(f"{name}.crt"), pki.path(f"{name}.key")
