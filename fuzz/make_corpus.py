"""Write the seed corpora under ``fuzz/corpus/<target>/`` from the codecs themselves.

Seeds are meaningful inputs the fuzzers would take long to find: every 9P message type
in both directions, whole 9P sessions (attach, walk, create, read, write, readdir, xattrs,
locks, flush), vhost-user sessions that set up memory and rings with a buffer waiting, and
ring layouts with direct, indirect and hostile chains.  Regression seeds for bugs the
fuzzers found are written here too, so they stay in the replayed corpus.

Run ``python fuzz/make_corpus.py [TARGET...]`` after changing a harness's input format; it
rewrites the seed directories of those targets, or of all (kept well under 1 MB in total).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

from _fuzzcommon import CORPUS_ROOT  # noqa: E402
from sigpoll.ninep import _codec as c  # noqa: E402
from sigpoll.virtio import _vhost_user as vu  # noqa: E402

import ninep_decode  # noqa: E402
import ninep_session  # noqa: E402
import vhost_user  # noqa: E402

__all__ = ["seeds", "main"]


def _sample(cls: type[c.Message], tag: int) -> c.Message:
    vals = {"u8": 1, "u16": 2, "u32": 3, "u64": 4, "s": "name", "data": b"payload",
            "qid": c.Qid(c.QTDIR, 1, 42), "wnames": ["a", "b"], "wqids": [c.Qid(0, 0, 7)]}
    return cls(*(vals[k.rstrip("?")] for k in cls.KINDS), tag=tag)


def _ninep_decode() -> list[bytes]:
    out = []
    for tid, cls in sorted(c.MESSAGE_CLASSES.items()):
        frame = c.encode(_sample(cls, 5))
        out.append(frame)
        # The harness's own form: type selector, tag, body.
        out.append(bytes([ninep_decode._TYPES.index(tid)]) + frame[5:7] + frame[7:])
    out.append(c.encode(c.Tfsync(1, tag=1))[:-4])  # a Linux-less Tfsync: no datasync word
    out.append(c.encode(c.Tattach(1, c.NOFID, "u", "/", tag=1))[:-4])
    ents, _ = c.encode_dirents([c.Dirent(c.Qid(0, 0, i), i, 8, f"e{i}") for i in range(3)], 4096)
    out.append(bytes([ninep_decode._TYPES.index(41), 1, 0]) + struct.pack("<I", len(ents)) + ents)
    return out


def _session_frames() -> list[bytes]:
    T = c
    msgs = [
        T.Tversion(16384, "9P2000.L", tag=c.NOTAG),
        T.Tattach(0, c.NOFID, "root", "", 0, tag=1),
        T.Twalk(0, 1, ["file"], tag=2),
        T.Tlopen(1, 2, tag=3),
        T.Tread(1, 0, 100, tag=4),
        T.Twrite(1, 3, b"XYZ", tag=5),
        T.Tgetattr(1, c.GETATTR_ALL, tag=6),
        T.Tlock(1, 1, 0, 0, 10, 1, "me", tag=7),
        T.Tgetlock(1, 0, 0, 10, 1, "me", tag=8),
        T.Tfsync(1, 0, tag=9),
        T.Twalk(0, 2, [], tag=10),
        T.Tlcreate(2, "new", 0o100 | 2, 0o644, 0, tag=11),
        T.Txattrcreate(2, "user.fuzz", 3, 0, tag=12),
        T.Twrite(2, 0, b"abc", tag=13),
        T.Tclunk(2, tag=14),
        T.Twalk(0, 3, ["dir"], tag=15),
        T.Tlopen(3, 0o200000, tag=16),
        T.Treaddir(3, 0, 4096, tag=17),
        T.Tmkdir(0, "sub", 0o755, 0, tag=18),
        T.Tsymlink(0, "ln", "file", 0, tag=19),
        T.Twalk(0, 4, ["ln"], tag=20),
        T.Treadlink(4, tag=21),
        T.Trenameat(0, "new", 0, "new2", tag=22),
        T.Tunlinkat(0, "sub", 0x200, tag=23),
        T.Tstatfs(0, tag=24),
        T.Twalk(0, 5, ["..", "link_out"], tag=25),
        T.Txattrwalk(0, 5, "user.fuzz", tag=26),
        T.Tflush(25, tag=27),
        T.Tsetattr(1, 0x8, 0, 0, 0, 1, 0, 0, 0, 0, tag=28),
        T.Tremove(1, tag=29),
    ]
    return [c.encode(m) for m in msgs]


def _ninep_server() -> list[bytes]:
    frames = _session_frames()
    out = [b"\0" + b"".join(frames), b"\0" + b"".join(frames[:4])]
    out.append(b"\0" + frames[0] + frames[1] + struct.pack("<I", 3))  # broken framing
    out.append(b"\0" + frames[0] + frames[1] + c.encode(c.Tflush(1, tag=2)))  # flush race (S1)
    out.append(b"\0" + c.encode(c.Tversion(4095, "9P2000", tag=c.NOTAG)) + frames[1])
    out.append(b"\0" + frames[0] + frames[1] + c.encode(c.Twalk(0, 1, ["..", "..", "abs_out"], tag=2)))
    # Structured programs: a few hand-picked opcode strings.
    for seed in (b"\x01" + bytes(range(0, 200, 3)), b"\x01" + bytes(range(1, 250, 7)) * 2,
                 b"\x01" + b"\x05\x01\x00\x00" * 20, b"\x01" + hashlib.sha256(b"s").digest() * 4):
        out.append(seed)
    return out


def _ninep_session() -> list[bytes]:
    out = [bytes(range(256)), bytes(range(255, -1, -1)), hashlib.sha256(b"session").digest() * 8]
    # A request held running, three flushes chained on it, then it completes.
    out.append(bytes([0, 0, 1, 6, 0]) + bytes([1, 9, 1, 1, 1]) + bytes([1, 9, 2, 1, 2])
               + bytes([1, 9, 3, 1, 3]) + bytes([8, 0]))
    # A Tversion while a request runs, then that request completes.
    out.append(bytes([0, 0, 1, 6, 0, 0, 14, 1, 1, 8, 0]))
    # A tag reused while its request is queued.
    out.append(bytes([0, 0, 1, 0, 0, 1]))
    assert all(ninep_session.one_input(s) is None for s in out)
    return out


def _ring_image(num: int = 4) -> tuple[bytes, int, int, int]:
    """Guest memory (as user offset 0) with desc/avail/used and one chain waiting."""
    desc, avail, used, data = 0, 16 * num, 16 * num + 6 + 2 * num, 0x200
    used = (used + 3) // 4 * 4
    mem = bytearray(0x400)
    struct.pack_into("<QIHH", mem, desc, 0x40000000 + data, 8, 1, 1)
    struct.pack_into("<QIHH", mem, desc + 16, 0x40000000 + data + 8, 16, 2, 0)
    struct.pack_into("<HHH", mem, avail, 0, 1, 0)
    mem[data:data + 8] = b"guest>hi"
    return bytes(mem), desc, avail, used


def _vhost_user() -> list[bytes]:
    R = vu.Request
    image, desc, avail, used = _ring_image()
    ubase, gbase = 0x7F0000000000, 0x40000000
    table = vu.encode_mem_table([vu.MemoryRegion(gbase, 0x10000, ubase, 0)])
    features = (1 << 32) | 0b110  # VERSION_1, MULTIPORT, EMERG_WRITE
    setup = [
        (R.SET_OWNER, False, b"", []),
        (R.GET_FEATURES, False, b"", []),
        (R.SET_FEATURES, True, vu.encode_u64(features), []),
        (R.SET_MEM_TABLE, True, table, ["mem"]),
    ]
    for q in range(4):
        setup += [
            (R.SET_VRING_NUM, False, vu.encode_vring_state(q, 4), []),
            (R.SET_VRING_BASE, False, vu.encode_vring_state(q, 0), []),
            (R.SET_VRING_ADDR, False, vu.encode_vring_addr(vu.VringAddr(q, 0, ubase + desc, ubase + used, ubase + avail, 0)), []),
            (R.SET_VRING_CALL, False, vu.encode_u64(q), ["event"]),
            (R.SET_VRING_KICK, False, vu.encode_u64(q), ["event"]),
        ]
    out = [vhost_user.program_bytes(image, setup, bytes([1, 3])),
           vhost_user.program_bytes(image, setup[:4]),
           vhost_user.program_bytes(b"", [(R.GET_CONFIG, False, vu.encode_config(vu.ConfigPayload(0, 12, 0, bytes(12))), []),
                                          (R.SET_CONFIG, True, vu.encode_config(vu.ConfigPayload(8, 4, 0, b"x\0\0\0")), []),
                                          (R.GET_PROTOCOL_FEATURES, False, b"", []),
                                          (R.SET_PROTOCOL_FEATURES, False, vu.encode_u64(0x2229), []),
                                          (R.GET_QUEUE_NUM, False, b"", []),
                                          (R.SET_BACKEND_REQ_FD, True, b"", ["sock"]),
                                          (R.GET_VRING_BASE, False, vu.encode_vring_state(1, 0), []),
                                          (R.RESET_DEVICE, False, b"", [])]),
           # A two-region table padded to 8 entries (QEMU's layout) and a bad one (UML's).
           vhost_user.program_bytes(b"", [(R.SET_MEM_TABLE, False, vu.encode_mem_table(
               [vu.MemoryRegion(0, 0x1000, ubase, 0), vu.MemoryRegion(0x1000, 0x1000, ubase + 0x1000, 0)]) + bytes(32 * 6),
               ["mem", "mem"])]),
           # Finding V1: an unknown request carrying fds (they leaked).
           vhost_user.program_bytes(b"", [(0, False, b"", ["mem"] * 7), (R.SET_OWNER, False, b"", [])])]
    return out


def _virtqueue() -> list[bytes]:
    # Header: 1 region (selector 0), size selector !=0 -> (1+n%16) pages, bases mode 3
    # (the harness's default layout), no fill; num = 1<<(2), base 0, event_idx off,
    # rings laid out back to back.  Then ops.
    def head(num_log2: int, event_idx: int = 0, nregions: int = 0) -> bytes:
        h = bytes([nregions])
        for _ in range(nregions + 1):
            h += bytes([1, 1, 3, 3, 0])
        return h + bytes([1, num_log2, 0, event_idx, 1, 0, 0])

    desc_op = lambda idx, addr_off, length, flags, nxt: bytes([0, idx, 0, 0]) + struct.pack("<H", addr_off) + bytes([0]) + struct.pack("<H", length) + bytes([flags, nxt])  # noqa: E731
    avail_op = lambda h: bytes([3, h])  # noqa: E731
    pop = bytes([6])
    push = bytes([8, 4]) + b"data"
    out = [
        head(2) + desc_op(0, 0x800, 16, 0, 0) + avail_op(0) + pop + push,
        head(2) + desc_op(0, 0x800, 16, 1, 1) + desc_op(1, 0x900, 32, 2, 0) + avail_op(0) + pop + push + bytes([9, 1]),
        head(3, 1) + desc_op(0, 0x800, 16, 4, 0) + bytes([2, 0, 0]) + struct.pack("<H", 0x800) + bytes([0, 0]) + struct.pack("<H", 0x900) + bytes([4, 2, 0]) + avail_op(0) + pop,  # indirect
        head(2) + desc_op(0, 0x800, 16, 1, 0) + avail_op(0) + pop,  # loop
        head(2) + desc_op(0, 0x800, 16, 2, 1) + desc_op(1, 0x900, 16, 1, 0) + avail_op(0) + pop,  # write then read
        head(2) + bytes([4, 0xFF, 0xFF]) + pop,  # avail index far ahead
        head(0) + desc_op(0, 0xFFF0, 0x20, 0, 0) + avail_op(0) + pop,  # buffer past the region
        head(9) + bytes([7]) * 4,
    ]
    return out


def seeds() -> dict[str, list[bytes]]:
    """Target name -> seed inputs."""
    return {
        "ninep_decode": _ninep_decode(),
        "ninep_server": _ninep_server(),
        "ninep_session": _ninep_session(),
        "vhost_user": _vhost_user(),
        "virtqueue": _virtqueue(),
    }


def main(targets: list[str] | None = None) -> None:
    """Write every target's seeds, or only those of ``targets``."""
    total = 0
    for target, inputs in seeds().items():
        if targets and target not in targets:
            continue
        d = os.path.join(CORPUS_ROOT, target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for data in inputs:
            name = hashlib.sha1(data).hexdigest()[:16]
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
            total += len(data)
        print(f"{target}: {len(inputs)} seeds")
    print(f"{total} bytes in all")


if __name__ == "__main__":
    main(sys.argv[1:])
