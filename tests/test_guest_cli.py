"""`python -m sigpoll.guest` as a user meets it (issue 17, the guest command's items).

Mistakes are one line and status 2, before anything boots; a standard input that is a pipe
reaches the command; a shell on a real terminal (pexpect) shows its boot progress, gives the
terminal back as it found it and leaves nothing behind.  (^C, SIGTERM, SIGHUP and SIGKILL:
tests/test_guest_cleanup.py.)
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Any

import pytest

from sigpoll.guest import _uml

COMMAND = [sys.executable, "-m", "sigpoll.guest"]
try:
    _uml.find_kernel()
    _NO_UML = ""
except _uml.UmlNotFound as exc:  # pragma: no cover - on these machines UML is installed
    _NO_UML = str(exc)
needs_uml = pytest.mark.skipif(bool(_NO_UML), reason=_NO_UML)
_MODES = r"([0-9a-f]+(?::[0-9a-f]+){20,})"  # what `stty -g` prints


def _run(*args: str, stdin: Any = subprocess.DEVNULL, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], stdin=stdin, capture_output=True, text=True, timeout=timeout)


def _one_error_line(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sigpoll.guest: error: "), done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert "booting" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize(("args", "expected"), [
    (["--mem", "10X"], "expected a size"),
    (["--mem", "-5"], "expected a size"),
    (["--mem", "1K"], "from 32M"),
    (["--mem", "999G"], "from 32M"),
    (["--boot-timeout", "-1"], "above 0"),
    (["--boot-timeout", "nan"], "above 0"),
    (["--port", "a/b"], "port name"),
    (["--share", "/nonexistent/dir"], "not a directory"),
    (["--bogus"], "--bogus"),
])
def test_a_bad_option_is_one_line_before_anything_boots(args: list[str], expected: str) -> None:
    _one_error_line(_run("run", *args, "--", "true"), expected)


def test_no_command_without_a_terminal_is_nothing_to_do() -> None:
    _one_error_line(_run("run"), "nothing to do")


def test_help_is_plain_text_and_the_version_is_there() -> None:
    for args in ([], ["run"]):
        done = _run(*args, "--help")
        assert done.returncode == 0
        assert "``" not in done.stdout and ":class:" not in done.stdout, done.stdout  # no RST
        assert "(default: 256M)" in done.stdout or not args
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.startswith("python -m sigpoll.guest (sigpoll ")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_share_over_the_network_as_a_user_suggests_virtio(tmp_path: Any) -> None:
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no system python3 for another user")
    os.chmod(tmp_path, 0o755)
    done = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env", f"PYTHONPATH={checkout}",
         "/usr/bin/python3", "-m", "sigpoll.guest", "run", "--share", f"{tmp_path}:x", "--", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, cwd="/",
    )
    if "No module named" in done.stderr:
        pytest.skip("the system python3 cannot import this checkout: " + done.stderr.strip().splitlines()[-1])
    _one_error_line(done, "needs root", "--share-via virtio")


@needs_uml
def test_a_piped_stdin_reaches_the_command() -> None:
    data = os.urandom(3 << 20)
    done = subprocess.run([*COMMAND, "run", "-q", "--", "sh", "-c", "read first; echo \"$first\"; sha256sum"],
                          input=b"first line\n" + data, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import hashlib

    first, digest = done.stdout.decode().splitlines()
    assert first == "first line" and digest.split()[0] == hashlib.sha256(data).hexdigest()
    assert done.stderr == b""


@needs_uml
@pytest.mark.timeout(150)
def test_a_shell_on_a_terminal_shows_progress_and_gives_the_terminal_back(tmp_path: Any) -> None:
    pexpect = pytest.importorskip("pexpect")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = f"stty -g; TMPDIR={tmp} {shlex.join([*COMMAND, 'run'])}; echo status=$?; stty -g"
    child = pexpect.spawn("bash", ["-c", script], timeout=90, encoding="utf-8", codec_errors="replace",
                          dimensions=(30, 100))
    try:
        child.expect(_MODES)
        before = child.match.group(1)
        child.expect(r"booting the guest: \d+\.\ds")  # the live line, on a terminal only
        child.expect("guest up in")
        child.expect("shell on the guest console")
        child.sendline("echo from-the-guest-$((6 * 7)); stty size; exit")
        child.expect("from-the-guest-42")
        child.expect("30 100")  # the terminal's size reached the guest
        child.expect(r"status=(\d+)")
        status = int(child.match.group(1))
        seen = child.before
        child.expect(_MODES)
        after = child.match.group(1)
        child.expect(pexpect.EOF, timeout=20)
        assert status == 0, seen
        for bad in ("Traceback", "Exception ignored", "Task was destroyed"):
            assert bad not in seen
        assert after == before, "the terminal's settings changed"
    finally:
        child.close(force=True)
    assert os.listdir(tmp) == [], "the guest's private directory survived"
