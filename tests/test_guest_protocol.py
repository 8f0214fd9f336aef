"""The guest's console protocol, without a guest: command lines in, marked output out."""

from __future__ import annotations

import subprocess

from sigpoll.guest._init_script import CommandScanner, command_line, interrupt_line

TOKEN = "0123456789abcdef"


def _stream(number: int, output: bytes, status: int) -> bytes:
    return (f"@@{TOKEN}:START:{number}@@\n".encode() + output
            + f"@@{TOKEN}:EXIT:{number}:{status}@@\n".encode())


def test_a_command_gets_its_own_output_and_status_whatever_the_splits() -> None:
    stale = b"left over\n" + _stream(1, b"old output\n", 7)  # an interrupted command's
    stream = stale + b"kernel noise\n" + _stream(2, b"mine\n@@ not a marker @@\n", 3) + b"after"
    for step in (1, 2, 3, 5, 7, 64, len(stream)):
        scanner = CommandScanner(TOKEN, 2)
        got = b"".join(scanner.feed(stream[i:i + step]) for i in range(0, len(stream), step))
        assert (got, scanner.status, scanner.killed) == (b"mine\n@@ not a marker @@\n", 3, False), step


def test_an_interrupted_command_ends_with_its_kill_marker() -> None:
    for before_start in (True, False):
        scanner = CommandScanner(TOKEN, 4)
        head = b"" if before_start else f"@@{TOKEN}:START:4@@\npartial".encode()
        out = scanner.feed(head + f"@@{TOKEN}:KILLED:4@@\n".encode())
        assert scanner.done and scanner.killed and scanner.status is None
        assert out == (b"" if before_start else b"partial")


def test_the_command_lines_are_plain_shell() -> None:
    # The guest runs them with the host's /bin/sh (through hostfs): check they parse there.
    for line in (command_line(TOKEN, 3, "/run/sigpoll/command-3.sh"), interrupt_line(TOKEN, 3)):
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        done = subprocess.run(["sh", "-n"], input=line, capture_output=True)
        assert done.returncode == 0, done.stderr


def test_the_rigs_preexec_loads_no_library_after_fork() -> None:
    # A preexec_fn runs between fork and exec; loading a library there (ctypes.CDLL) in a
    # process with threads can deadlock on a lock another thread held (issue 18).  The
    # function it calls is resolved once, in the parent.
    import ctypes
    import os

    from sigpoll.guest import _uml

    setup = _uml.spawn_kwargs()["preexec_fn"]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("a library was loaded after fork")

        ctypes.CDLL = refuse  # type: ignore[misc,assignment]
        try:
            setup()
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
