"""A broken internal channel: the symptom of "Holding under load" made on purpose.

A TCP relay between a client and a real dbproxy flips one byte of one TLS record dbproxy sends. The client's
gRPC core cannot decrypt it (`Decryption error: TSI_DATA_CORRUPTED`) and the call fails with
`UNKNOWN: Stream removed (Unwrap failed (TSI_DATA_CORRUPTED))` (or UNAVAILABLE), as the API server's
channel did under load. An idempotent batch (reads, or declared) is sent once more on a fresh channel and
succeeds; a write not declared idempotent is never sent twice: its caller is told."""

from __future__ import annotations

import asyncio

import pytest

from gse.common import dbclient as db
from gse.common.address import split_host_port
from gse.common.errors import Unavailable
from gse.common.tls import TLSMaterial


class CorruptingRelay:
    """Relays TCP to `target`; while `armed`, flips a byte in the next chunk coming back from the target
    (on the connection that is open then), once."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.armed = False
        self.corrupted = 0
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, c_reader, c_writer) -> None:
        self.connections += 1
        s_reader, s_writer = await asyncio.open_connection(*self.target)

        async def pipe(reader, writer, back: bool):
            try:
                while data := await reader.read(65536):
                    if back and self.armed and len(data) > 40:
                        self.armed = False
                        self.corrupted += 1
                        data = data[:30] + bytes([data[30] ^ 0xFF]) + data[31:]
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(c_reader, s_writer, False), pipe(s_reader, c_writer, True))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_idempotent_batches_retry_once_on_a_fresh_channel(make_cluster):
    c = make_cluster()
    dbp = c.start_dbproxy()
    host, port = split_host_port(dbp.info["address"])
    tls = TLSMaterial.from_dir(c.certs_dir, "server")

    async def main():
        relay = CorruptingRelay((host, int(port)))
        await relay.start()
        client = db.DbClient(tls, [f"127.0.0.1:{relay.port}"], timeout_s=10)
        try:
            big = b"v" * 20000          # a response of several TLS records
            await client.execute([db.set_("fault:k", big)])
            # A read: the channel breaks mid-answer; retried once on a fresh connection, it succeeds.
            relay.armed = True
            (res,) = await client.execute([db.get("fault:k")])
            assert res.found and res.value == big
            assert relay.corrupted == 1 and client.renewed == 1 and relay.connections == 2
            # A write not declared idempotent: not sent twice; the caller is told what happened.
            relay.armed = True
            with pytest.raises(Unavailable) as err:
                await client.execute([db.append("fault:log", b"x" * 20000), db.get("fault:k")])
            assert relay.corrupted == 2 and client.renewed == 2
            # what the API server's log and `gse run` showed under load
            assert "Stream removed (Unwrap failed (TSI_DATA_CORRUPTED))" in str(err.value) \
                or "UNAVAILABLE" in str(err.value)
            # The same write declared idempotent (SET: twice is once) is retried and succeeds.
            relay.armed = True
            results = await client.execute([db.set_("fault:k2", big), db.get("fault:k")], idempotent=True)
            assert results[0].ok and results[1].value == big
            assert relay.corrupted == 3 and client.renewed == 3
        finally:
            await client.close()
            relay.close()

    asyncio.run(main())
