"""Enrollment on the agent port: an agent without a certificate of its own gets one, once, with a token.

Where: the task server's agent port (48668). When `enroll.ca_key` is set, the port accepts a TLS client
that shows no certificate, for one frame only: an `Enroll` (token, bk_agent_id, a CSR made on the host).
The answer is `Enrolled` (the certificate, role agent, naming the id) or `Refused` with a code and reason;
then the link closes and the agent comes back with its new certificate. Any other first frame from a link
without a certificate is refused. The CA key is read by the task servers only; hosts never see it.

Checks, in order, so that a request that cannot succeed never burns a token: the id is valid and not
revoked, the CSR is sound (gse/common/tls.py check_csr), the token is known, unused, unexpired and (if it
names one) for this id; an id already enrolled needs a token naming it. The token is consumed atomically
in ZooKeeper (gse/common/enrollment.py): two task servers can never both accept one token.
"""

from __future__ import annotations

import dataclasses
import logging

from prometheus_client import Counter, Gauge

from gse.common import roles
from gse.common.records import valid_agent_id
from gse.common.config import ConfigError
from gse.common.enrollment import EnrollError, TokenStore
from gse.common.tls import CA, CertError, check_csr
from gse.pb import agent_pb2 as pb

log = logging.getLogger("gse.taskserver.enroll")


def key_id(public_key) -> str:
    """SHA-256 (hex) of a public key's DER encoding: which key a token was used for."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    return hashlib.sha256(public_key.public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()

ENROLLED = Counter("gse_taskserver_enrolled_total", "Agents enrolled (certificates signed)")
ENROLL_REFUSED = Counter("gse_taskserver_enroll_refused_total", "Enrollments refused", ["code"])
PENDING = Gauge("gse_taskserver_enroll_pending", "Enrollments in progress")


@dataclasses.dataclass(frozen=True)
class EnrollConfig:
    """The `enroll` section of the task server's config: the CA key and certificate it signs with (no key: no
    enrollment on this server), the validity of signed certificates (days), and how many enrollments may be in
    progress at once."""
    ca_key: str = ""                # the CA's key; "" = no enrollment here (links must show a certificate)
    ca_cert: str = ""               # the CA certificate; "" = tls.ca
    cert_days: int = 825            # validity of the certificates signed
    max_pending: int = 512          # enrollments in progress at once; more are refused "busy" (retried)

    @property
    def enabled(self) -> bool:
        """Enrollment is served here (a CA key is configured)."""
        return bool(self.ca_key)

    def validate(self) -> None:
        """ConfigError unless cert_days and max_pending are at least 1."""
        if self.cert_days < 1 or self.max_pending < 1:
            raise ConfigError("enroll: cert_days and max_pending must be at least 1")


class Enroller:
    """Answers one Enroll frame: a serialized ServerFrame (Enrolled or Refused)."""

    def __init__(self, ca: CA, store: TokenStore, deny: roles.DenyList, cert_days: int = 825,
                 max_pending: int = 512):
        self.ca, self.store, self.deny = ca, store, deny
        self.cert_days, self.max_pending = cert_days, max_pending
        self.pending = 0

    async def answer(self, peer: str, msg: pb.Enroll) -> bytes:
        """The answer to one Enroll frame from the link at `peer`: a serialized ServerFrame with `enrolled`
        (certificate and CA, PEM) or `refused` (code, reason; logged and counted). Raises only what the token store
        raises beyond EnrollError (ZooKeeper failures)."""
        try:
            cert = await self._enroll(peer, msg)
        except EnrollError as exc:
            ENROLL_REFUSED.labels(exc.code).inc()
            log.warning("enrollment refused", extra={"peer": peer, "agent_id": msg.agent_id[:64], "code": exc.code,
                                                     "reason": exc.reason})
            return pb.ServerFrame(refused=pb.Refused(reason=exc.reason, code=exc.code)).SerializeToString()
        ENROLLED.inc()
        log.info("agent enrolled", extra={"peer": peer, "agent_id": msg.agent_id})
        return pb.ServerFrame(enrolled=pb.Enrolled(certificate=cert, ca=self.ca.pem)).SerializeToString()

    async def _enroll(self, peer: str, msg: pb.Enroll) -> bytes:
        agent_id = msg.agent_id
        if not valid_agent_id(agent_id):
            raise EnrollError("bad_request", "bk_agent_id must be 1-64 printable characters")
        if agent_id in self.deny.agents:
            raise EnrollError("revoked", f"agent {agent_id} is revoked")
        if self.pending >= self.max_pending:
            raise EnrollError("busy", "too many enrollments in progress; retry shortly")
        try:
            public_key = check_csr(msg.csr, agent_id)      # before the token: a bad request burns none
        except CertError as exc:
            raise EnrollError("bad_request", str(exc)) from None
        self.pending += 1
        PENDING.inc()
        try:
            enrolled = await self.store.check_agent(agent_id)
            await self.store.consume(msg.token, agent_id, peer, enrolled, key_id(public_key))
            cert = self.ca.sign_key(public_key, agent_id, days=self.cert_days)
            await self.store.record(agent_id, roles.of_pem(cert).serial, peer, msg.token)
            return cert
        finally:
            self.pending -= 1
            PENDING.dec()
