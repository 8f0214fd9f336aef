"""POSIX checks for a shared directory, run as root where the kernel is the judge.

``python3 posix_checks.py DIR`` makes DIR/posix and prints one line, ``POSIX-RESULTS``
and a JSON object: check name -> [passed, what was seen].  It uses only the standard
library, so the guest can run it with the host's /usr/bin/python3.

tests/test_ninep_posix_uml.py runs it inside a UML guest on a 9P share (the Linux v9fs
client against sigpoll's server) and on the host's own file system, where every check
must pass: that shows each expectation is what Linux itself does.  An unprivileged user
(uid and gid 65534, no supplementary groups) is played by a forked child that drops to it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import sys
import time
from typing import Callable

# The user pjdfstest plays too: "nobody", the owner a server that cannot tell who
# attached tends to give files to.
USER = 65534
CAP_SETUID = 7
# security.capability, version 2: cap_setuid in permitted, effective bit set ("=ep").
CAPS = struct.pack("<IIIII", 0x02000001, 1 << CAP_SETUID, 0, 0, 0)

results: dict[str, tuple[bool, str]] = {}


def check(name: str, ok: bool, seen: object) -> None:
    results[name] = (bool(ok), str(seen))


def as_user(fn: Callable[[], object]) -> int:
    """Run ``fn`` in a child that is uid/gid USER; its errno, or 0 if it succeeded."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.setgroups([])
            os.setgid(USER)
            os.setuid(USER)
            fn()
        except OSError as exc:
            code = exc.errno or 255
        except BaseException:
            code = 254
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def errname(code: int) -> str:
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))


def refused(name: str, fn: Callable[[], object], expect: int) -> None:
    got = as_user(fn)
    check(name, got == expect, errname(got))


def allowed(name: str, fn: Callable[[], object]) -> None:
    got = as_user(fn)
    check(name, got == 0, errname(got))


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def owner_of(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def touch(path: str, mode: int = 0o666) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, mode))


def ownership(base: str) -> None:
    os.umask(0o022)
    touch(f"{base}/rootfile")
    check("root-file-owner", owner_of(f"{base}/rootfile") == (0, 0), owner_of(f"{base}/rootfile"))
    os.mkdir(f"{base}/rootdir")
    check("root-dir-owner", owner_of(f"{base}/rootdir") == (0, 0), owner_of(f"{base}/rootdir"))
    user = f"{base}/userdir"
    os.mkdir(user)
    os.chown(user, USER, USER)

    def make() -> None:
        touch(f"{user}/file")
        os.mkdir(f"{user}/dir")
        os.symlink("file", f"{user}/link")
        os.mkfifo(f"{user}/fifo")

    allowed("user-creates", make)
    for name in ("file", "dir", "link", "fifo"):
        got = owner_of(f"{user}/{name}")
        check(f"user-{name}-owner", got == (USER, USER), got)


def refusals(base: str) -> None:
    os.umask(0o022)
    rootfile, rootdir = f"{base}/rootfile", f"{base}/rootdir"
    touch(f"{rootdir}/victim")
    before = os.lstat(rootfile)
    refused("user-chmod-root-file", lambda: os.chmod(rootfile, 0o777), errno.EPERM)
    refused("user-chown-root-file", lambda: os.chown(rootfile, USER, -1), errno.EPERM)
    refused("user-chgrp-root-file", lambda: os.chown(rootfile, -1, USER), errno.EPERM)
    refused("user-truncate-root-file", lambda: os.truncate(rootfile, 0), errno.EACCES)
    refused("user-write-root-file", lambda: os.open(rootfile, os.O_WRONLY), errno.EACCES)
    refused("user-unlink-in-root-dir", lambda: os.unlink(f"{rootdir}/victim"), errno.EACCES)
    refused("user-rename-in-root-dir",
            lambda: os.rename(f"{rootdir}/victim", f"{rootdir}/renamed"), errno.EACCES)
    refused("user-link-into-root-dir",
            lambda: os.link(f"{base}/userdir/file", f"{rootdir}/hard"), errno.EACCES)
    refused("user-create-in-root-dir", lambda: touch(f"{rootdir}/new"), errno.EACCES)
    refused("user-mkdir-in-root-dir", lambda: os.mkdir(f"{rootdir}/newdir"), errno.EACCES)
    # utimensat: "now" needs write permission or ownership, explicit times ownership.
    refused("user-utime-now-root-file", lambda: os.utime(rootfile), errno.EACCES)
    refused("user-utime-set-root-file", lambda: os.utime(rootfile, (1, 1)), errno.EPERM)
    open_file = f"{base}/rootopen"
    touch(open_file)
    os.chmod(open_file, 0o666)
    allowed("user-utime-now-writable-root-file", lambda: os.utime(open_file))
    refused("user-utime-set-writable-root-file", lambda: os.utime(open_file, (1, 1)),
            errno.EPERM)
    # A sticky directory: only a file's owner (or the directory's) may remove or rename it.
    sticky = f"{base}/sticky"
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    touch(f"{sticky}/roots")
    os.chmod(f"{sticky}/roots", 0o666)
    refused("user-unlink-in-sticky-dir", lambda: os.unlink(f"{sticky}/roots"), errno.EPERM)
    refused("user-rename-in-sticky-dir",
            lambda: os.rename(f"{sticky}/roots", f"{sticky}/moved"), errno.EPERM)

    def own_in_sticky() -> None:
        touch(f"{sticky}/mine")
        os.rename(f"{sticky}/mine", f"{sticky}/mine2")
        os.unlink(f"{sticky}/mine2")

    allowed("user-own-file-in-sticky-dir", own_in_sticky)
    after = os.lstat(rootfile)
    same = (after.st_mode, after.st_uid, after.st_gid, after.st_size) == (
        before.st_mode, before.st_uid, before.st_gid, before.st_size)
    check("root-file-unchanged", same, (oct(after.st_mode), after.st_uid, after.st_gid))
    check("root-dir-victim-kept", os.path.exists(f"{rootdir}/victim"),
          sorted(os.listdir(rootdir)))


def modes(base: str) -> None:
    d = f"{base}/modes"
    os.mkdir(d)
    for mask in (0o022, 0o027, 0o000):
        os.umask(mask)
        tag = f"{mask:03o}"
        touch(f"{d}/file{tag}", 0o666)
        check(f"file-0666-umask-{tag}", mode_of(f"{d}/file{tag}") == 0o666 & ~mask,
              oct(mode_of(f"{d}/file{tag}")))
        os.mkdir(f"{d}/dir{tag}", 0o777)
        check(f"dir-0777-umask-{tag}", mode_of(f"{d}/dir{tag}") == 0o777 & ~mask,
              oct(mode_of(f"{d}/dir{tag}")))
        os.mkfifo(f"{d}/fifo{tag}", 0o666)
        check(f"fifo-0666-umask-{tag}", mode_of(f"{d}/fifo{tag}") == 0o666 & ~mask,
              oct(mode_of(f"{d}/fifo{tag}")))
        os.mknod(f"{d}/null{tag}", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.lstat(f"{d}/null{tag}")
        got = (stat.S_ISCHR(st.st_mode), oct(stat.S_IMODE(st.st_mode)),
               os.major(st.st_rdev), os.minor(st.st_rdev))
        check(f"chrdev-0666-umask-{tag}", got == (True, oct(0o666 & ~mask), 1, 3), got)
    os.umask(0)
    touch(f"{d}/odd", 0o620)
    check("file-0620-umask-000", mode_of(f"{d}/odd") == 0o620, oct(mode_of(f"{d}/odd")))
    os.umask(0o022)


def setid(base: str) -> None:
    d = f"{base}/setid"
    os.mkdir(d)
    os.umask(0)
    touch(f"{d}/suid", 0o4755)
    check("create-04755", mode_of(f"{d}/suid") == 0o4755, oct(mode_of(f"{d}/suid")))
    touch(f"{d}/both", 0o6755)
    check("create-06755", mode_of(f"{d}/both") == 0o6755, oct(mode_of(f"{d}/both")))
    # Linux's mkdir takes no set-gid bit from its mode; chmod sets it, and a directory
    # made inside a set-gid directory inherits it (and the group).
    os.mkdir(f"{d}/sgid", 0o775)
    os.chown(f"{d}/sgid", -1, USER)
    os.chmod(f"{d}/sgid", 0o2775)
    check("chmod-dir-02775", mode_of(f"{d}/sgid") == 0o2775, oct(mode_of(f"{d}/sgid")))
    os.mkdir(f"{d}/sgid/sub", 0o755)
    got = (oct(mode_of(f"{d}/sgid/sub")), owner_of(f"{d}/sgid/sub")[1])
    check("mkdir-in-setgid-dir", got == (oct(0o2755), USER), got)
    touch(f"{d}/later", 0o755)
    os.chmod(f"{d}/later", 0o4711)
    check("chmod-04711", mode_of(f"{d}/later") == 0o4711, oct(mode_of(f"{d}/later")))
    # Linux clears both bits of a group-executable file on chown, even by root.
    os.chown(f"{d}/both", USER, USER)
    check("chown-clears-setid", mode_of(f"{d}/both") == 0o755, oct(mode_of(f"{d}/both")))
    os.umask(0o022)


_CLOCK_REALTIME_COARSE = 5  # Linux's number; the time module does not name it


def _wait_for_clock(after_ns: int) -> None:
    # Timestamps come from the kernel's coarse clock: wait until it has moved past the
    # time we compare with, so a change shows as a different value.
    while time.clock_gettime_ns(_CLOCK_REALTIME_COARSE) <= after_ns + 1_000_000:
        time.sleep(0.005)


def times(base: str) -> None:
    d = f"{base}/times"
    os.mkdir(d)
    os.symlink("nowhere", f"{d}/link")
    # Whole seconds: v9fs sends no nanoseconds (it keeps times to the second).
    os.utime(f"{d}/link", ns=(1_000_000_000_000, 2_000_000_000_000), follow_symlinks=False)
    st = os.lstat(f"{d}/link")
    got = (st.st_atime_ns, st.st_mtime_ns)
    check("symlink-utimes-set", got == (1_000_000_000_000, 2_000_000_000_000), got)
    now = time.time_ns()
    os.utime(f"{d}/link", follow_symlinks=False)
    st = os.lstat(f"{d}/link")
    check("symlink-utimes-now", st.st_mtime_ns > now - 10_000_000_000, st.st_mtime_ns)
    touch(f"{d}/file")
    for name, follow in (("file", True), ("link", False)):
        before = os.lstat(f"{d}/{name}").st_ctime_ns
        _wait_for_clock(before)
        os.chown(f"{d}/{name}", -1, -1, follow_symlinks=follow)
        after = os.lstat(f"{d}/{name}").st_ctime_ns
        check(f"{name}-ctime-after-chown-minus-one", after > before, (before, after))


def limits(base: str) -> None:
    d = f"{base}/limits"
    os.mkdir(d)
    touch(f"{d}/{'n' * 255}")
    check("name-255", os.path.exists(f"{d}/{'n' * 255}"), "created")
    try:
        touch(f"{d}/{'n' * 256}")
        got = "ok"
    except OSError as exc:
        got = errname(exc.errno or 0)
    check("name-256", got == "ENAMETOOLONG", got)
    target = "t/" * 2047 + "t"  # 4095 bytes: the longest target Linux stores
    os.symlink(target, f"{d}/longlink")
    check("symlink-4095", os.readlink(f"{d}/longlink") == target, len(os.readlink(f"{d}/longlink")))
    try:
        os.symlink(target + "x", f"{d}/toolong")
        got = "ok"
    except OSError as exc:
        got = errname(exc.errno or 0)
    check("symlink-4096", got == "ENAMETOOLONG", got)
    # A tree deeper than PATH_MAX: reached one directory at a time, it all works.
    fd = os.open(d, os.O_DIRECTORY)
    try:
        for _ in range(24):
            os.mkdir("d" * 200, dir_fd=fd)
            nfd = os.open("d" * 200, os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("bottom", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        got = stat.S_ISREG(os.stat("bottom", dir_fd=fd).st_mode)
    finally:
        os.close(fd)
    check("deeper-than-path-max", got, got)


def privileged(base: str) -> None:
    """What a guest's root may do inside the share; the host checks what it got."""
    d = f"{base}/priv"
    os.mkdir(d)
    os.mknod(f"{d}/kmsg", stat.S_IFCHR | 0o600, os.makedev(1, 11))
    os.mknod(f"{d}/disk", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    st = os.lstat(f"{d}/kmsg")
    check("mknod-chr", stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 11), oct(st.st_mode))
    touch(f"{d}/capfile", 0o755)
    os.setxattr(f"{d}/capfile", "security.capability", CAPS)
    check("set-file-caps", os.getxattr(f"{d}/capfile", "security.capability") == CAPS, "read back")
    os.setxattr(f"{d}/capfile", "trusted.overlay.redirect", b"/etc")
    check("set-trusted", os.getxattr(f"{d}/capfile", "trusted.overlay.redirect") == b"/etc",
          "read back")
    os.setxattr(f"{d}/capfile", "user.note", b"hello")
    names = sorted(os.listxattr(f"{d}/capfile"))
    check("list-xattrs", {"security.capability", "trusted.overlay.redirect", "user.note"}
          <= set(names), names)
    touch(f"{d}/suid", 0o755)
    os.chmod(f"{d}/suid", 0o4755)
    os.mkfifo(f"{d}/fifo")


def main() -> None:
    base = os.path.join(sys.argv[1], "posix")
    os.mkdir(base)
    os.chmod(base, 0o755)
    for part in (ownership, refusals, modes, setid, times, limits, privileged):
        try:
            part(base)
        except Exception as exc:  # one broken part must not hide the others' results
            check(f"{part.__name__}-ran", False, repr(exc))
    print("POSIX-RESULTS " + json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
