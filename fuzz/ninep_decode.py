"""Fuzz target: the 9P2000.L codec (``sigpoll.ninep._codec``), bytes in.

What one input exercises:

* ``decode`` on the raw bytes, and on a frame built around them for one chosen message
  type (first byte picks it, T and R alike, plus unknown ids), so every body decoder is
  reached without the fuzzer having to guess a consistent size field first;
* ``FrameBuffer.feed`` on the bytes cut into fuzzed pieces, with a fuzzed ``max_size``;
* ``decode_dirents`` on the bytes.

Contract checked: only :class:`ProtocolError` (FramingError/MessageError) escapes; a
decoded message re-encodes to the very same bytes (or, when a peer left out an optional
trailing word, to those bytes plus the default) and decodes back equal; a MessageError
from a framed message carries the frame's tag and type; frames cut by the buffer are
exactly the input's prefix, in order.

Run longer: ``python fuzz/ninep_decode.py [workdir] [-max_total_time=600] ...``
"""

from __future__ import annotations

import os
import struct
import sys

# The harness directory (for _fuzzcommon) and the checkout it lives in (for sigpoll).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

from _fuzzcommon import ByteReader, chunks, fuzz_main, instrumentation  # noqa: E402

with instrumentation(__name__):
    from sigpoll.ninep import _codec as c

__all__ = ["TARGET", "one_input", "check_frame"]

TARGET = "ninep_decode"

# Every id the codec knows, then a few it does not (the reserved 9P2000 ones included).
_TYPES = sorted(c.MESSAGE_CLASSES) + [0, 6, 10, 99, 106, 107, 112, 124, 255]
_HEADER = struct.Struct("<IBH")


def check_frame(frame: bytes) -> c.Message | None:
    """Decode one frame and check the codec's contract on it; the message or None."""
    try:
        msg = c.decode(frame)
    except c.MessageError as exc:
        # A well-sized frame: the tag is known, so a server can answer it.
        if len(frame) >= c.HEADER_SIZE and _HEADER.unpack_from(frame)[0] == len(frame):
            size, mtype, tag = _HEADER.unpack_from(frame)
            assert exc.tag == tag and exc.type == mtype, (exc, exc.tag, exc.type)
        assert str(exc), "rejection without a message"
        return None
    except c.ProtocolError as exc:
        assert str(exc), "rejection without a message"
        return None
    wire = c.encode(msg)
    if wire != frame:
        # The only legal difference: an optional trailing word the frame left out.
        assert msg.OPTIONAL and len(wire) > len(frame), (msg, frame, wire)
        last = msg.FIELDS[-1]
        assert getattr(msg, last) == msg.OPTIONAL[last], msg
        assert wire[c.HEADER_SIZE:len(frame)] == frame[c.HEADER_SIZE:], (frame, wire)
    again = c.decode(wire)
    assert again == msg, (msg, again)
    assert type(again) is type(msg) and again.tag == msg.tag
    return msg


def one_input(data: bytes) -> None:
    """Run one fuzz input through every decoding entry point of the 9P codec."""
    r = ByteReader(data)
    mtype = r.pick(_TYPES)
    tag = r.uint(2)
    body = r.rest()
    # 1. The raw bytes as a frame.
    check_frame(data)
    # 2. A frame with a consistent header around the rest, for the chosen type.
    check_frame(_HEADER.pack(c.HEADER_SIZE + len(body), mtype, tag) + body)
    # 3. Directory entries.
    try:
        ents = c.decode_dirents(body)
    except c.MessageError as exc:
        assert str(exc)
    else:
        payload, n = c.encode_dirents(ents, len(body))
        assert n == len(ents) and payload == body
    # 4. The stream framer, on fuzzed piece sizes and limit.
    max_size = c.HEADER_SIZE + (tag % 512)
    fb = c.FrameBuffer(max_size)
    out: list[bytes] = []
    cut = iter(b % 17 + 1 for b in data[:8])
    broken = False
    for piece in chunks(data, cut):
        try:
            frames = fb.feed(piece)
        except c.FramingError as exc:
            out.extend(exc.frames)
            broken = True
            try:
                fb.feed(b"\0" * 8)
            except c.FramingError:
                pass
            else:
                raise AssertionError("a broken FrameBuffer accepted more input")
            break
        out.extend(frames)
    joined = b"".join(out)
    assert data.startswith(joined), "frames are not the stream's prefix"
    for f in out:
        assert c.HEADER_SIZE <= len(f) <= max_size
        assert _HEADER.unpack_from(f)[0] == len(f)
        check_frame(f)
    if not broken:
        assert len(joined) + len(fb) == len(data), "bytes lost by the framer"


if __name__ == "__main__":
    fuzz_main(one_input, TARGET)
