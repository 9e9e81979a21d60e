"""The cluster CA and its certificates, each naming its holder's role; gRPC credentials made from them.

Every certificate carries its role as a subjectAltName URI `gse://role/<role>` (server, api, agent, proxy,
operator; gse/common/roles.py checks it), and an agent certificate made for one agent also carries
`gse://agent/<bk_agent_id>` (and that id as its CN).

`gse certs init --dir DIR` writes:
  ca.crt / ca.key              the cluster CA. ca.key stays on the servers' side: task servers sign agents'
                               enrollment requests with it; it is never copied to a managed host
  server.crt / server.key      every server daemon (serverAuth and clientAuth: daemons also dial each other)
  api.crt / api.key            the API server, as a client of dbproxy and the task servers
  operator.crt / operator.key  operator tools
  agent.crt / agent.key        only with --shared-agent: one agent certificate without an agent id, for
                               the original's shared-certificate mode (off unless the cluster switches it on)
`gse certs issue --role ROLE --name NAME [--agent-id ID]` makes more from the same CA; an agent's own
certificate can also be signed from a request made on its host (`CA.sign_request`), so that its key never
leaves the host.

Keys are written 0600 from their first byte (gse/common/safefile.py).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path


from . import roles
from .lazyimport import lazy_module
from .safefile import write_private, write_public


# cryptography (~13 MB) is loaded when a certificate is made or parsed, not by processes that only read files
x509 = lazy_module("cryptography.x509")
hashes = lazy_module("cryptography.hazmat.primitives.hashes")
serialization = lazy_module("cryptography.hazmat.primitives.serialization")
ec = lazy_module("cryptography.hazmat.primitives.asymmetric.ec")
rsa = lazy_module("cryptography.hazmat.primitives.asymmetric.rsa")
ExtendedKeyUsageOID = lazy_module("cryptography.x509.oid", "ExtendedKeyUsageOID")
NameOID = lazy_module("cryptography.x509.oid", "NameOID")

DEFAULT_SANS = ("localhost", "gse-server", "127.0.0.1", "::1")
SERVING_ROLES = (roles.SERVER, roles.PROXY)     # these also serve TLS: serverAuth and the server names
MAX_CSR_BYTES = 8192


class CertError(ValueError):
    """A certificate request or a certificate directory that cannot be used; the message says why."""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GSE"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_key():
    """A new private key (EC P-256)."""
    return ec.generate_private_key(ec.SECP256R1())


def pem_key(key) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (written 0600 by the caller)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(entries, uris) -> x509.SubjectAlternativeName:
    names: list = []
    for e in entries:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(e)))
        except ValueError:
            names.append(x509.DNSName(e))
    names.extend(x509.UniformResourceIdentifier(u) for u in uris)
    return x509.SubjectAlternativeName(names)


def role_uris(role: str, agent_id: str = "", area: int | None = None) -> list[str]:
    """The SAN URIs that name `role` (and the agent, for an agent certificate made for one agent; the area, for
    a proxy's)."""
    if role not in roles.ROLES:
        raise CertError(f"role '{role}' is not one of {', '.join(roles.ROLES)}")
    return ([roles.ROLE_URI + role] + ([roles.AGENT_URI + agent_id] if agent_id else [])
            + ([roles.AREA_URI + str(area)] if area is not None else []))


def make_ca(cn: str = "GSE cluster CA", days: int = 3650):
    """A new self-signed cluster CA (EC P-256 key, valid `days` days from five minutes ago, path length 0: it signs only
    end certificates): (key, cert)."""
    key = new_key()
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


def certify(ca_key, ca_cert, public_key, role: str, cn: str = "", sans=(), agent_id: str = "", days: int = 825,
            area: int | None = None):
    """A certificate for `public_key` naming `role` (and `agent_id`; for a proxy the `area` it serves, which it
    must name), signed by the CA."""
    from .records import valid_agent_id
    if agent_id and not valid_agent_id(agent_id):
        raise CertError("bk_agent_id must be 1-64 printable characters")
    if agent_id and role not in (roles.AGENT, roles.PROXY):
        raise CertError(f"only agent and proxy certificates name an agent, not {role}")
    if (area is not None) != (role == roles.PROXY):
        raise CertError("a proxy certificate names the area it serves (--area N), and only a proxy's does")
    if area is not None and not 0 < area < 2**31:
        raise CertError("a proxy's area is a bk_cloud_id above 0 (area 0 reaches the servers directly)")
    uris = role_uris(role, agent_id, area)
    serving = role in SERVING_ROLES
    names = list(dict.fromkeys([*DEFAULT_SANS, *sans])) if serving else list(sans)
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if serving else [])
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn or agent_id or f"gse-{role}")).issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(_san(names, uris), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def issue(ca_key, ca_cert, role: str, cn: str = "", sans=(), agent_id: str = "", days: int = 825,
          area: int | None = None):
    """A new key and its certificate for `role`: (key, cert)."""
    key = new_key()
    return key, certify(ca_key, ca_cert, key.public_key(), role, cn, sans, agent_id, days, area)


def make_csr(key, agent_id: str) -> bytes:
    """An agent's certificate request (PEM): its CN is the bk_agent_id; only the public key is used."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(agent_id)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def check_csr(csr_pem: bytes, agent_id: str):
    """The public key of an agent's certificate request, after checking it: PEM, at most MAX_CSR_BYTES,
    its signature verifies (the requester holds the key), its CN is `agent_id`, an EC key of 256 bits or
    more or an RSA key of 2048 or more. Raises CertError saying what is wrong."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CertError(f"certificate request larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CertError("not a PEM certificate request") from None
    if not csr.is_signature_valid:
        raise CertError("the certificate request's signature does not verify")
    cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [agent_id]:
        raise CertError(f"the certificate request's CN must be the bk_agent_id {agent_id!r}")
    pub = csr.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.key_size < 256:
            raise CertError("EC keys of fewer than 256 bits are not accepted")
    elif isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 2048:
            raise CertError("RSA keys of fewer than 2048 bits are not accepted")
    else:
        raise CertError("only EC and RSA keys are accepted")
    return pub


@dataclass(frozen=True)
class CA:
    """The cluster CA loaded from its two files (for signing on the servers' side)."""
    key: object
    cert: object
    pem: bytes

    @classmethod
    def load(cls, cert_path: str | os.PathLike, key_path: str | os.PathLike) -> "CA":
        """Load the CA from its certificate and key files (PEM, key unencrypted); raises CertError naming both paths
        when either cannot be read or parsed."""
        try:
            pem = Path(cert_path).read_bytes()
            cert = x509.load_pem_x509_certificate(pem)
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise CertError(f"cannot load the CA from {cert_path} and {key_path}: {exc}") from None
        return cls(key, cert, pem)

    def sign_request(self, csr_pem: bytes, agent_id: str, role: str = roles.AGENT, days: int = 825) -> bytes:
        """Sign an agent's (or a proxy's) request for `agent_id`: the certificate PEM (see check_csr)."""
        return self.sign_key(check_csr(csr_pem, agent_id), agent_id, role, days)

    def sign_key(self, public_key, agent_id: str, role: str = roles.AGENT, days: int = 825) -> bytes:
        """The certificate PEM for a public key already checked (check_csr), naming `agent_id`."""
        return pem_cert(certify(self.key, self.cert, public_key, role, agent_id=agent_id, days=days))

    def issue_files(self, directory: str | os.PathLike, name: str, role: str, *, agent_id: str = "", sans=(),
                    days: int = 825, sync: bool = True, area: int | None = None) -> Path:
        """Write `<name>.crt` and `<name>.key` (0600) for `role` into `directory` (a proxy's names its
        `area`); returns the .crt path."""
        d = Path(directory)
        key, cert = issue(self.key, self.cert, role, sans=sans, agent_id=agent_id, days=days, area=area)
        write_private(d / f"{name}.key", pem_key(key), sync=sync)
        return write_public(d / f"{name}.crt", pem_cert(cert), sync=sync)


INIT_PAIRS = (("server", roles.SERVER), ("api", roles.API), ("operator", roles.OPERATOR))


def init_certs(directory: str | os.PathLike, sans=(), force: bool = False, shared_agent: bool = False) -> Path:
    """Make the CA and the server, api and operator pairs in `directory` (and agent.crt/agent.key, one
    certificate for every host, with `shared_agent`). Files that exist are kept (a pair is made only when
    missing, from the existing CA) unless `force`, which makes a new CA and new pairs."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if force or not (d / "ca.crt").exists():
        ca_key, ca_cert = make_ca()
        write_private(d / "ca.key", pem_key(ca_key))
        write_public(d / "ca.crt", pem_cert(ca_cert))
        force = True
    ca = CA.load(d / "ca.crt", d / "ca.key")
    pairs = [*INIT_PAIRS, *((("agent", roles.AGENT),) if shared_agent else ())]
    for name, role in pairs:
        if force or not (d / f"{name}.crt").exists() or not (d / f"{name}.key").exists():
            ca.issue_files(d, name, role, sans=sans)
    return d


@dataclass(frozen=True)
class TLSMaterial:
    """The PEM bytes a daemon or tool presents and trusts on mutual TLS: the cluster CA, its own certificate and key,
    and the name to check in servers' certificates ("" = the dialled host)."""
    ca: bytes
    cert: bytes
    key: bytes
    server_name: str = ""

    @classmethod
    def load(cls, tls_config) -> "TLSMaterial":
        """Read the three files a `tls` config section (gse/common/config.py TLSConfig) names; raises OSError when one
        cannot be read."""
        return cls(Path(tls_config.ca).read_bytes(), Path(tls_config.cert).read_bytes(),
                   Path(tls_config.key).read_bytes(), tls_config.server_name)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, name: str, server_name: str = "") -> "TLSMaterial":
        """`ca.crt` and `<name>.crt`/`<name>.key` from a certificate directory (tools and tests)."""
        d = Path(directory)
        return cls((d / "ca.crt").read_bytes(), (d / f"{name}.crt").read_bytes(), (d / f"{name}.key").read_bytes(),
                   server_name)

    def identity(self) -> roles.Identity:
        """What this material's own certificate says (role, agent id)."""
        return roles.of_pem(self.cert)

    def server_credentials(self):
        """gRPC server credentials that require and verify a client certificate from the cluster CA."""
        import grpc
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self):
        """gRPC channel credentials that trust the cluster CA and present this certificate."""
        import grpc
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)
