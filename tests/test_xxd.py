"""The pure xxd formatter against the real /usr/bin/xxd, byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigpoll.stress.xxd import BYTES_PER_LINE, ZeroStream, format_lines, line_length, zero_chunk

__all__: list[str] = []

XXD = shutil.which("xxd")
needs_xxd = pytest.mark.skipif(XXD is None, reason="the xxd binary is not installed")

U64 = (1 << 64) - 1


def real_xxd(data: bytes, offset: int = 0) -> bytes:
    """What /usr/bin/xxd prints for ``data`` with ``-o offset``."""
    assert XXD is not None
    args = [XXD] if offset == 0 else [XXD, "-o", hex(offset)]
    return subprocess.run(args, input=data, capture_output=True, check=True).stdout


# -- format_lines ------------------------------------------------------------------------


@needs_xxd
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=700), offset=st.one_of(st.just(0), st.integers(0, U64)))
def test_random_data_matches_xxd(data: bytes, offset: int) -> None:
    assert format_lines(data, offset) == real_xxd(data, offset)


@needs_xxd
@pytest.mark.parametrize("length", [0, 1, 2, 3, 15, 16, 17, 31, 32, 33, 255, 256, 4095, 65541])
def test_lengths_around_line_and_group_edges(length: int) -> None:
    data = os.urandom(length)
    assert format_lines(data) == real_xxd(data)


@needs_xxd
def test_every_byte_value_in_the_ascii_column() -> None:
    data = bytes(range(256)) * 3
    assert format_lines(data) == real_xxd(data)


@needs_xxd
def test_a_megabyte_of_random_data() -> None:
    data = os.urandom(1 << 20)
    assert format_lines(data) == real_xxd(data)


@needs_xxd
@pytest.mark.parametrize(
    "offset",
    [
        0xFFFFFFF0,  # the first lines keep 8 digits, then they widen to 9
        0xFFFFFFFF,  # widens mid-stream, lines no longer on multiples of 16
        0x100000000,
        0xFFFFFFFFF0,
        0x7FFFFFFFFFFFFFF0,
        U64 - 40,  # xxd's unsigned long wraps back to 00000000 and narrows again
        5,
    ],
)
def test_wide_and_wrapping_offsets(offset: int) -> None:
    data = os.urandom(100)
    assert format_lines(data, offset) == real_xxd(data, offset)


@needs_xxd
def test_seek_past_4_gib_in_a_sparse_file(tmp_path: Path) -> None:
    """``xxd -s`` shows the file position, which crosses 0xffffffff here."""
    assert XXD is not None
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate((1 << 32) + 100)
    out = subprocess.run([XXD, "-s", "0xffffffc0", str(path)], capture_output=True, check=True).stdout
    assert out == zero_chunk(0xFFFFFFC0, 164)
    assert out.splitlines()[-1].startswith(b"100000060: ")


def test_negative_offset_is_refused() -> None:
    with pytest.raises(ValueError):
        format_lines(b"x", -1)


def test_line_length_widens_with_the_offset() -> None:
    assert line_length(0) == len(format_lines(bytes(16)))
    assert line_length(0xFFFFFFF0) == 68
    assert line_length(0x100000000) == 69
    assert line_length(1 << 64) == 68  # wrapped to 0


# -- the zero stream ---------------------------------------------------------------------


@needs_xxd
@pytest.mark.parametrize(
    ("start", "nbytes"),
    [
        (0, 0),
        (0, 7),
        (0, 1 << 16),
        (0, (1 << 18) + 16 * 3 + 5),  # several whole blocks, then a short last line
        (16, 1 << 17),  # starts just past a block boundary
        (0xFFF00000, 1 << 21),  # crosses 0xffffffff: offsets widen inside the chunk
        (0xFFFFFFF0, 1 << 17),
        (0x123456789AB0, 1 << 17),
        (U64 + 1 - (1 << 17), 1 << 18),  # runs past 2**64 and wraps
        (8, 1000),  # not a multiple of 16: every line keeps a low digit of 8
    ],
)
def test_zero_chunk_matches_xxd(start: int, nbytes: int) -> None:
    assert zero_chunk(start, nbytes) == real_xxd(bytes(nbytes), start)


@needs_xxd
def test_zero_stream_is_xxd_of_dev_zero() -> None:
    stream = ZeroStream(chunk_input=1 << 17)
    out = b"".join(next(stream) for _ in range(20))
    assert stream.input_offset == 20 << 17
    assert stream.output_bytes == len(out)
    assert out == real_xxd(bytes(20 << 17))


@needs_xxd
def test_zero_stream_from_a_wide_offset() -> None:
    start = 0xFFFE0000
    stream = ZeroStream(start, chunk_input=1 << 16)
    out = b"".join(next(stream) for _ in range(4))
    assert out == real_xxd(bytes(4 << 16), start)


def test_zero_chunk_equals_the_general_formatter() -> None:
    # Cheap cross-check with no subprocess, over block and width boundaries.
    for start in (0, 1 << 16, 0xFFFF0000, 0xFFFFFFF0, 1 << 40):
        assert zero_chunk(start, 3 << 16) == format_lines(bytes(3 << 16), start)


def test_zero_stream_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ZeroStream(-16)
    with pytest.raises(ValueError):
        ZeroStream(chunk_input=10)
    with pytest.raises(ValueError):
        zero_chunk(0, -1)


def test_zero_stream_is_fast() -> None:
    """The writer must never be the bottleneck: well over 200 MB/s of dump text."""
    stream = ZeroStream()
    next(stream)  # build the template outside the timing
    produced = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < 0.3:
        produced += len(next(stream))
    rate = produced / elapsed / 1e6
    assert rate > 200, f"only {rate:.0f} MB/s"


def test_full_lines_only_from_the_stream() -> None:
    chunk = next(ZeroStream(chunk_input=BYTES_PER_LINE * 5))
    assert chunk.count(b"\n") == 5
    assert chunk.endswith(b"................\n")
