"""A real guest: User-Mode Linux with its console on a sigpoll console.

The guest's own tty layer and UML's line driver are the peer here.  The test needs Debian's
`user-mode-linux` package (scripts/test.sh installs it when run as root).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import textwrap
from typing import Any

import pytest

from sigpoll.guest import _uml
from sigpoll import tty as stty
from sigpoll.stress import xxd

try:
    _uml.find_kernel()
except _uml.UmlNotFound as exc:  # pragma: no cover - on these machines UML is installed
    pytestmark = pytest.mark.skip(reason=f"{exc}")

XXD_BYTES = 4 * 1024 * 1024

INIT = textwrap.dedent(
    """\
    #!/bin/sh
    mount -t proc proc /proc
    # The host checks bytes exactly: no CR insertion, no echo of what it types.
    stty -onlcr -echo
    echo @@READY@@
    PS1= exec /bin/sh
    """
)


def test_uml_console_carries_every_byte_of_xxd(run: Any, tmp_path: Any) -> None:
    init = tmp_path / "init.sh"
    init.write_text(INIT)
    init.chmod(0o755)

    async def main() -> None:
        master, path = stty.open_pty()
        slave = os.open(path, os.O_RDWR | os.O_NOCTTY)
        proc = subprocess.Popen(
            _uml.kernel_command(str(init)),
            stdin=slave,
            stdout=slave,
            **_uml.spawn_kwargs(tmpdir=str(tmp_path)),
        )
        os.close(slave)
        # readuntil() must be able to hold the whole xxd output at once.
        reader, writer = await stty.open_console(master, limit=8 * XXD_BYTES)
        transport = writer.transport
        assert isinstance(transport, stty.ConsoleTransport)
        # UML's own console path has the seed's race; see SigioNudger.
        nudger = _uml.SigioNudger(
            asyncio.get_running_loop(), proc.pid, lambda: transport.bytes_read + transport.bytes_written
        )
        nudger.start()
        try:
            await asyncio.wait_for(reader.readuntil(b"@@READY@@\n"), 60)
            writer.write(
                f"echo @@BEGIN@@; head -c {XXD_BYTES} /dev/zero | xxd; echo @@END@@\n".encode()
            )
            await asyncio.wait_for(reader.readuntil(b"@@BEGIN@@\n"), 60)
            out = await asyncio.wait_for(reader.readuntil(b"@@END@@\n"), 120)
            body = out[: -len(b"@@END@@\n")]
            expected = xxd.format_lines(bytes(XXD_BYTES), 0)
            assert len(body) == len(expected)
            assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected).hexdigest()
            writer.write(b"echo o > /proc/sysrq-trigger; sleep 30\n")
            assert await asyncio.to_thread(proc.wait, 60) == 0
        finally:
            nudger.stop()
            _uml.kill_group(proc)
            writer.close()

    run(main(), timeout=240)
