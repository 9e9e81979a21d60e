"""The agent link transport (gse/common/framelink.py): frames over mutual TLS, in process, real certificates."""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest

from gse.common import framelink
from gse.common.tls import TLSMaterial, init_certs


def material(d, name: str) -> TLSMaterial:
    return TLSMaterial((d / "ca.crt").read_bytes(), (d / f"{name}.crt").read_bytes(), (d / f"{name}.key").read_bytes())


class Recorder:
    """A link handler that keeps what it saw (copies: a frame's memoryview is only valid during the call)."""

    def __init__(self, echo: bool = False):
        self.frames: list[bytes] = []
        self.links = []
        self.lost: list = []
        self.echo = echo
        self.got = asyncio.Event()

    def link_open(self, link):
        self.links.append(link)

    def link_frame(self, link, body):
        data = bytes(body)
        self.frames.append(data)
        self.got.set()
        if self.echo:
            link.write(data)

    def link_lost(self, link, exc):
        self.lost.append(link)
        self.got.set()

    async def wait(self, pred, timeout=10.0):
        async with asyncio.timeout(timeout):
            while not pred():
                self.got.clear()
                await self.got.wait()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return init_certs(tmp_path_factory.mktemp("certs"), shared_agent=True)


async def serve(certs, handler):
    sock = framelink.bind("127.0.0.1", 0)
    server = await framelink.listen(framelink.server_context(material(certs, "server")), handler, sock)
    return server, sock.getsockname()[1]


def test_frames_of_every_size_cross_records_and_reads(certs):
    """Small frames, frames larger than a TLS slice and a 3 MiB frame arrive whole and in order, both ways."""
    async def main():
        srv_h, cli_h = Recorder(echo=True), Recorder()
        server, port = await serve(certs, srv_h)
        link = await framelink.dial(framelink.client_context(material(certs, "agent")), "127.0.0.1", port, cli_h,
                                    server_hostname="127.0.0.1")
        sizes = [0, 1, 4091, 4092, 4093, 5000, 65536, 3 << 20, 7]
        sent = [os.urandom(n) for n in sizes]
        for body in sent:
            assert link.write(body)
        await cli_h.wait(lambda: len(cli_h.frames) == len(sent))
        assert cli_h.frames == sent
        assert srv_h.frames == sent
        assert srv_h.links[0].peer.startswith("ipv4:127.0.0.1:")
        link.close()
        await srv_h.wait(lambda: srv_h.lost)          # close_notify ends the server's side
        assert srv_h.links[0].error == ""
        server.close()
    asyncio.run(main())


def test_many_frames_in_one_record_and_a_frame_split_byte_by_byte(certs):
    """Framing does not depend on how TLS records and reads cut the stream."""
    async def main():
        srv_h = Recorder()
        server, port = await serve(certs, srv_h)
        link = await framelink.dial(framelink.client_context(material(certs, "agent")), "127.0.0.1", port,
                                    Recorder(), server_hostname="127.0.0.1")
        bodies = [f"frame {i}".encode() * (i % 5) for i in range(200)]
        blob = b"".join(framelink.HDR.pack(len(b)) + b for b in bodies)
        link.obj.write(blob)                          # one TLS write holding 200 frames
        link.transport.write(link.out.read())
        tail = framelink.HDR.pack(3) + b"end"
        for i in range(len(tail)):                    # then one frame, one byte per TLS record
            link.obj.write(tail[i:i + 1])
            link.transport.write(link.out.read())
            await asyncio.sleep(0.01)
        await srv_h.wait(lambda: len(srv_h.frames) == 201)
        assert srv_h.frames == [*bodies, b"end"]
        link.close()
        server.close()
    asyncio.run(main())


def test_oversized_frame_header_ends_the_link(certs):
    async def main():
        srv_h = Recorder()
        server, port = await serve(certs, srv_h)
        cli_h = Recorder()
        link = await framelink.dial(framelink.client_context(material(certs, "agent")), "127.0.0.1", port, cli_h,
                                    server_hostname="127.0.0.1")
        link.obj.write(framelink.HDR.pack(framelink.MAX_FRAME + 1) + b"x" * 10)
        link.transport.write(link.out.read())
        await srv_h.wait(lambda: srv_h.lost)
        assert "frame of" in srv_h.links[0].error
        assert srv_h.frames == []
        await cli_h.wait(lambda: cli_h.lost)
        assert not link.write(b"after the end")       # a closed link takes nothing
        server.close()
    asyncio.run(main())


def test_a_frame_over_the_limit_is_not_sent(certs, monkeypatch):
    monkeypatch.setattr(framelink, "MAX_FRAME", 1000)

    async def main():
        srv_h = Recorder()
        server, port = await serve(certs, srv_h)
        link = await framelink.dial(framelink.client_context(material(certs, "agent")), "127.0.0.1", port,
                                    Recorder(), server_hostname="127.0.0.1")
        with pytest.raises(ValueError):
            link.write(b"x" * 1001)
        assert link.write(b"y" * 1000)                # the link is still good
        await srv_h.wait(lambda: srv_h.frames)
        assert srv_h.frames == [b"y" * 1000]
        link.close()
        server.close()
    asyncio.run(main())


def test_client_certificate_of_another_ca_is_refused(certs, tmp_path):
    """Mutual TLS: an agent with a certificate from a foreign CA never gets a frame through."""
    foreign = init_certs(tmp_path / "foreign", shared_agent=True)

    async def main():
        srv_h = Recorder()
        server, port = await serve(certs, srv_h)
        bad = TLSMaterial((certs / "ca.crt").read_bytes(), (foreign / "agent.crt").read_bytes(),
                          (foreign / "agent.key").read_bytes())
        cli_h = Recorder()
        try:
            link = await framelink.dial(framelink.client_context(bad), "127.0.0.1", port, cli_h,
                                        server_hostname="127.0.0.1", timeout=5)
        except OSError:
            link = None                               # TLS 1.2: refused during the handshake
        if link is not None:                          # TLS 1.3: the client finishes first, then hears the alert
            link.write(b"hello?")
            await cli_h.wait(lambda: cli_h.lost)
            assert "TLS" in link.error
        await srv_h.wait(lambda: srv_h.lost)
        assert srv_h.frames == []
        assert not srv_h.links[0].ready
        server.close()
    asyncio.run(main())


def test_server_name_is_checked_and_alpn_is_required(certs):
    async def main():
        server, port = await serve(certs, Recorder())
        ctx = framelink.client_context(material(certs, "agent"))
        with pytest.raises(framelink.LinkError, match="handshake"):
            await framelink.dial(ctx, "127.0.0.1", port, Recorder(), server_hostname="not-the-server", timeout=5)
        plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # a TLS client that does not speak gse-agent/1
        plain.load_verify_locations(cadata=(certs / "ca.crt").read_text())
        plain.load_cert_chain(certs / "agent.crt", certs / "agent.key")
        plain.set_alpn_protocols(["h2"])
        with pytest.raises(framelink.LinkError, match="gse-agent/1"):
            await framelink.dial(plain, "127.0.0.1", port, Recorder(), server_hostname="127.0.0.1", timeout=5)
        server.close()
    asyncio.run(main())


def test_dial_times_out_against_a_silent_server(certs):
    async def main():
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        with pytest.raises(TimeoutError):
            await framelink.dial(framelink.client_context(material(certs, "agent")), "127.0.0.1", port, Recorder(),
                                 server_hostname="127.0.0.1", timeout=0.5)
        silent.close()
    asyncio.run(main())


def test_a_coalescing_link_keeps_order_sends_few_writes_and_flushes_on_close(certs):
    """Small frames written in one loop turn leave together (few transport writes); a large frame or close in
    between keeps the order; memoryviews are copied before the call returns."""
    async def main():
        srv_h = Recorder()
        server, port = await serve(certs, srv_h)
        link = await framelink.dial(framelink.client_context(material(certs, "agent")), "127.0.0.1", port,
                                    Recorder(), server_hostname="127.0.0.1")
        link.coalesce = True
        writes = []                                   # the coalesced sends (each one writelines call)
        real_writelines = link.transport.writelines
        link.transport.writelines = lambda chunks: (writes.append(len(chunks)), real_writelines(chunks))
        scratch = bytearray(b"x" * 100)
        small = []
        for i in range(2000):
            scratch[:8] = f"{i:08d}".encode()
            small.append(bytes(scratch))
            assert link.write(memoryview(scratch))    # reused buffer: what was written must not change
        big = os.urandom(20000)
        assert link.write(big)                        # sends what gathered first, then itself
        assert link.write(b"after")
        link.close()                                  # sends the gathered frame before close_notify
        await srv_h.wait(lambda: len(srv_h.frames) == len(small) + 2 or srv_h.lost)
        assert srv_h.frames == [*small, big, b"after"]
        assert len(writes) == 3, writes               # the 2,000, the big one, "after": not one send per frame
        server.close()
    asyncio.run(main())
