"""POSIX through the Linux kernel's v9fs, and what the host holds afterwards (issues 16
and 13.2): one UML guest, its share mounted exactly as ``python -m sigpoll.guest run
--share`` mounts it, served by the guest runtime's own 9P server with its defaults.

The guest's root runs tests/support/posix_checks.py on the share (ownership of what root and an
unprivileged user create, the refusals that user gets on root's files, modes under the
umask, set-id bits at creation, times on symlinks, ctime after chown(-1, -1), NAME_MAX and
PATH_MAX, and what root may do there: device nodes, file capabilities, trusted.*).  The
same script runs on the host's own file system first, where every check must pass, so
each expectation is Linux's own behaviour.  Then the host side is checked: no device
node, fifo, set-id bit or privileged extended attribute reached it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

import sigpoll
from sigpoll.guest import Guest

try:  # the guest branch moves it into sigpoll.guest
    from sigpoll.guest import _uml
except ImportError:  # pragma: no cover - before that move
    from sigpoll import _uml  # type: ignore[no-redef]

CHECKS = Path(__file__).with_name("support") / "posix_checks.py"
PYTHON = "/usr/bin/python3"  # the guest sees the host's root: a Python outside /root

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="plays root and another user")


def _results(output: bytes) -> dict[str, list[Any]]:
    for line in output.decode(errors="replace").splitlines():
        if line.startswith("POSIX-RESULTS "):
            results: dict[str, list[Any]] = json.loads(line.split(" ", 1)[1])
            return results
    raise AssertionError(f"no results in the output: {output[-3000:]!r}")


def _failures(results: dict[str, list[Any]]) -> list[str]:
    return [f"{name}: saw {seen}" for name, (ok, seen) in sorted(results.items()) if not ok]


@needs_root
def test_the_checks_are_what_linux_does_on_a_local_file_system() -> None:
    python = PYTHON if os.path.exists(PYTHON) else sys.executable
    # Not under tmp_path, whose parents only root may enter: the checks' other user
    # must reach the directory.
    with tempfile.TemporaryDirectory(prefix="sigpoll-posix-") as top:
        os.chmod(top, 0o755)
        out = subprocess.run([python, str(CHECKS), top], capture_output=True,
                             check=True, timeout=120).stdout
    results = _results(out)
    assert len(results) > 50
    assert _failures(results) == []


def _host_view(export: Path) -> list[str]:
    """Everything in ``export`` a host program could trip on or be granted by."""
    found = []
    # fwalk: the tree goes deeper than PATH_MAX, so names are reached from a dir fd.
    for dirpath, dirnames, filenames, dirfd in os.fwalk(export):
        for name in dirnames + filenames:
            st = os.lstat(name, dir_fd=dirfd)
            rel = os.path.join(os.path.relpath(dirpath, export), name)[:80]
            kind = stat.S_IFMT(st.st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                found.append(f"{rel}: file type {kind:o}")
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(f"{rel}: set-id mode {st.st_mode:o}")
            if st.st_mode & 0o022:
                found.append(f"{rel}: group/other writable {st.st_mode:o}")
            if st.st_uid != os.geteuid():
                found.append(f"{rel}: owned by {st.st_uid} on the host")
            for attr in os.listxattr(f"/proc/self/fd/{dirfd}/{name}", follow_symlinks=False):
                if not attr.startswith("user."):
                    found.append(f"{rel}: xattr {attr}")
    return found


@needs_root
@pytest.mark.timeout(600)
def test_posix_through_v9fs_and_nothing_privileged_on_the_host(tmp_path: Path) -> None:
    try:
        _uml.find_kernel()
    except _uml.UmlNotFound as exc:  # pragma: no cover - installed on these machines
        pytest.skip(str(exc))
    export = tmp_path / "export"
    export.mkdir()

    async def main() -> tuple[bytes, bytes]:
        async with Guest(shares=[f"{export}:x"]) as g:
            checks = await g.run(f"{PYTHON} {g.copy_in(CHECKS)} /mnt/x", timeout=400)
            mount = await g.run("grep ' /mnt/x ' /proc/mounts", timeout=30)
        return checks.output, mount.output

    output, mount = sigpoll.run(main())
    results = _results(output)
    assert len(results) > 50
    assert _failures(results) == []
    assert b"access=client" in mount, mount

    # The host holds plain files and directories, owned by the server, with no set-id
    # bit, no group or other write, and no attribute outside user.*.
    assert _host_view(export) == []
    priv = export / "posix" / "priv"
    for name in ("kmsg", "disk", "fifo", "capfile", "suid"):
        st = os.lstat(priv / name)
        assert stat.S_ISREG(st.st_mode), name
    assert os.lstat(priv / "kmsg").st_size == 0
    assert stat.S_IMODE(os.lstat(priv / "kmsg").st_mode) == 0o600
    # The guest's symlinks are files holding their targets: nothing on the host follows them.
    assert not os.path.islink(export / "posix" / "userdir" / "link")
    assert (export / "posix" / "userdir" / "link").read_bytes() == b"file"
