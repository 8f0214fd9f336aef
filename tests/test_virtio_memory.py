"""GuestMemory over real shared mappings: the C core's SIGBUS guard, seen from Python.

The frontend-level attack runs against the real backend in tests/test_virtio_limits.py;
here each promise of the guard is checked on its own, in this process.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest

from sigpoll.virtio._memory import GuestMemory, MemoryFault
from sigpoll.virtio._vhost_user import MemoryRegion

SIZE = 1 << 20
GPA = 0x40000000


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


def _map(fd: int, notify: int = -1, **kw: bool) -> GuestMemory:
    return GuestMemory.map_fds([MemoryRegion(GPA, SIZE, GPA, 0)], [fd], notify_fd=notify, **kw)


def test_guarded_copies_move_bytes_both_ways(memfd: int) -> None:
    mem = _map(memfd)
    try:
        view, host = mem.locate(GPA + 4096, 100)
        assert host
        assert mem.copy_in(view, host, 10, memoryview(b"hello"))
        assert os.pread(memfd, 5, 4096 + 10) == b"hello"
        assert mem.copy_out([view], [host], 1000) == bytes(10) + b"hello" + bytes(85)
        assert mem.copy_out([view, view], [host, host], 112) == (bytes(10) + b"hello" + bytes(85)) + bytes(10) + b"he"
        assert not mem.faulted
    finally:
        mem.close()


def test_a_shrunk_file_fails_copies_and_repairs_plain_accesses(memfd: int) -> None:
    notify = os.eventfd(0, os.EFD_NONBLOCK)
    mem = _map(memfd, notify)
    try:
        low, low_host = mem.locate(GPA, 64)
        high, high_host = mem.locate(GPA + SIZE // 2, 64)
        os.pwrite(memfd, b"guest bytes", 0)
        os.ftruncate(memfd, 4096)  # the frontend takes all but the first page away
        assert mem.copy_out([high], [high_host], 64) is None  # a fault inside the copy
        assert mem.faulted
        assert os.eventfd_read(notify) == 1  # the loop is told once
        # Any other access completes (on zero pages) instead of killing the process ...
        assert high[:4].tobytes() == bytes(4)
        high.cast("H")[0] = 7
        # ... and from now on no copy trusts the range, even its surviving first page.
        assert mem.copy_out([low], [low_host], 11) is None
        assert not mem.copy_in(low, low_host, 0, memoryview(b"x"))
    finally:
        mem.close()
        os.close(notify)


def test_a_plain_access_first_marks_the_range_faulted(memfd: int) -> None:
    mem = _map(memfd)
    try:
        view, host = mem.locate(GPA + SIZE - 8, 8)
        os.ftruncate(memfd, 0)
        assert view.cast("H")[1] == 0  # a ring index load: repaired, not fatal
        assert mem.faulted
        assert mem.copy_out([view], [host], 8) is None
    finally:
        mem.close()


def test_sealed_memory_can_be_required(memfd: int) -> None:
    with pytest.raises(MemoryFault, match="not a memfd sealed"):
        _map(memfd, require_sealed=True)
    import fcntl

    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    mem = _map(memfd, require_sealed=True)
    mem.close()
    with pytest.raises(OSError):
        os.ftruncate(memfd, 0)  # what the seal buys: the frontend cannot shrink it


def test_a_plain_file_cannot_meet_a_seal_requirement(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "mem")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(MemoryFault):
            _map(fd, require_sealed=True)
        _map(fd).close()  # UML's kind of memory: accepted, and guarded
    finally:
        os.close(fd)


def test_closing_forgets_the_ranges(memfd: int) -> None:
    """A range must leave the guard before it is unmapped, or a later mapping at the same
    address would be repaired instead of faulting normally."""
    for _ in range(100):  # more than the guard's 64 slots
        _map(memfd).close()
    mm = mmap.mmap(memfd, SIZE)
    mm.close()
