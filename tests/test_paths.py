"""The agent's path checks for transfers that are plain functions (gse/agent/safepath.py `plain_parts`,
gse/agent/files.py `expand_source`, `link_leaves`, `parse_permission`) and private file writes
(gse/common/safefile.py): unit tests on a scratch directory, milliseconds each. The descriptor walks and races
are in test_safepath.py; the end-to-end refusals in test_files.py. Nothing here writes through a path a check
refused: the checks return parts, items or reasons."""

from __future__ import annotations

import os
import stat

import pytest

from gse.agent.files import FileError, expand_source, link_leaves, parse_permission
from gse.agent.safepath import UnsafePath, plain_parts
from gse.common.safefile import write_private


@pytest.mark.parametrize("rel,parts", [("a.txt", ["a.txt"]), ("sub/dir/a.txt", ["sub", "dir", "a.txt"]),
                                       ("./a.txt", ["a.txt"]), ("sub//a.txt", ["sub", "a.txt"]),
                                       ("..a/b..", ["..a", "b.."])])
def test_plain_parts_keeps_paths_below_their_directory(rel, parts):
    assert plain_parts(rel) == parts


@pytest.mark.parametrize("rel", ["../x", "sub/../../x", "sub/../x", "/etc/passwd", "", ".", "./", "a/\0b", ".."])
def test_plain_parts_refuses_escapes_absolute_empty_and_nul(rel):
    with pytest.raises(UnsafePath):
        plain_parts(rel)


@pytest.mark.parametrize("rel,target,leaves", [
    ("tree/a", "b", False), ("tree/sub/a", "../b", False), ("tree/a", "sub/../b", False),
    ("tree/a", "../outside", True), ("tree/sub/a", "../../x", True), ("tree/a", "/etc/passwd", True),
    ("tree/a", "", True), ("tree/a", "../tree/b", False), ("tree/a", "../treehouse/b", True),
])
def test_link_leaves_says_why_a_symlink_is_not_sent(rel, target, leaves):
    reason = link_leaves(rel, target)
    assert bool(reason) is leaves, reason


def test_expand_source_file_tree_wildcard_and_regex(tmp_path):
    src = tmp_path / "src"
    (src / "tree" / "sub").mkdir(parents=True)
    (src / "tree" / "empty").mkdir()
    (src / "tree" / "sub" / "b.bin").write_bytes(b"b")
    (src / "tree" / "a.sh").write_text("a")
    os.chmod(src / "tree" / "a.sh", 0o750)
    (src / "tree" / "inside").symlink_to("a.sh")
    (src / "tree" / "escape").symlink_to("/etc/hostname")
    for n in ("x.log", "y.log", "z.txt"):
        (src / n).write_text(n)

    base, found = expand_source(str(src), "x.log")
    assert base == str(src) and [(i.rel, i.path, i.kind) for i in found] == [("x.log", str(src / "x.log"), "file")]
    base, found = expand_source(str(src), "tree")
    assert base == str(src)
    got = {i.rel: (i.kind, bool(i.error)) for i in found}
    assert got == {"tree": ("dir", False), "tree/a.sh": ("file", False), "tree/empty": ("dir", False),
                   "tree/escape": ("link", True), "tree/inside": ("link", False), "tree/sub": ("dir", False),
                   "tree/sub/b.bin": ("file", False)}
    assert [i.rel for i in found].index("tree/sub") < [i.rel for i in found].index("tree/sub/b.bin")
    assert next(i for i in found if i.rel == "tree/a.sh").mode == 0o750
    assert [i.rel for i in expand_source(str(src), "*.log")[1]] == ["x.log", "y.log"]
    assert [i.rel for i in expand_source(str(src), "regex:[xz]\\..*")[1]] == ["x.log", "z.txt"]
    assert expand_source(str(src), "missing.txt") == (str(src), [])
    assert expand_source(str(tmp_path / "nowhere"), "*.log")[1] == []
    with pytest.raises(FileError, match="RE2"):
        expand_source(str(src), "regex:(?=x)")                            # not linear time: refused


@pytest.mark.parametrize("digits,mode", [(644, 0o644), (755, 0o755), (0, 0), (4755, 0o4755), (7, 0o7)])
def test_parse_permission_reads_chmod_digits(digits, mode):
    assert parse_permission(digits) == mode


@pytest.mark.parametrize("digits", [888, 649, 77777, -644])
def test_parse_permission_refuses_what_is_not_chmod_digits(digits):
    with pytest.raises(FileError):
        parse_permission(digits)


def test_write_private_has_its_mode_from_the_start_and_replaces_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    target = tmp_path / "token"
    target.symlink_to(victim)                                            # planted: must be replaced, not followed
    old = os.umask(0o022)
    try:
        write_private(target, b"secret")
    finally:
        os.umask(old)
    assert victim.read_text() == "untouched"
    assert not target.is_symlink() and target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_write_private_into_a_missing_directory_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        write_private(tmp_path / "missing" / "f", b"x")
    assert list(tmp_path.iterdir()) == []
