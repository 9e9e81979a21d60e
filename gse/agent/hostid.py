"""The host identity file (spec section 11): what syncdata pushes, written where collectors read it.

`/var/lib/gse/host/hostid` by default (agent config `hostid_path`): plain JSON, root, mode 0644. Collectors
re-read it when its mtime changes, so it is only ever replaced whole: written under a temporary name in its
directory, owner and mode set, fsynced, renamed over the old one (gse/agent/safepath.py), so a reader sees the
old file or the new one, never a part. Content whose md5 is not the one the push names is refused (127).
The agent tells its task server the md5 of the file it has at every hello, so syncdata knows whether a host
that was offline still needs its file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os

from gse.common.errors import ErrorCode
from gse.pb import agent_pb2 as pb

from . import safepath

log = logging.getLogger("gse.agent.hostid")

DEFAULT_PATH = "/var/lib/gse/host/hostid"
MAX_BYTES = 1024 * 1024


class HostIdentityFile:
    """The identity file at `path`; writes are serialized (the newest version wins)."""

    def __init__(self, path: str = DEFAULT_PATH):
        self.path = path
        self.version = 0
        self._lock = asyncio.Lock()

    def md5(self) -> str:
        """md5 of the file as it is now; "" when there is none (or it cannot be read)."""
        try:
            with open(self.path, "rb") as f:
                return hashlib.md5(f.read(MAX_BYTES + 1)).hexdigest()
        except OSError:
            return ""

    async def write(self, msg: pb.HostIdentity) -> pb.HostIdentityResult:
        """Write a pushed identity; the result names the md5 now on the host."""
        if hashlib.md5(msg.content).hexdigest() != msg.md5.lower() or len(msg.content) > MAX_BYTES:
            return pb.HostIdentityResult(md5=await asyncio.to_thread(self.md5), version=self.version,
                                         error_code=ErrorCode.CHECKSUM,
                                         error_msg="the identity's content does not match its md5 (or is too large)")
        async with self._lock:
            if msg.version and msg.version < self.version:
                return pb.HostIdentityResult(md5=await asyncio.to_thread(self.md5), version=self.version,
                                             error_msg="an older version than the one written; ignored")
            directory, name = os.path.split(self.path)
            try:
                root = 0 if os.geteuid() == 0 else -1      # root-owned on hosts (the agent runs as root)
                await asyncio.to_thread(safepath.write_file, directory, name, bytes(msg.content), uid=root, gid=root,
                                        mode=0o644, create_dirs=True, dir_mode=0o755, durable=True)
            except (OSError, safepath.UnsafePath) as exc:
                log.warning("host identity not written", extra={"path": self.path, "error": str(exc)})
                return pb.HostIdentityResult(md5=await asyncio.to_thread(self.md5), version=self.version,
                                             error_code=ErrorCode.NOT_WRITABLE, error_msg=f"{self.path}: {exc}")
            self.version = msg.version
        log.info("host identity written", extra={"path": self.path, "md5": msg.md5, "version": msg.version})
        return pb.HostIdentityResult(md5=msg.md5.lower(), version=msg.version)
