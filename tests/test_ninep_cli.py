"""``python -m sigpoll.ninep serve``: transports, clean exit on signals, option errors."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sigpoll.ninep import Client, NinepError
from support import started
from support.ninep import free_port

CMD = [sys.executable, "-m", "sigpoll.ninep"]


@pytest.fixture
def export(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    (d / "f").write_bytes(b"cli\n")
    return d


@contextlib.contextmanager
def _serve(*args: str, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m sigpoll.ninep serve ARGS``, killed if the test leaves it running."""
    with started([*CMD, "serve", *args], **popen) as proc:
        yield proc


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    """What the server said, which never includes a traceback."""
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "Traceback" not in err
    return err


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not start")


def _read_f(connect: Awaitable[Client]) -> bytes:
    """Connect, read the export's file ``f`` and hang up."""
    async def use() -> bytes:
        cl = await connect
        data = await cl.read_file("f")
        await cl.close()
        return data

    return asyncio.run(use())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_tcp_logs_and_exits_cleanly(export: Path, sig: int) -> None:
    port = free_port()
    with _serve(str(export), "--listen", f"127.0.0.1:{port}", stderr=subprocess.PIPE) as proc:
        _wait_port(port, proc)  # (one probe connection)
        assert _read_f(Client.connect_tcp("127.0.0.1", port)) == b"cli\n"
        time.sleep(0.2)
        proc.send_signal(sig)
        assert proc.wait(10) == 128 + sig
    lines = _stderr(proc).splitlines()
    assert any("connection from" in ln and "closed" not in ln for ln in lines), lines
    assert sum("connection from" in ln and "closed" not in ln for ln in lines) == 2


def test_serve_limits_options(export: Path) -> None:
    """The limits are set from the command line: a second connection past
    --max-connections 1 is closed and logged, and --max-fids 2 gives EMFILE."""
    port = free_port()
    with _serve(str(export), "--listen", f"127.0.0.1:{port}",
                "--max-connections", "1", "--max-fids", "2", "--max-inflight", "4",
                "--max-queued-output", "65536", "--no-inline", stderr=subprocess.PIPE) as proc:
        _wait_port(port, proc)

        async def use() -> None:
            for _ in range(100):
                try:  # the server may not have seen _wait_port's probe go yet
                    cl = await Client.connect_tcp("127.0.0.1", port)
                    break
                except ConnectionError:
                    await asyncio.sleep(0.05)
            with pytest.raises(ConnectionError):
                await Client.connect_tcp("127.0.0.1", port)
            fid = await cl.walk("f")
            with pytest.raises(NinepError) as err:
                await cl.walk("f")
            assert err.value.errno == errno.EMFILE
            await cl.clunk(fid)
            assert await cl.read_file("f") == b"cli\n"
            await cl.close()

        asyncio.run(use())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 143
    err = _stderr(proc)
    assert "refusing connection" in err and "max_connections" in err, err


def test_serve_unix(export: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with _serve(str(export), "--unix", path, "-q") as proc:
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _read_f(Client.connect_unix(path)) == b"cli\n"
        proc.terminate()
        assert proc.wait(10) == 143
        assert not os.path.exists(path)


@pytest.mark.parametrize("extra", [[], ["--busy-poll-us", "300"]])
def test_serve_fd_socketpair(export: Path, extra: list[str]) -> None:
    a, b = socket.socketpair()
    with _serve(str(export), "--fd", f"{a.fileno()}", "-q", *extra, pass_fds=[a.fileno()]) as proc:
        a.close()
        assert _read_f(Client.connect_fds(b.fileno())) == b"cli\n"
        b.close()
        assert proc.wait(10) == 0  # the one connection ended: the server exits


@pytest.mark.parametrize(
    "argv",
    [
        ["serve"],
        ["serve", "DIR"],
        ["serve", "DIR", "--listen", "nope"],
        ["serve", "DIR", "--listen", "1.2.3.4:1", "--unix", "/x"],
        ["serve", "DIR", "--fd", "a,b"],
        ["serve", "DIR", "--listen", "127.0.0.1:0", "--msize", "12"],
        ["serve", "DIR", "--listen", "127.0.0.1:0", "--workers", "0"],
        ["serve", "DIR", "--listen", "127.0.0.1:0", "--max-fids", "0"],
        ["serve", "DIR", "--listen", "127.0.0.1:0", "--max-inflight", "-3"],
        ["serve", "DIR", "--listen", "127.0.0.1:0", "--max-connections", "many"],
        ["serve", "DIR", "--listen", "127.0.0.1:0", "--max-queued-output", "1.5"],
        ["serve", "DIR", "--listen", "127.0.0.1:0", "--busy-poll-us", "-1"],
        ["serve", "DIR", "--listen", "127.0.0.1:0", "--busy-poll-us", "nan"],
        ["serve", "DIR", "--listen", "127.0.0.1:0", "--busy-poll-us", "2e6"],
        ["serve", "/nonexistent/dir", "--listen", "127.0.0.1:0"],
        ["frobnicate"],
    ],
)
def test_bad_options_one_line_exit_2(export: Path, argv: list[str]) -> None:
    argv = [str(export) if a == "DIR" else a for a in argv]
    r = subprocess.run([*CMD, *argv], capture_output=True, timeout=30)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
