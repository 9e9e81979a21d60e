"""The agent's safe path operations (gse/agent/safepath.py): planted symlinks, raced renames, acting as a user.

Every test plants its traps in its own temporary directory and asserts on marker files only: a guard that
failed would write a marker, never a real system file.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from gse.agent import safepath as sp
from gse.agent.executor import Script, _RunAs, _write_scripts

ROOT = 0


@pytest.fixture
def world(tmp_path):
    """A world-writable sticky directory (like /tmp) and a marker directory an attacker would aim at."""
    w = tmp_path / "world"
    w.mkdir()
    os.chmod(w, 0o1777)
    marker = tmp_path / "marker"
    marker.mkdir()
    (marker / "victim").write_text("original\n")
    return w, marker


def nobody() -> sp.Identity:
    return sp.Identity.lookup("nobody")


def test_open_dir_refuses_symlink_planted_in_writable_dir(world):
    w, marker = world
    os.symlink(marker, w / "link")
    with pytest.raises(sp.UnsafePath, match="not followed"):
        sp.open_dir(str(w / "link" / "new"), ROOT, create=True)
    assert sorted(os.listdir(marker)) == ["victim"]


def test_open_dir_follows_a_link_only_root_could_have_made(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    safe = tmp_path / "safe"
    safe.mkdir()
    os.chmod(safe, 0o755)                      # root's, nobody else may write: its links are root's doing
    os.symlink(real, safe / "link")
    fd = sp.open_dir(str(safe / "link" / "made"), ROOT, create=True)
    os.close(fd)
    assert (real / "made").is_dir()
    os.lchown(safe / "link", 65534, 65534)     # the same link, but another user's: not followed
    with pytest.raises(sp.UnsafePath):
        sp.open_dir(str(safe / "link" / "made"), ROOT)


def test_auto_mkdir_never_follows_a_symlink_raced_in_after_mkdir(world, monkeypatch):
    """The attacker swaps the directory the agent just made for a symlink before the agent opens it."""
    w, marker = world
    real_mkdir = os.mkdir

    def mkdir_then_swap(name, mode=0o777, *, dir_fd=None):
        real_mkdir(name, mode, dir_fd=dir_fd)
        if name == "made":
            os.rmdir(name, dir_fd=dir_fd)
            os.symlink(marker, name, dir_fd=dir_fd)

    monkeypatch.setattr(sp.os, "mkdir", mkdir_then_swap)
    with pytest.raises(sp.UnsafePath):
        sp.open_dir(str(w / "made" / "deeper"), ROOT, create=True)
    monkeypatch.undo()
    assert sorted(os.listdir(marker)) == ["victim"]


def test_write_replaces_a_planted_symlink_and_never_writes_through_it(world):
    w, marker = world
    os.symlink(marker / "victim", w / "config.txt")
    sp.write_file(str(w), "config.txt", b"new\n", uid=65534, gid=65534, mode=0o640)
    st = os.lstat(w / "config.txt")
    assert not os.path.islink(w / "config.txt") and (w / "config.txt").read_bytes() == b"new\n"
    assert (st.st_uid, st.st_mode & 0o7777) == (65534, 0o640)
    assert (marker / "victim").read_text() == "original\n" and os.stat(marker / "victim").st_uid == 0


def test_temporary_names_are_exclusive(world, monkeypatch):
    """A symlink planted under the exact temporary name the agent picks is never opened (O_EXCL)."""
    w, marker = world
    dfd = os.open(w, os.O_RDONLY | os.O_DIRECTORY)
    names = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(sp.secrets, "token_hex", lambda n: next(names))
    os.symlink(marker / "made-by-agent", w / ".x.aaaaaaaaaaaa.tmp")
    try:
        fd, name = sp.create_temp(dfd, ".x.")
        os.close(fd)
    finally:
        os.close(dfd)
    assert name == ".x.bbbbbbbbbbbb.tmp"
    assert sorted(os.listdir(marker)) == ["victim"]


def test_racing_renames_never_redirect_a_write(world):
    """While files are written below w/sub, another thread keeps swapping w/sub between a real directory and a
    symlink to the marker directory: no write ever lands in the marker directory."""
    w, marker = world
    (w / "real").mkdir()
    stop = threading.Event()

    def swapper():
        while not stop.is_set():
            try:
                os.rename(w / "real", w / "sub")
                os.rename(w / "sub", w / "real")
                os.symlink(marker, w / "sub")
                os.unlink(w / "sub")
            except OSError:
                pass

    t = threading.Thread(target=swapper)
    t.start()
    written = refused = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                sp.write_file(str(w / "sub"), "out.txt", b"x", create_dirs=False)
                written += 1
            except (sp.UnsafePath, FileNotFoundError):
                refused += 1
    finally:
        stop.set()
        t.join()
    assert sorted(os.listdir(marker)) == ["victim"]
    assert written > 0 and refused > 0          # both outcomes happened: the race was real


@pytest.fixture
def public_dir():
    """A directory every user can reach (pytest's own are root's, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="gse-safepath-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_run_as_reads_and_writes_with_the_users_permissions(public_dir):
    base = public_dir
    secret = base / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    public = base / "public"
    public.write_text("anyone\n")

    async def main():
        with pytest.raises(PermissionError):
            await sp.run_as(nobody(), sp.open_source, str(secret))
        fd, st = await sp.run_as(nobody(), sp.open_source, str(public))
        os.close(fd)
        with pytest.raises(PermissionError):
            await sp.run_as(nobody(), sp.open_dir, str(base / "new"), 65534, create=True)
        fd, _st = await sp.run_as(sp.Identity.lookup("root"), sp.open_source, str(secret))
        os.close(fd)
        return st.st_size

    assert asyncio.run(main()) == len("anyone\n")
    assert secret.read_text() == "root only\n"          # the agent's own threads kept root's identity
    assert not (base / "new").exists()


def test_open_source_refuses_what_is_not_a_regular_file_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(sp.UnsafePath, match="not a regular file"):
        sp.open_source(str(fifo))
    assert time.monotonic() - t0 < 1.0


def test_scripts_are_written_safely(world):
    w, marker = world
    os.symlink(marker, w / "store")
    script = Script(name="job.sh", store_dir=str(w / "store"), content="echo hi\n")
    with pytest.raises(ValueError, match="not followed"):
        _write_scripts([script], _RunAs.lookup("nobody"))
    assert sorted(os.listdir(marker)) == ["victim"]
    os.symlink(marker / "victim", w / "job.sh")            # a planted link at the script's own name
    _write_scripts([Script(name="job.sh", store_dir=str(w), content="echo hi\n")], _RunAs.lookup("nobody"))
    st = os.lstat(w / "job.sh")
    assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o755) and (w / "job.sh").read_text() == "echo hi\n"
    assert (marker / "victim").read_text() == "original\n"
