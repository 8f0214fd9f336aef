"""`python -m sigpoll.console` in a real terminal (pexpect gives it a pty)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pexpect
import pytest

PY = sys.executable


def spawn_in_shell(console_args: str) -> pexpect.spawn:
    """A shell that prints its terminal settings, runs the console, then prints them again."""
    script = f"stty -g; echo @@START@@; {PY} -m sigpoll.console {console_args}; echo; stty -g; echo @@AFTER@@"
    child = pexpect.spawn("/bin/sh", ["-c", script], timeout=20, dimensions=(30, 100))
    child.expect(r"([0-9a-f:]+)\r\n@@START@@")
    child.before_settings = child.match.group(1)  # type: ignore[attr-defined]
    return child


def settings_after(child: pexpect.spawn) -> bytes:
    child.expect(rb"\r\n([0-9a-f:]+)\r\n@@AFTER@@")
    return child.match.group(1)


def test_run_echoes_and_detaches_with_escape() -> None:
    child = spawn_in_shell("run -- cat")
    child.expect(r"running cat on /dev/pts/\d+ \(pid \d+\); escape is \^\]")
    child.send("hello console\r")
    child.expect("hello console")
    child.send("\x1d")
    child.expect("detached")
    assert settings_after(child) == child.before_settings  # type: ignore[attr-defined]
    child.expect(pexpect.EOF)


def test_run_passes_exit_status_and_window_size() -> None:
    child = pexpect.spawn(PY, ["-m", "sigpoll.console", "run", "--", "sh", "-c", "stty size; exit 7"], timeout=20, dimensions=(33, 111))
    child.expect("33 111")
    child.expect("exited with status 7")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 7


def test_terminal_restored_after_sigterm() -> None:
    child = spawn_in_shell("run -- cat")
    child.expect(r"\(pid (\d+)\)")
    pid = int(child.match.group(1))
    child.send("still raw\r")
    child.expect("still raw")
    os.kill(pid, signal.SIGTERM)
    assert settings_after(child) == child.before_settings  # type: ignore[attr-defined]
    child.expect(pexpect.EOF)


def test_attach_to_an_existing_pty_and_log(tmp_path) -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    import tty

    tty.setraw(slave)
    log = tmp_path / "console.log"
    child = pexpect.spawn(PY, ["-m", "sigpoll.console", "attach", "--log", str(log), path], timeout=20)
    try:
        child.expect("attached to")
        # what the "guest" (master side here) prints reaches the terminal and the log
        os.write(master, b"guest says hi\n")
        child.expect("guest says hi")
        child.send("typed\r")
        deadline = time.monotonic() + 10
        got = b""
        while b"typed" not in got and time.monotonic() < deadline:
            import select

            if select.select([master], [], [], 0.2)[0]:
                got += os.read(master, 1024)
        assert b"typed" in got
        child.send("\x1d")
        child.expect("detached")
        child.expect(pexpect.EOF)
        assert b"guest says hi" in log.read_bytes()
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run"], "run needs a command"),
        (["run", "--escape", "xx", "--", "true"], "escape must be"),
        (["attach"], "the following arguments are required"),
    ],
)
def test_bad_usage_is_a_clear_error(args: list[str], message: str) -> None:
    child = pexpect.spawn(PY, ["-m", "sigpoll.console", *args], timeout=20)
    child.expect(re.escape(message))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert b"Traceback" not in (child.before or b"")


def test_attach_to_missing_path() -> None:
    child = pexpect.spawn(PY, ["-m", "sigpoll.console", "attach", "/dev/pts/999999"], timeout=20)
    child.expect("cannot open /dev/pts/999999")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
