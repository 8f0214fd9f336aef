"""The security models' pure rules (sigpoll/ninep/_model.py) and the Export's record cache."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from sigpoll.ninep import _fs
from sigpoll.ninep import _model as m
from sigpoll.ninep._fs import Export


def test_record_round_trip_and_garbage() -> None:
    a = m.Attr(1000, 100, stat.S_IFCHR | 0o4755, os.makedev(1, 11))
    assert m.decode_attr(m.encode_attr(a)) == a
    raw = m.encode_attr(a)
    assert m.decode_attr(raw[:-1]) is None
    assert m.decode_attr(b"\x02" + raw[1:]) is None  # an unknown version
    assert m.decode_attr(m.encode_attr(m.Attr(0, 0, 0o170000 | 0o644))) is None  # no such type


def test_host_modes_never_carry_privilege() -> None:
    for kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                 stat.S_IFIFO, stat.S_IFSOCK):
        for mode in range(0o10000):
            bits = m.host_mode(kind, mode)
            assert not bits & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022)
            assert bits & 0o600 == 0o600
    assert m.host_mode(stat.S_IFDIR, 0) == 0o700
    assert m.host_mode(stat.S_IFREG, 0o640) == 0o640
    assert m.host_mode(stat.S_IFLNK, 0o777) == 0o600


def test_passthrough_never_adds_a_setid_bit() -> None:
    assert m.passthrough_create_mode(0o6777) == 0o777
    assert m.passthrough_create_mode(0o1777) == 0o1777
    for bit in (stat.S_ISUID, stat.S_ISGID):
        with pytest.raises(OSError) as info:
            m.passthrough_chmod(0o755 | bit, 0o100755)
        assert info.value.errno == errno.EPERM
        assert m.passthrough_chmod(0o755 | bit, 0o100755 | bit) == 0o755 | bit  # kept


@pytest.mark.parametrize("name", ["user.x", "security.capability", "trusted.overlay.redirect",
                                  "system.posix_acl_access", "user.sigpoll", "user.sigpoll.x"])
def test_mapped_names_round_trip_and_never_reach_the_record(name: str) -> None:
    host = m.xattr_to_host(m.MAPPED, name)
    assert host.startswith(m.XATTR_PREFIX) and host != m.ATTR_XATTR
    assert m.xattr_to_client(m.MAPPED, host) == name


def test_mapped_hides_the_hosts_own_names() -> None:
    for host in ("user.x", "security.selinux", "trusted.x", "system.posix_acl_access",
                 m.ATTR_XATTR, m.XATTR_PREFIX):
        assert m.xattr_to_client(m.MAPPED, host) is None


def test_passthrough_names() -> None:
    for ok in ("user.x", "system.posix_acl_access", "system.posix_acl_default"):
        assert m.xattr_to_host(m.PASSTHROUGH, ok) == ok
        assert m.xattr_to_client(m.PASSTHROUGH, ok) == ok
    for name, err in (("security.capability", errno.EOPNOTSUPP), ("trusted.x", errno.EOPNOTSUPP),
                      ("system.other", errno.EOPNOTSUPP), ("user.sigpoll", errno.EPERM),
                      ("user.sigpoll.x", errno.EPERM), ("", errno.EINVAL)):
        with pytest.raises(OSError) as info:
            m.xattr_to_host(m.PASSTHROUGH, name)
        assert info.value.errno == err, name
        assert m.xattr_to_client(m.PASSTHROUGH, name) is None


def test_a_name_too_long_for_the_prefix_is_erange() -> None:
    assert m.xattr_to_host(m.MAPPED, "user." + "x" * 237)  # 255 with the prefix
    with pytest.raises(OSError) as info:
        m.xattr_to_host(m.MAPPED, "user." + "x" * 238)
    assert info.value.errno == errno.ERANGE


def test_the_record_cache_follows_every_change(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With every ctime trusted at once (no settling time), a record changed by the host
    or through the export is still seen at the next stat: each change moves the ctime."""
    monkeypatch.setattr(_fs, "_RECORD_SETTLE_NS", -(1 << 62))
    e = Export(tmp_path)
    root = e.root()
    h, fd = e.create(root, "f", 0o2, 0o640, 1000, 1000)
    os.close(fd)

    def seen() -> tuple[int, int]:
        st = e.stat(h)
        # The next change must get a later ctime even where timestamps are coarse: the
        # settling time this test turned off is what covers that in real use.
        while time.clock_gettime_ns(5) <= st.st_ctime_ns:  # CLOCK_REALTIME_COARSE
            time.sleep(0.001)
        return st.st_uid, stat.S_IMODE(st.st_mode)

    try:
        assert seen() == (1000, 0o640)
        assert e._records  # remembered
        e.setattr(h, 0x1 | 0x2, 0o4750, 2000, 0, 0, (0, 0), (0, 0))
        assert seen() == (2000, 0o4750)
        os.setxattr(tmp_path / "f", m.ATTR_XATTR, m.encode_attr(m.Attr(3000, 3000, 0o100600)))
        assert seen() == (3000, 0o600)
        os.removexattr(tmp_path / "f", m.ATTR_XATTR)
        assert seen()[0] == os.geteuid()
    finally:
        h.close()
        root.close()
        e.close()
