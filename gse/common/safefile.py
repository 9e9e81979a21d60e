"""Writing a file whose content is private (keys, tokens, state naming tokens): its mode is right from its
first byte, and a reader never sees half of it.

`write_private(path, data)` creates a temporary name beside `path` with O_CREAT|O_EXCL|O_NOFOLLOW and the
final mode (never a chmod after the write: a window where the bytes sit under the umask's mode is exactly
what a local reader waits for), writes, fsyncs and renames over `path`. A symlink planted at the temporary
name is not followed (O_EXCL fails on it), and the rename replaces a symlink at `path` rather than writing
through it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private(path: str | os.PathLike, data: bytes, mode: int = 0o600, sync: bool = True) -> Path:
    """Atomically replace `path` with `data`, created with `mode` (default 0600). Returns the path.
    `sync=False` skips the fsync (many files made at once by dev tooling, where a crash loses nothing).

    Raises OSError (the directory is missing or not writable); the temporary name is removed then."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_public(path: str | os.PathLike, data: bytes, sync: bool = True) -> Path:
    """`write_private` with mode 0644: certificates and other files anyone may read."""
    return write_private(path, data, 0o644, sync)
