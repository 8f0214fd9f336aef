"""Every long-running command in a real terminal: stopped by ^C, SIGINT, SIGTERM or detach.

Each runs in a pexpect pty inside a shell that prints the terminal's settings before and
after, and the command's exit status.  What a user must see: the status of the convention
(130 for SIGINT, 143 for SIGTERM; a detached ``console run`` passes its program's status),
no traceback and no asyncio complaint, the terminal's settings as they were, and nothing
left behind: no process, no socket file, nothing in the command's temporary directory.
Where the cursor ends up is checked in tmux, which keeps a screen (pexpect does not).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed")

PY = sys.executable
#: What must never reach a user's terminal when a command ends.
COMPLAINTS = ("Traceback", "Exception ignored", "Task was destroyed", "Event loop is closed",
              "was never retrieved", "RuntimeError", "AttributeError")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class Session:
    """``sh -c 'stty -g; CMD; echo status; stty -g'`` in a pexpect pty (a trap keeps the
    shell going when ^C reaches the whole foreground group)."""

    def __init__(self, command: str, *, env: dict[str, str] | None = None, shell: str = "/bin/sh",
                 status: str = "$?", timeout: float = 60) -> None:
        script = (f"trap : INT; stty -g; echo @@START@@; {command}; echo \"@@STATUS={status}@@\"; "
                  f"stty -g; echo @@AFTER@@")
        self.child = pexpect.spawn(shell, ["-c", script], timeout=timeout, dimensions=(30, 100),
                                   env=env or dict(os.environ))
        self.child.expect(r"([0-9a-f:]+)\r\n@@START@@")
        self.before_settings = self.child.match.group(1)
        self.seen = b""

    def expect(self, pattern: str | bytes) -> None:
        self.child.expect(pattern)
        self.seen += (self.child.before or b"") + (self.child.after or b"")

    def command_pid(self) -> int:
        """The pid of the command the shell runs (its first child)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = _children(self.child.pid)
            if kids:
                return kids[0]
            time.sleep(0.02)
        raise AssertionError("the command did not start")

    def finish(self) -> int:
        """Wait for the command to end; check the terminal and the output; its status."""
        self.child.expect(rb"@@STATUS=(\d+)@@\r\n([0-9a-f:]+)\r\n@@AFTER@@")
        self.seen += self.child.before or b""
        status, after = int(self.child.match.group(1)), self.child.match.group(2)
        self.child.expect(pexpect.EOF)
        self.child.close()
        text = self.seen.decode(errors="replace")
        for complaint in COMPLAINTS:
            assert complaint not in text, text[-3000:]
        assert after == self.before_settings, "the terminal's settings were not restored"
        return status

    def close(self) -> None:
        if self.child.isalive():
            self.child.close(force=True)


@pytest.fixture
def private_tmp() -> Iterator[tuple[dict[str, str], Path]]:
    """An environment whose TMPDIR is a fresh directory, which must be empty afterwards
    (short, under /tmp: the guest's socket paths must fit in 107 bytes)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="cli-", dir="/tmp"))
    try:
        yield {**os.environ, "TMPDIR": str(tmpdir)}, tmpdir
        assert sorted(os.listdir(tmpdir)) == [], "left behind in TMPDIR"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# -- console run / attach ----------------------------------------------------------------


def _stop(session: Session, pid: int, how: str) -> None:
    if how == "detach":
        session.child.send("\x1d")
    else:
        os.kill(pid, {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}[how])


@pytest.mark.parametrize("how, status", [("detach", 129), ("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_console_run_stops_cleanly(how: str, status: int, private_tmp: tuple[dict[str, str], Path]) -> None:
    env, _ = private_tmp
    s = Session(f"{PY} -m sigpoll.console run -- cat", env=env)
    try:
        s.expect(r"running cat on /dev/pts/\d+ \(pid (\d+)\)")
        program = int(s.child.match.group(1))
        console = s.command_pid()
        s.child.send("still here\r")
        s.expect("still here")
        _stop(s, console, how)
        assert s.finish() == status
        assert not _alive(program) and not _alive(console)
    finally:
        s.close()


@pytest.mark.parametrize("how, status", [("detach", 0), ("SIGINT", 130), ("SIGTERM", 143)])
def test_console_attach_stops_cleanly(how: str, status: int) -> None:
    master, slave = os.openpty()
    try:
        s = Session(f"{PY} -m sigpoll.console attach {os.ttyname(slave)}")
        try:
            s.expect("attached to")
            console = s.command_pid()
            os.write(master, b"from the guest\r\n")
            s.expect("from the guest")
            _stop(s, console, how)
            assert s.finish() == status
        finally:
            s.close()
    finally:
        os.close(master)
        os.close(slave)


def test_console_run_detach_hangs_the_program_up_at_once(tmp_path: Path) -> None:
    """Detach closes the program's terminal while the console waits for it (the wait does
    not block the loop): a program that ignores SIGHUP sees its input end and exits by
    itself, before any signal would come.  Before, a blocking wait held the pty open until
    the program was killed, so it never saw the end of its input."""
    mark = tmp_path / "saw-eof"
    program = f"trap '' HUP; read line; echo eof > {shlex.quote(str(mark))}"
    s = Session(f"{PY} -m sigpoll.console run -- sh -c {shlex.quote(program)}")
    try:
        s.expect("escape is")
        s.child.send("\x1d")
        status = s.finish()
    finally:
        s.close()
    assert mark.read_text() == "eof\n"
    assert status == 0  # it exited by itself, with read's failure handled


def test_console_run_status_line_names_the_program_pid_and_quotes_its_command() -> None:
    s = Session(f"{PY} -m sigpoll.console run -- sh -c 'echo \"a  b\"; cat'")
    try:
        s.expect(r"running (.*) on /dev/pts/\d+ \(pid (\d+)\)")
        shown, pid = s.child.match.group(1).decode(), int(s.child.match.group(2))
        assert shown == shlex.join(["sh", "-c", 'echo "a  b"; cat'])
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sh", b"-c"]
        s.expect("a  b")
        s.child.send("\x1d")
        s.finish()
    finally:
        s.close()


# -- ninep serve -------------------------------------------------------------------------


@pytest.mark.parametrize("how, status", [("^C", 130), ("SIGTERM", 143)])
def test_ninep_serve_stops_cleanly_and_removes_its_socket(how: str, status: int, tmp_path: Path) -> None:
    sock = tmp_path / "9p.sock"
    s = Session(f"{PY} -m sigpoll.ninep serve {tmp_path} --listen unix:{sock}")
    try:
        s.expect("serving")
        assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600
        if how == "^C":
            s.child.sendintr()
        else:
            os.kill(s.command_pid(), signal.SIGTERM)
        assert s.finish() == status
    finally:
        s.close()
    assert not sock.exists()


@pytest.mark.parametrize("how, status", [("^C", 130), ("SIGTERM", 143)])
def test_ninep_serve_fd_on_pipes_stops_cleanly(how: str, status: int, tmp_path: Path) -> None:
    # Read from one pipe, write to another: how a parent hands the kernel's trans=fd pair over.
    command = f"sleep 60 | {PY} -m sigpoll.ninep serve {tmp_path} --fd 0,3 3>&1 | cat"
    s = Session(command, shell="/bin/bash", status="${PIPESTATUS[1]}")
    try:
        deadline = time.monotonic() + 20
        server = None
        while server is None and time.monotonic() < deadline:
            for pid in _children(s.child.pid):
                # (A child that has not exec'd yet still shows the shell's command line.)
                if _cmdline(str(pid)).startswith(f"{PY}\0-m\0sigpoll.ninep\0".encode()):
                    server = pid
            time.sleep(0.05)
        assert server is not None
        time.sleep(0.5)  # serving
        if how == "^C":
            s.child.sendintr()
        else:
            os.kill(server, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _alive(server) and time.monotonic() < deadline:
                time.sleep(0.05)
            # The pipeline also waits for its writer, which has nothing to say.
            subprocess.run(["pkill", "-P", str(s.child.pid), "-x", "sleep"], check=False)
        assert s.finish() == status
    finally:
        s.close()


# -- virtio console ----------------------------------------------------------------------


@pytest.mark.parametrize("how, status", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_virtio_console_on_a_terminal_stops_cleanly(how: str, status: int, tmp_path: Path) -> None:
    """Port 0 on the terminal (in raw mode, so ^C is a byte for the guest): a signal from
    outside stops it; the terminal comes back as it was and the sockets go."""
    vu, port = tmp_path / "vu.sock", tmp_path / "p.sock"
    s = Session(f"{PY} -m sigpoll.virtio console --socket {vu} --port data=unix:{port}")
    try:
        s.expect("vhost-user console on")
        assert vu.is_socket() and port.is_socket()
        os.kill(s.command_pid(), getattr(signal, how))
        assert s.finish() == status
    finally:
        s.close()
    assert not vu.exists() and not port.exists()


# -- stress --------------------------------------------------------------------------------


def test_stress_sigterm_exits_143_after_its_summary() -> None:
    s = Session(f"{PY} -m sigpoll.stress xxd --pty --seconds 60")
    try:
        s.expect("xxd /dev/zero into a pty")  # the header comes first, before the run
        time.sleep(1)
        os.kill(s.command_pid(), signal.SIGTERM)
        s.expect("sigpoll: no stalls; interrupted")
        assert s.finish() == 143
    finally:
        s.close()


# -- soak (one short run: it boots a guest) --------------------------------------------------


def test_soak_ctrl_c_reports_so_far_and_leaves_nothing(private_tmp: tuple[dict[str, str], Path]) -> None:
    from sigpoll import _uml

    try:
        _uml.find_kernel()
    except _uml.UmlNotFound as exc:
        pytest.skip(str(exc))
    env, tmpdir = private_tmp
    s = Session(f"{PY} -m sigpoll.soak --minutes 2 --interval 1", env=env, timeout=90)
    try:
        s.expect(r"soak \d+/120s  console [1-9][\d.]*MB.*stalls \d+")  # the live progress line
        s.child.sendintr()
        s.expect("INTERRUPTED after")
        assert s.finish() == 130
        assert re.search(rb"\nconsole +[1-9]\d* ", s.seen), "no report of what moved so far"
    finally:
        s.close()
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and str(tmpdir).encode() in _cmdline(p)]
    assert not leftovers, "guest processes left behind"


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# -- where the cursor ends up (tmux keeps a screen) ------------------------------------------


class Tmux:
    """A private tmux server with one 100x30 window running sh."""

    def __init__(self, tmp: Path) -> None:
        self.socket = str(tmp / "tmux.sock")
        env = {**os.environ, "PS1": "$ ", "ENV": ""}
        subprocess.run(["tmux", "-S", self.socket, "-f", "/dev/null", "new-session", "-d",
                        "-x", "100", "-y", "30", "/bin/sh"], check=True, env=env)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True,
                              capture_output=True, text=True).stdout

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-l", text)

    def key(self, key: str) -> None:
        self.tmux("send-keys", key)

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p").splitlines()

    def cursor(self) -> tuple[int, int, bool]:
        x, y, visible = self.tmux("display-message", "-p", "#{cursor_x} #{cursor_y} #{cursor_flag}").split()
        return int(x), int(y), visible == "1"

    def wait_for(self, text: str, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.screen()
            if any(text in line for line in lines):
                return lines
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never showed: {self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/test.sh installs it)")
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.close()


# Programs a guest might run, and what each leaves set if the user detaches mid-way.
_PLAIN = "cat"
# (Markers are printed with %s, so the echoed command line never matches them.)
_FULL_SCREEN = ("read go; printf '\\033[?1049h\\033[2J\\033[5;20r\\033[?25l\\033[1;31m\\033[?2004h"
                "full %s\\n' screen; cat")
_SCROLL_REGION_ONLY = "read go; printf '\\033[3;10r\\033[4hregion %s\\n\\n\\n\\n' set; cat"


@pytest.mark.parametrize("program, shows", [(_PLAIN, "typed"), (_FULL_SCREEN, "full screen"),
                                            (_SCROLL_REGION_ONLY, "region set")])
def test_detach_leaves_the_cursor_where_the_program_left_it(tmux: Tmux, program: str, shows: str) -> None:
    """Detach puts back only what the program changed: the status line lands where the
    program's output left the cursor (or, after a full-screen program, where it was before
    it: the user's screen comes back with its lines), the cursor is visible and the whole
    screen scrolls again.  Before, the reset always sent ESC [ r, which homes the cursor, so
    the status line and the next prompt overwrote the top of the screen."""
    tmux.type("printf 'first\\nsecond\\nthird\\n'\n")
    tmux.wait_for("third")
    tmux.type(f"{PY} -m sigpoll.console run -- sh -c {shlex.quote(program)}\n")
    lines = tmux.wait_for("escape is")
    below_status = max(i for i, line in enumerate(lines) if "escape is" in line) + 1
    if shows == "typed":
        tmux.type("typed\r")
        deadline = time.monotonic() + 20
        while sum(line.strip() == "typed" for line in tmux.screen()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the terminal's echo and cat's copy
    else:
        tmux.type("go\r")  # the program starts once its "escape is" line is seen
        tmux.wait_for(shows)
    time.sleep(0.3)
    x0, y0, _ = tmux.cursor()
    tmux.key("C-]")
    lines = tmux.wait_for("detached")
    at = next(i for i, line in enumerate(lines) if "detached" in line)
    if program is _FULL_SCREEN:
        assert at == below_status + 1, lines  # where the cursor was when the program began
        assert lines[below_status].strip() == "go", lines
        assert [line.strip() for line in lines[:below_status]].count("third") == 1, lines
        assert not any("full screen" in line for line in lines), "still on the alternate screen"
    else:
        assert at == y0 + (1 if x0 else 0), (x0, y0, lines)
    assert tmux.cursor()[2], "the cursor is hidden"
    # No scroll region is left: forty more lines scroll the whole screen.
    tmux.type("i=0; while [ $i -lt 40 ]; do echo row$i; i=$((i+1)); done\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = [line.strip() for line in tmux.screen()]
        if "row39" in lines:
            break
        time.sleep(0.05)
    rows = [line for line in lines if line.startswith("row")]
    assert rows[-1] == "row39" and rows == [f"row{i}" for i in range(40 - len(rows), 40)], lines
    assert len(rows) >= 25, lines


def test_status_line_after_unfinished_output_starts_a_new_line(tmux: Tmux) -> None:
    tmux.type(f"{PY} -m sigpoll.console run -- sh -c \"printf 'no %s' newline; cat\"\n")
    tmux.wait_for("no newline")
    tmux.key("C-]")
    lines = tmux.wait_for("detached")
    assert "no newline" in [line.rstrip() for line in lines], lines


def test_a_full_screen_program_that_exits_leaves_the_users_screen_back(tmux: Tmux) -> None:
    """The program ends by itself while on the alternate screen with the cursor hidden: the
    user's screen, its lines and a visible cursor come back, and the status line sits right
    below where the cursor was when the program began."""
    tmux.type("printf 'first\\nsecond\\nthird\\n'\n")
    tmux.wait_for("third")
    program = "read go; printf '\\033[?1049h\\033[?25l\\033[2Jbusy %s\\n' screen; sleep 0.5"
    tmux.type(f"{PY} -m sigpoll.console run -- sh -c {shlex.quote(program)}\n")
    lines = tmux.wait_for("escape is")
    below_status = max(i for i, line in enumerate(lines) if "escape is" in line) + 1
    tmux.type("go\r")
    lines = tmux.wait_for("exited with status 0")
    at = next(i for i, line in enumerate(lines) if "exited with status" in line)
    assert at == below_status + 1 and lines[below_status].strip() == "go", lines
    assert [line.strip() for line in lines].count("third") == 1 and not any("busy screen" in line for line in lines)
    assert tmux.cursor()[2], "the cursor is hidden"


def test_the_console_cannot_detach_the_user() -> None:
    """Only what the user types detaches: the escape byte in the console's output is just output."""
    s = Session(f"{PY} -m sigpoll.console run -- sh -c \"printf '\\\\035 still %s\\\\n' attached; cat\"")
    try:
        s.expect("still attached")
        s.child.send("typed\r")
        s.expect("typed")  # the bridge is still forwarding
        assert b"detached" not in s.seen
        s.child.send("\x1d")
        s.expect("detached")
        s.finish()
    finally:
        s.close()
