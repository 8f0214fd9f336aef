"""One style across the commands (sigpoll/_cli.py), and issue 17's items outside a terminal.

Terminal behaviour (signals, detach, the cursor) is in test_cli_terminal.py; the installed
package (wheel, sdist, scripts) in test_packaging.py.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sigpoll import _cli, _unixsock
from support import started

PY = sys.executable
COMMANDS = ["console", "ninep", "virtio", "guest", "stress", "soak"]


def _run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([PY, "-m", *argv], capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload, no-any-return]


def _until(ready: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.05)


def _one_error_line(out: subprocess.CompletedProcess[str], module: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"{module}: error: "), lines[0]
    return lines[0]


# -- the shared pieces -------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("4096", 4096), ("64K", 65536), ("64k", 65536), ("256M", 256 << 20),
                                         ("1G", 1 << 30), ("2GiB", 2 << 30), ("1.5M", 3 << 19), ("10 MiB", 10 << 20),
                                         ("12B", 12)])
def test_sizes_take_binary_suffixes(text: str, value: int) -> None:
    assert _cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["10X", "-5", "", "M", "1.3", "1e6", "0x10", "5 5"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        _cli.parse_size(text)


def test_size_type_names_its_range() -> None:
    parse = _cli.size(4096, 16 << 20)
    assert parse("1M") == 1 << 20
    with pytest.raises(argparse.ArgumentTypeError, match="from 4K to 16M, got '1K'"):
        parse("1K")
    assert _cli.format_size(256 << 20) == "256M" and _cli.format_size(1000) == "1000"


@pytest.mark.parametrize("text, value", [("127.0.0.1:564", ("127.0.0.1", 564)), (":0", ("127.0.0.1", 0)),
                                         ("[::1]:65535", ("::1", 65535)), ("localhost:80", ("localhost", 80))])
def test_addresses(text: str, value: tuple[str, int]) -> None:
    assert _cli.host_port(text) == value


@pytest.mark.parametrize("text, says", [("127.0.0.1:99999", "from 0 to 65535, got 99999"),
                                        ("nope", "expected HOST:PORT"), ("h:p", "must be a number"),
                                        ("::1:80", "in brackets"), ("[::1:80", "brackets")])
def test_bad_addresses_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says.replace("[", r"\[")):
        _cli.host_port(text)


def test_numbers_are_finite_and_in_range() -> None:
    seconds = _cli.real(0, above=True, what="a number of seconds")
    assert seconds("1.5") == 1.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(argparse.ArgumentTypeError, match="a number of seconds above 0"):
            seconds(bad)
    workers = _cli.integer(1, 1024)
    assert workers("8") == 8
    for bad in ("0", "1025", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="whole number from 1 to 1024"):
            workers(bad)


def test_unix_paths() -> None:
    assert _cli.unix_path("unix:/run/x.sock") == _cli.unix_path("/run/x.sock") == "/run/x.sock"
    assert _cli.listen_address("unix:/s") == ("unix", "/s")
    assert _cli.listen_address("0.0.0.0:1") == ("tcp", ("0.0.0.0", 1))
    with pytest.raises(argparse.ArgumentTypeError, match="at most 107 bytes"):
        _cli.unix_path("/" + "x" * 120)
    with pytest.raises(argparse.ArgumentTypeError):
        _cli.strict_unix_path("/no/prefix")


def test_port_names_follow_the_guests_rule() -> None:
    from sigpoll.guest._guest import _parse_port

    for name in ["data", "a-b_c.d", "x" * 64, "bad name", "", ".hidden", "a/b", "é", "x" * 65, "-dash", "---", "日本"]:
        try:
            _parse_port(name)
            guest_ok = True
        except ValueError:
            guest_ok = False
        try:
            _cli.port_name(name)
            cli_ok = True
        except ValueError:
            cli_ok = False
        assert cli_ok == guest_ok, name


def test_help_shows_defaults_one_way() -> None:
    out = _run("sigpoll.ninep", "serve", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "largest message (default: 512K)" in text
    assert "file system threads (default: 8)" in text
    assert text.count("(default: ") >= 6
    for cmd in (["sigpoll.stress", "xxd"], ["sigpoll.soak"], ["sigpoll.virtio", "console"], ["sigpoll.console", "run"]):
        helptext = _run(*cmd, "--help").stdout
        assert "``" not in helptext and ":class:" not in helptext, cmd  # no RST markup
        assert "-q, --quiet" in helptext and "-v, --verbose" in helptext, cmd


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_version(command: str) -> None:
    out = _run(f"sigpoll.{command}", "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"python -m sigpoll.{command} (sigpoll ")


@pytest.mark.parametrize("argv", [
    ["sigpoll.console", "run", "--escape", "xx", "--", "true"],
    ["sigpoll.console", "frobnicate"],
    ["sigpoll.ninep", "serve", "/", "--listen", "127.0.0.1:99999"],
    ["sigpoll.ninep", "serve", "/", "--listen", "unix:/tmp/x", "--msize", "10X"],
    ["sigpoll.virtio", "console", "--socket", "/tmp/x", "--port", "bad name=unix:/tmp/y"],
    ["sigpoll.virtio", "console", "--socket", "/tmp/x", "--bogus"],
    ["sigpoll.stress", "xxd", "--bytes", "1X"],
    ["sigpoll.stress", "xxd", "--seconds", "inf"],
    ["sigpoll.soak", "--minutes", "-1"],
    ["sigpoll.soak", "--mem", "1K"],
])
def test_usage_errors_are_one_line_with_the_commands_name(argv: list[str]) -> None:
    line = _one_error_line(_run(*argv), argv[0])
    assert "--help" in line


def test_run_command_cancels_the_main_task_on_signals_and_its_cleanup_runs(tmp_path: Path) -> None:
    code = f"""
import asyncio, os, signal, sys
from sigpoll import _cli
async def main():
    try:
        print("ready", flush=True)
        await asyncio.sleep(60)
        return 0
    finally:
        await asyncio.sleep(0.05)  # cleanup may await
        open({str(tmp_path / 'cleaned')!r}, "w").close()
sys.exit(_cli.run_command(main()))
"""
    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        (tmp_path / "cleaned").unlink(missing_ok=True)
        proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        assert proc.wait(30) == status
        assert proc.stderr is not None and proc.stderr.read() == ""
        assert (tmp_path / "cleaned").exists()


def test_command_error_is_one_line() -> None:
    code = ("import sys; from sigpoll import _cli\n"
            "async def main(): raise _cli.UsageError('that will not do')\n"
            "_cli.setup_logging(own='sigpoll.x'); sys.exit(_cli.run_command(main(), logger='sigpoll.x'))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr == "sigpoll.x: error: that will not do\n"


def test_progress_line_only_on_a_terminal() -> None:
    import io

    quiet = io.StringIO()
    with _cli.Progress(quiet) as p:
        p.update("working", force=True)
    assert quiet.getvalue() == ""
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty, _cli.Progress(tty) as p:
            p.update("working 1", force=True)
            p.update("working 2")  # throttled: not drawn
        # A pty may hand the writes over in more than one read: take all there is.
        shown = b""
        while select.select([master], [], [], 0.5)[0]:
            shown += os.read(master, 1000)
    finally:
        os.close(master)
        os.close(slave)
    assert shown.startswith(b"\rworking 1\x1b[K") and b"working 2" not in shown
    assert shown.endswith(b"\r\x1b[K")  # erased at the end


# -- unix listeners (item 3) ---------------------------------------------------------------


def test_listen_unix_refuses_a_file_and_a_live_socket_and_replaces_a_stale_one(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("keep")
    with pytest.raises(FileExistsError):
        _unixsock.listen_unix(str(precious))
    assert precious.read_text() == "keep"
    path = str(tmp_path / "s")
    live = _unixsock.listen_unix(path)
    with pytest.raises(OSError) as err:
        _unixsock.listen_unix(path)
    assert err.value.errno == __import__("errno").EADDRINUSE
    live.close()  # now stale: a file nobody listens on
    again = _unixsock.listen_unix(path)
    assert (os.stat(path).st_mode & 0o777) == 0o600
    # Someone else's socket put at the path since is not ours to remove.
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    assert not _unixsock.remove_unix(again)
    assert os.path.exists(path)
    again.close()
    other.close()


def test_listen_unix_checks_peers_as_it_accepts(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    where = Path(tempfile.mkdtemp(dir="/tmp"))  # a directory the other user can reach
    os.chmod(where, 0o755)
    path = str(where / "s")
    listener = _unixsock.listen_unix(path)
    os.chmod(path, 0o777)  # widened later: the peer check still holds
    # A Python the other user may run (ours lives under /root).
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3 for the other user to run")
    peer = subprocess.Popen(
        [system_python, "-S", "-c", "import socket, sys; c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1]); "
                          "c.settimeout(10); sys.exit(0 if c.recv(1) == b'' else 1)", path],
        user=65534, group=65534, extra_groups=[])
    try:
        deadline = time.monotonic() + 10
        listener.setblocking(True)
        listener.settimeout(0.2)
        while time.monotonic() < deadline and listener.refused == 0:
            try:
                listener.accept()
                raise AssertionError("another user's connection was accepted")
            except TimeoutError:
                pass
        assert listener.refused == 1
    finally:
        status = peer.wait(30)
        listener.close()
        shutil.rmtree(where)
    assert status == 0  # the peer saw its connection closed


def test_ninep_unix_never_deletes_a_file_nor_takes_over_a_live_server(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("keep")
    line = _one_error_line(_run("sigpoll.ninep", "serve", str(tmp_path), "--unix", str(precious)), "sigpoll.ninep")
    assert "not a socket" in line and str(precious) in line
    assert precious.read_text() == "keep"

    sock = tmp_path / "9p.sock"
    with started([PY, "-m", "sigpoll.ninep", "serve", str(tmp_path), "--listen", f"unix:{sock}", "-q"],
                  preexec_fn=lambda: os.umask(0)) as first:
        _until(sock.exists)
        assert (sock.stat().st_mode & 0o777) == 0o600  # whatever the umask
        second = _run("sigpoll.ninep", "serve", str(tmp_path), "--listen", f"unix:{sock}")
        assert "another server is listening there" in _one_error_line(second, "sigpoll.ninep")
        assert sock.is_socket()
        from sigpoll.ninep import Client

        async def use() -> bytes:
            cl = await Client.connect_unix(str(sock))
            data = await cl.read_file("precious")
            await cl.close()
            return data

        import asyncio

        assert asyncio.run(use()) == b"keep"  # the first server still serves
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 143
    assert not sock.exists()


def test_ninep_errors_name_the_path(tmp_path: Path) -> None:
    where = tmp_path / "missing" / "s.sock"
    line = _one_error_line(_run("sigpoll.ninep", "serve", str(tmp_path), "--listen", f"unix:{where}"), "sigpoll.ninep")
    assert str(where) in line and "No such file or directory" in line
    line = _one_error_line(_run("sigpoll.ninep", "serve", str(tmp_path / "nodir"), "--listen", "127.0.0.1:0"),
                           "sigpoll.ninep")
    assert str(tmp_path / "nodir") in line


# -- ninep serve --fd (item 4) -------------------------------------------------------------


@pytest.mark.parametrize("stdin, says", [("closed", "--fd 99 is not an open file descriptor"),
                                         ("file", "--fd 0 is a regular file"),
                                         ("devnull", "--fd 0 is /dev/null"),
                                         ("pipe", "--fd 0 is a pipe, which goes one way only")])
def test_ninep_fd_that_cannot_carry_9p_is_one_line(stdin: str, says: str, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    if stdin == "closed":
        out = _run("sigpoll.ninep", "serve", str(tmp_path), "--fd", "99")
    elif stdin == "pipe":
        out = subprocess.run([PY, "-m", "sigpoll.ninep", "serve", str(tmp_path), "--fd", "0"], input="x",
                             capture_output=True, text=True, timeout=60)
    else:
        with open(f if stdin == "file" else os.devnull) as source:
            out = _run("sigpoll.ninep", "serve", str(tmp_path), "--fd", "0", stdin=source)
    assert says in _one_error_line(out, "sigpoll.ninep")


# -- virtio console with any stdin / stdout (item 5) ---------------------------------------


@pytest.mark.parametrize("stdin", ["devnull", "file"])
def test_virtio_console_runs_as_a_service_with_stdin_and_stdout_not_terminals(stdin: str, tmp_path: Path) -> None:
    """How a service starts it: stdin /dev/null (or a file), stdout a file.  The guest's
    port 0 output lands in the file, a file's content reaches the guest, and SIGTERM ends it."""
    from support.vhost_frontend import ConsoleDriver, Frontend

    sock = tmp_path / "vu.sock"
    out_file = tmp_path / "out"
    source = tmp_path / "in"
    source.write_bytes(b"typed ahead\n")
    with open(os.devnull if stdin == "devnull" else source, "rb") as i, open(out_file, "wb") as o, \
            started([PY, "-m", "sigpoll.virtio", "console", "--socket", str(sock)],
                     stdin=i, stdout=o, stderr=subprocess.PIPE) as proc:
        _until(lambda: sock.exists() or proc.poll() is not None)
        assert proc.poll() is None
        fe = Frontend(str(sock), mem_size=16 << 20)
        fe.handshake()
        drv = ConsoleDriver(fe, 1)
        drv.start()
        drv.poll(lambda ev: drv.host_open(0))
        if stdin == "file":
            assert drv.read(0, 12) == b"typed ahead\n"
        drv.write(0, b"from the guest\n")
        _until(lambda: b"from the guest" in out_file.read_bytes())
        drv.write(0, b"and more after stdin ended\n")  # stdin's end did not end the port
        _until(lambda: b"more after" in out_file.read_bytes())
        fe.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "Exception" not in err, err
    assert out_file.read_bytes() == b"from the guest\nand more after stdin ended\n"
    assert not sock.exists()


def test_console_refuses_what_it_cannot_watch(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(PY, ["-m", "sigpoll.console", "attach", "/dev/null"], timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    out = child.before.decode()
    assert child.exitstatus == 2
    assert out.strip().splitlines() == [
        "sigpoll.console: error: cannot attach to /dev/null: it is /dev/null, not a console "
        "(give a tty device or a pty slave)"], out
    # Standard input that is not a terminal, and an output that cannot be watched.
    out2 = _run("sigpoll.console", "run", "--", "true")
    assert "standard input is not a terminal" in _one_error_line(out2, "sigpoll.console")
    with open(tmp_path / "out", "w") as f:
        child = pexpect.spawn("/bin/sh", ["-c", f"{PY} -m sigpoll.console run -- true > {f.name}; echo status=$?"],
                              timeout=30)
        child.expect(r"status=(\d+)")
        assert child.match.group(1) == b"2"
    assert "--log FILE" in (tmp_path / "out").read_text() + child.before.decode()


# -- the C core missing in a source tree (item 8) ------------------------------------------


def test_a_source_tree_without_its_core_says_what_to_do(tmp_path: Path) -> None:
    import sigpoll

    tree = tmp_path / "checkout"
    shutil.copytree(Path(sigpoll.__file__).parent, tree / "sigpoll",
                    ignore=shutil.ignore_patterns("_core*.so", "__pycache__"))
    (tree / "csrc").mkdir()
    # -S: no site-packages, so the installed (editable) sigpoll cannot fill the gap.
    out = subprocess.run([PY, "-S", "-m", "sigpoll.stress", "xxd"], cwd=tree, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "ModuleNotFoundError" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "C core is not built" in out.stderr and "run from another directory" in out.stderr
    # A program that imports it gets an ImportError it can catch, with the same words.
    out = subprocess.run([PY, "-S", "-c", "import sigpoll"], cwd=tree, capture_output=True, text=True, timeout=60)
    assert out.stderr.strip().splitlines()[-1].startswith("ImportError: sigpoll's C core is not built")


# -- the smaller ones (item 11) ------------------------------------------------------------


def test_virtio_verbose_has_help_and_bad_port_names_are_refused() -> None:
    helptext = _run("sigpoll.virtio", "console", "--help").stdout
    assert "-v, --verbose" in helptext and "more detail" in helptext
    for bad in ("bad name", ".x", "a/b", "x" * 65):
        line = _one_error_line(_run("sigpoll.virtio", "console", "--socket", "/tmp/vu", "--port",
                                    f"{bad}=unix:/tmp/p"), "sigpoll.virtio")
        assert "port name" in line


def test_stress_says_what_it_does_before_it_starts() -> None:
    with started([PY, "-m", "sigpoll.stress", "xxd", "--seconds", "30", "--json"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith("xxd /dev/zero into a pty"), first
        assert proc.poll() is None  # said while it runs, not at the end
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
