"""The cluster CA, certificates for servers and agents, and gRPC credentials made from them.

`gse certs init --dir DIR` writes:
  ca.crt / ca.key          the cluster CA (keep ca.key off the hosts)
  server.crt / server.key  every server daemon (serverAuth and clientAuth: daemons also dial each other)
  agent.crt / agent.key    agents and proxies (clientAuth)
  client.crt / client.key  operator tools (clientAuth)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "gse-server", "127.0.0.1", "::1")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GSE"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(entries) -> x509.SubjectAlternativeName:
    names = []
    for e in entries:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(e)))
        except ValueError:
            names.append(x509.DNSName(e))
    return x509.SubjectAlternativeName(names)


def make_ca(cn: str = "GSE cluster CA", days: int = 3650):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca_key, ca_cert, cn: str, sans=(), server: bool = False, days: int = 825):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if sans:
        builder = builder.add_extension(_san(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600 if private else 0o644)


def init_certs(directory: str | os.PathLike, sans=(), force: bool = False) -> Path:
    """Make the CA and the server, agent and client certificates in `directory` (idempotent unless `force`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / "ca.crt").exists() and (d / "server.crt").exists() and not force:
        return d
    ca_key, ca_cert = make_ca()
    _write(d / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(d / "ca.key", _pem_key(ca_key), private=True)
    all_sans = list(dict.fromkeys([*DEFAULT_SANS, *sans]))
    for name, cn, is_server in (("server", "gse-server", True), ("agent", "gse-agent", False),
                                ("client", "gse-client", False)):
        key, cert = issue(ca_key, ca_cert, cn, all_sans if is_server else (), server=is_server)
        _write(d / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        _write(d / f"{name}.key", _pem_key(key), private=True)
    return d


@dataclass(frozen=True)
class TLSMaterial:
    ca: bytes
    cert: bytes
    key: bytes
    server_name: str = ""

    @classmethod
    def load(cls, tls_config) -> "TLSMaterial":
        return cls(Path(tls_config.ca).read_bytes(), Path(tls_config.cert).read_bytes(),
                   Path(tls_config.key).read_bytes(), tls_config.server_name)

    def server_credentials(self):
        import grpc
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self):
        import grpc
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)
