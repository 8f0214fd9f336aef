"""The vhost-user codec: round trips and hostile input, with no sockets involved."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigpoll.virtio._vhost_user import (
    HEADER,
    MAX_PAYLOAD,
    ConfigPayload,
    MemoryRegion,
    MessageFramer,
    ProtocolError,
    Request,
    VringAddr,
    decode_config,
    decode_header,
    decode_mem_table,
    decode_vring_addr,
    decode_vring_file,
    decode_vring_state,
    encode_config,
    encode_mem_table,
    encode_message,
    encode_vring_addr,
    encode_vring_state,
)


def test_round_trips() -> None:
    assert decode_vring_state(encode_vring_state(3, 256)) == (3, 256)
    addr = VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)
    assert decode_vring_addr(encode_vring_addr(addr)) == addr
    regions = [MemoryRegion(0x1000, 0x10000, 0x7F00000000, 0), MemoryRegion(0x100000, 0x1000, 0x7F10000000, 4096)]
    assert decode_mem_table(encode_mem_table(regions), 2) == regions
    cfg = ConfigPayload(4, 8, 0, b"12345678")
    assert decode_config(encode_config(cfg)) == cfg
    assert decode_vring_file(struct.pack("<Q", 5)) == (5, True)
    assert decode_vring_file(struct.pack("<Q", 5 | 0x100)) == (5, False)


def test_uml_sends_a_fixed_two_region_table() -> None:
    one = [MemoryRegion(0x1000, 0x10000, 0x1000, 0)]
    payload = encode_mem_table(one) + bytes(32)  # nregions=1, room for 2
    assert decode_mem_table(payload, 1) == one


@pytest.mark.parametrize(
    ("payload", "nfds", "words"),
    [
        (struct.pack("<II", 0, 0), 0, "0 regions"),
        (struct.pack("<II", 9, 0) + bytes(9 * 32), 9, "9 regions"),
        (encode_mem_table([MemoryRegion(0, 4096, 0, 0)]), 0, "0 fds"),
        (encode_mem_table([MemoryRegion(0, 4096, 0, 0)])[:-1], 1, "bytes for 1"),
        (encode_mem_table([MemoryRegion(0, 0, 0, 0)]), 1, "empty"),
        (encode_mem_table([MemoryRegion(2**64 - 4096, 8192, 0, 0)]), 1, "wraps"),
        (encode_mem_table([MemoryRegion(0, 8192, 0, 0), MemoryRegion(4096, 8192, 0, 0)]), 2, "overlap"),
    ],
)
def test_bad_memory_tables(payload: bytes, nfds: int, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode_mem_table(payload, nfds)


def test_bad_headers_and_payloads() -> None:
    with pytest.raises(ProtocolError, match="version"):
        decode_header(HEADER.pack(1, 0, 0))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_header(HEADER.pack(1, 1, MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        decode_vring_state(b"\0" * 7)
    with pytest.raises(ProtocolError, match="unknown bits"):
        decode_vring_file(struct.pack("<Q", 1 << 20))
    with pytest.raises(ProtocolError, match="beyond"):
        decode_config(struct.pack("<III", 250, 10, 0) + bytes(10))
    with pytest.raises(ProtocolError, match="carries"):
        decode_config(struct.pack("<III", 0, 10, 0) + bytes(3))


@given(st.lists(st.tuples(st.integers(1, 40), st.binary(max_size=300), st.integers(0, 3)), max_size=8),
       st.integers(1, 50))
def test_framer_reassembles_any_split(msgs: list[tuple[int, bytes, int]], step: int) -> None:
    stream = b""
    fd_at: dict[int, list[int]] = {}
    for i, (req, payload, nfds) in enumerate(msgs):
        fd_at[len(stream)] = list(range(100 * i, 100 * i + nfds))
        stream += encode_message(req, payload)
    framer = MessageFramer()
    out = []
    pos = 0
    while pos < len(stream):
        n = min(step, framer.wanted())
        fds = fd_at.pop(pos, [])
        m = framer.feed(stream[pos : pos + n], fds)
        pos += n
        if m is not None:
            out.append(m)
    assert [(m.request, m.payload, m.fds) for m in out] == [
        (req, payload, list(range(100 * i, 100 * i + nfds))) for i, (req, payload, nfds) in enumerate(msgs)
    ]


def test_framer_refuses_overfeeding() -> None:
    with pytest.raises(ValueError):
        MessageFramer().feed(b"\0" * 13)
    assert Request.SET_VRING_ENABLE == 18


@pytest.mark.parametrize(
    "argv",
    [[], ["console"], ["console", "--socket", "/tmp/x", "--port", "noequals"],
     ["console", "--socket", "/tmp/x", "--port0", "tcp:1"], ["console", "--socket", "/nonexistent/d/s"],
     ["console", "--socket", "/tmp/x", "--port", "a=unix:/tmp/a", "--port", "a=unix:/tmp/b"]],
)
def test_cli_bad_options_one_line_exit_2(argv: list[str], tmp_path: object) -> None:
    proc = subprocess.run([sys.executable, "-m", "sigpoll.virtio", *argv], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "error" in proc.stderr and "Traceback" not in proc.stderr
