"""The pure codec: round trips of every message, and hostile bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigpoll.ninep import _codec as c

_SAMPLE = {"u8": 0xAB, "u16": 0xBEEF, "u32": 0xDEADBEEF, "u64": 0x0123456789ABCDEF,
           "qid": c.Qid(0x80, 7, 0xFFFFFFFFFFFFFFFF), "s": "näme\udcff",
           "data": b"\x00\xffpayload", "wnames": ["a", "bb", ".."],
           "wqids": [c.Qid(0, 1, 2), c.Qid(0x80, 3, 4)]}


def _sample(cls: type[c.Message], tag: int = 3) -> c.Message:
    return cls(*(_SAMPLE[k.rstrip("?")] for k in cls.KINDS), tag=tag)


@pytest.mark.parametrize("tid", sorted(c.MESSAGE_CLASSES))
def test_round_trip_every_message(tid: int) -> None:
    msg = _sample(c.MESSAGE_CLASSES[tid])
    raw = c.encode(msg)
    assert struct.unpack_from("<IBH", raw) == (len(raw), tid, 3)
    assert c.decode(raw) == msg


def test_all_linux_message_ids_present() -> None:
    ids = {7, 8, 12, 14, 16, 18, 20, 22, 24, 26, 30, 32, 40, 50, 52, 54, 70, 72, 74, 76,
           100, 102, 104, 108, 110, 116, 118, 120, 122}
    for t in ids:
        assert t in c.MESSAGE_CLASSES
        if t != 7:
            assert t + 1 in c.MESSAGE_CLASSES


def test_known_wire_bytes() -> None:
    # Tversion msize=8192 "9P2000.L", NOTAG: the bytes every 9P2000.L session starts with.
    raw = c.encode(c.Tversion(8192, "9P2000.L", tag=c.NOTAG))
    assert raw == bytes.fromhex("15000000 64 ffff 00200000 0800") + b"9P2000.L"


def test_optional_trailing_fields() -> None:
    # Tfsync without datasync (diod's layout), Tattach without n_uname (9P2000 layout).
    raw = struct.pack("<IBHI", 11, 50, 1, 9)
    assert c.decode(raw) == c.Tfsync(9, 0, tag=1)
    body = struct.pack("<IIH", 1, c.NOFID, 1) + b"u" + struct.pack("<H", 0)
    raw = struct.pack("<IBH", 7 + len(body), 104, 2) + body
    assert c.decode(raw).n_uname == c.NONUNAME


def test_dirents_round_trip_and_limit() -> None:
    ents = [c.Dirent(c.Qid(0, 0, i), i + 1, 8, f"name{i}") for i in range(10)]
    data, n = c.encode_dirents(ents, 10_000)
    assert n == 10 and c.decode_dirents(data) == ents
    data, n = c.encode_dirents(ents, 60)
    assert n == 2 and c.decode_dirents(data) == ents[:2]
    with pytest.raises(c.MessageError):
        c.decode_dirents(data[:-1])


@pytest.mark.parametrize(
    "raw, kind",
    [
        (b"", c.FramingError),
        (struct.pack("<IBH", 6, 100, 0), c.FramingError),  # size below the header
        (struct.pack("<IBH", 9, 100, 0), c.FramingError),  # size disagrees with length
        (struct.pack("<IBH", 7, 200, 5), c.MessageError),  # unknown type
        (struct.pack("<IBHI", 11, 100, 5, 1), c.MessageError),  # Tversion cut short
        # Huge counts: checked against the frame, never allocated.
        (struct.pack("<IBHIQI", 23, 118, 5, 1, 0, 0xFFFFFFFF), c.MessageError),
        (struct.pack("<IBHIH", 13, 100, 5, 1, 0xFFFF), c.MessageError),
        (struct.pack("<IBHIIH", 17, 110, 5, 1, 2, 0xFFFF), c.MessageError),
        (struct.pack("<IBHH", 9, 111, 5, 17), c.MessageError),
        (struct.pack("<IBHIx", 12, 120, 5, 1), c.MessageError),  # trailing byte
    ],
)
def test_hostile_frames(raw: bytes, kind: type[Exception]) -> None:
    with pytest.raises(kind) as info:
        c.decode(raw)
    if kind is c.MessageError and len(raw) >= 7:
        assert info.value.tag == 5


def test_framebuffer_cuts_and_rejects() -> None:
    fb = c.FrameBuffer(8192)
    a = c.encode(c.Tclunk(1, tag=1))
    b = c.encode(c.Tread(1, 0, 10, tag=2))
    stream = a + b
    got = []
    for i in range(len(stream)):
        got += fb.feed(stream[i:i + 1])
    assert got == [a, b] and len(fb) == 0
    with pytest.raises(c.FramingError) as info:
        fb.feed(a + struct.pack("<I", 8193) + b"xxx")
    assert info.value.frames == [a]
    with pytest.raises(c.FramingError):
        fb.feed(a)  # a broken stream stays broken
    with pytest.raises(c.FramingError):
        c.FrameBuffer(100).feed(struct.pack("<I", 3))


def test_encode_rejects_unencodable() -> None:
    with pytest.raises(c.ProtocolError):
        c.encode(c.Twalk(1, 2, ["x"] * 17))
    with pytest.raises(c.ProtocolError):
        c.encode(c.Tclunk(-1))
    with pytest.raises(c.ProtocolError):
        c.encode(c.Tversion(1, "x" * 70000))
    with pytest.raises(c.ProtocolError):
        c.encode(c.Tclunk(1, tag=70000))


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_decode_random_bytes(data: bytes) -> None:
    try:
        c.decode(data)
    except c.ProtocolError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(sorted(c.MESSAGE_CLASSES)), st.data())
def test_fuzz_decode_mutated_frames(tid: int, data: st.DataObject) -> None:
    raw = bytearray(c.encode(_sample(c.MESSAGE_CLASSES[tid])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(4, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(7, len(raw)))
    frame = bytes(raw[:cut])
    frame = struct.pack("<I", len(frame)) + frame[4:]
    try:
        msg = c.decode(frame)
    except c.ProtocolError:
        return
    # Whatever decodes must encode back to the same bytes (or, when an optional trailing
    # field was left out, to a frame that decodes to the same message).
    again = c.encode(msg)
    assert again == frame or (msg.OPTIONAL and c.decode(again) == msg)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(7, 300))
def test_fuzz_framebuffer(data: bytes, max_size: int) -> None:
    fb = c.FrameBuffer(max_size)
    try:
        for frame in fb.feed(data):
            try:
                c.decode(frame)
            except c.MessageError:
                pass
    except c.FramingError:
        pass
