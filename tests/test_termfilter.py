"""The terminal filter: what a guest's console output may do to the user's terminal."""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigpoll._termfilter import MAX_PENDING, TerminalFilter


def run_filter(data: bytes, cuts: list[int] | None = None) -> tuple[bytes, TerminalFilter]:
    f = TerminalFilter()
    if not cuts:
        return f.feed(data), f
    out, last = [], 0
    for cut in sorted(set(cuts)):
        out.append(f.feed(data[last:cut]))
        last = cut
    out.append(f.feed(data[last:]))
    return b"".join(out), f


KEPT = [
    b"plain text\r\n",
    "utf-8 \u00e9 \u2260 \u65e5\u672c \U0001f600".encode(),
    b"\x1b[1;31mred\x1b[0m",
    b"\x1b[10;20H\x1b[2J\x1b[K\x1b[3A",
    b"\x1b[?1049h\x1b[?25l\x1b[?2004h",
    b"\x1b[2 q",  # cursor style
    b"\x1b]0;my title\x07",
    b"\x1b]2;my title\x1b\\",
    b"\x1b(0lqk\x1b(B",  # line drawing
    b"\x1b7\x1b8\x1bM\x1b=\x1b>",
    b"\x07\x08\t",
]

DROPPED = [
    (b"\x1b]52;c;aGVsbG8=\x07", "osc"),  # write the clipboard
    (b"\x1b]4;1;rgb:ff/00/00\x1b\\", "osc"),  # palette
    (b"\x1b]50;font\x07", "osc"),  # font
    (b"\x1b]0\x07", "osc"),  # a title without ';' is not a title
    (b"\x1bP$qm\x1b\\", "strings"),  # DECRQSS: the terminal answers as input
    (b"\x1b_apc payload\x1b\\", "strings"),
    (b"\x1b^pm\x1b\\", "strings"),
    (b"\x1bXsos\x1b\\", "strings"),
    (b"\x1b[21t", "csi"),  # report the title back as typed input
    (b"\x1b[8;100;300t", "csi"),  # resize the window
    (b"\x1b[?2026$p", "csi"),  # request a mode's state
    ("\u009b31m".encode(), "c1"),  # CSI as a UTF-8 encoded C1 control
    (b"\x9d52;c;eA==\x07", "c1"),  # 8-bit OSC
]


@pytest.mark.parametrize("seq", KEPT)
def test_what_full_screen_programs_need_passes_unchanged(seq: bytes) -> None:
    out, f = run_filter(b"a" + seq + b"z")
    assert out == b"a" + seq + b"z"
    assert not f.counts.kinds


@pytest.mark.parametrize("seq,kind", DROPPED)
def test_sequences_that_reach_beyond_the_screen_are_dropped(seq: bytes, kind: str) -> None:
    out, f = run_filter(b"before" + seq + b"after")
    assert getattr(f.counts, kind) == 1, f.counts
    assert out.startswith(b"before") and out.endswith(b"after")
    assert b"\x1b]52" not in out and b"\x1bP" not in out and b"\x9d" not in out


def test_an_endless_string_is_dropped_in_bounded_memory() -> None:
    f = TerminalFilter()
    out = [f.feed(b"ok \x1b]52;c;")]
    for _ in range(200):  # 200 KiB of clipboard payload, never terminated in one chunk
        out.append(f.feed(b"A" * 1024))
        assert len(f._pending) <= MAX_PENDING
    out.append(f.feed(b"\x1b"))
    out.append(f.feed(b"\\ back to text"))
    assert b"".join(out) == b"ok  back to text"
    assert f.counts.osc == 1


fragments = st.sampled_from(KEPT + [seq for seq, _ in DROPPED] + [b"\x1b", b"\x1b[", b"\xc2", b"\xe2\x82", b"\x80", b"\xff"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(fragments, st.binary(max_size=40)), max_size=30), st.lists(st.integers(0, 2000), max_size=12))
def test_any_split_gives_the_same_output_and_a_second_pass_drops_nothing(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    whole, f1 = run_filter(data)
    split, _ = run_filter(data, [c for c in cuts if c <= len(data)])
    # Bytes held back at the very end (an unfinished sequence) are the same either way.
    assert split == whole
    again, f2 = run_filter(whole)
    assert not f2.counts.kinds, (whole, f2.counts)
    # Nothing that can talk to the terminal beyond the screen survives, however it was built.
    assert not re.search(rb"\x1b[\]P_^X](?!(?:0|1|2);)", again)
    assert not re.search(rb"\xc2[\x80-\x9f]", again)


def test_console_cli_filters_guest_output_and_resets_modes_on_detach(tmp_path: Any) -> None:
    pexpect = pytest.importorskip("pexpect")
    script = tmp_path / "guest.sh"
    script.write_text(
        "printf 'visible\\033]52;c;c2VjcmV0\\007\\033[21t\\033[?1049hdone\\n'; sleep 30\n"
    )
    child = pexpect.spawn(
        sys.executable, ["-m", "sigpoll.console", "run", "--", "sh", str(script)],
        timeout=30,
    )
    try:
        child.expect("done")
        seen = child.before
        assert b"visible" in seen and b"]52" not in seen and b"[21t" not in seen
        assert b"\x1b[?1049h" in seen  # the alternate screen is allowed...
        child.sendcontrol("]")
        child.expect(pexpect.EOF)
        tail = child.before
        assert tail.startswith(b"\r\n\x1b[?1049l")  # ...and left on detach
        assert b"\x1b[r" not in tail and b"\x1b[?25h" not in tail  # nothing it did not change
        assert (b"blocked 2 control sequences the console sent to your terminal: "
                b"1 OSC (clipboard, colours, fonts), 1 CSI (window, reports)") in tail
    finally:
        child.close(force=True)


def test_raw_passes_everything(tmp_path: Any) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable, ["-m", "sigpoll.console", "run", "--raw", "--", "printf", "x\\033]52;c;eA==\\007y"],
        timeout=30,
    )
    try:
        child.expect(pexpect.EOF)
        assert b"x\x1b]52;c;eA==\x07y" in child.before
    finally:
        child.close(force=True)


def test_bridge_feeds_the_log_unfiltered(tmp_path: Any) -> None:
    # The log is a record of what the guest sent; only the terminal is protected.
    pexpect = pytest.importorskip("pexpect")
    log = tmp_path / "console.log"
    child = pexpect.spawn(
        sys.executable, ["-m", "sigpoll.console", "run", "--log", str(log), "--", "printf", "a\\033]52;c;eA==\\007b"],
        timeout=30,
    )
    try:
        child.expect(pexpect.EOF)
        assert b"a\x1b]52" not in child.before and b"ab" in child.before
    finally:
        child.close(force=True)
    assert b"a\x1b]52;c;eA==\x07b" in log.read_bytes()


# -- what detach puts back -----------------------------------------------------------------


@pytest.mark.parametrize("output, reset", [
    (b"plain text\r\n\x1b[1;31mred\x1b[0m done", b""),  # nothing changed: nothing sent
    (b"\x1b[?1049hfull screen", b"\x1b[?1049l"),
    (b"\x1b[?1049h\x1b[?1049l", b""),
    (b"\x1b[?47h", b"\x1b[?47l"),
    (b"\x1b[5;20r", b"\x1b7\x1b[r\x1b8"),  # the region, with the cursor kept
    (b"\x1b[5;20r\x1b[r", b""),
    (b"\x1b[?25l", b"\x1b[?25h"),
    (b"\x1b[?1000;1006h\x1b[?2004h", b"\x1b[?1000l\x1b[?1006l\x1b[?2004l"),
    (b"\x1b[?1h\x1b=", b"\x1b[?1l\x1b>"),
    (b"\x1b[?7l", b"\x1b[?7h"),
    (b"\x1b[4h", b"\x1b[4l"),
    (b"\x1b[1;4;31mx", b"\x1b[0m"),
    (b"\x1b[5 q", b"\x1b[0 q"),
    (b"\x1b(0lqk", b"\x1b(B"),
    (b"\x1b)0\x0e", b"\x0f"),
    (b"\x1b[?1049h\x1b[3;9r\x1b[?25l\x1b[33m", b"\x1b7\x1b[r\x1b8\x1b[0m\x1b[?1049l\x1b[?25h"),
    (b"\x1b[?1049h\x1b[?25l\x1bc", b""),  # a full reset undid it all already
])
def test_detach_puts_back_only_what_the_output_changed(output: bytes, reset: bytes) -> None:
    for cut in range(len(output) + 1):
        f = TerminalFilter()
        f.feed(output[:cut])
        f.feed(output[cut:])
        assert f.reset_sequence() == reset, (output, cut)


def test_blocked_summary_wording() -> None:
    out, f = run_filter(b"\x1b]52;c;eA==\x07")
    assert f.summary() == ("blocked 1 control sequence the console sent to your terminal: "
                           "1 OSC (clipboard, colours, fonts) (--raw lets them through)")
    assert TerminalFilter().summary() == ""
