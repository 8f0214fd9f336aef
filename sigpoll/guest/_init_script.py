"""The guest's PID 1: a shell script built from the guest's configuration (pure, no I/O)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

__all__ = ["init_script", "command_line", "interactive_line"]


def init_script(token: str, *, read_only: bool, setup: Sequence[str] = ()) -> str:
    """PID 1 for a guest on the host's root file system.

    It mounts what a shell needs, runs ``setup`` lines (share mounts, module loads), prints a
    ready marker carrying ``token`` and then becomes a quiet shell that reads commands from
    the console: no echo, no prompt, no CR insertion, so the host sees command output byte
    for byte.  Whatever happens, it powers the guest off rather than exiting (PID 1 exiting
    panics the kernel).
    """
    lines = [
        "#!/bin/sh",
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "export HOME=/root TERM=${TERM:-vt100}",
        "mount -t proc proc /proc",
        "mount -t sysfs sys /sys",
    ]
    if read_only:
        # The host's root is mounted read-only: give the guest writable scratch space.
        lines += ["mount -t tmpfs tmpfs /tmp", "mount -t tmpfs tmpfs /run"]
    lines += list(setup)
    lines += [
        "stty -echo -onlcr 2>/dev/null",
        f"echo '@@{token}:READY@@'",
        # A read-eval loop rather than `sh` on the console: a shell on a tty turns itself
        # interactive (prompts, job-control warnings) and would mix that into the output.
        'while IFS= read -r line; do eval "$line"; done',
        "echo o > /proc/sysrq-trigger",
        "sleep 60",
    ]
    return "\n".join(lines) + "\n"


def command_line(token: str, argv: str | Sequence[str]) -> bytes:
    """What the host types to run one command and learn its exit status.

    The status comes back as ``@@TOKEN:EXIT:N@@``; stdin is /dev/null so the command cannot
    swallow the host's next line.
    """
    cmd = argv if isinstance(argv, str) else shlex.join(argv)
    return f"( {cmd} ) </dev/null; printf '@@%s:EXIT:%d@@\\n' {token} $?\n".encode()


def interactive_line(rows: int | None, cols: int | None) -> bytes:
    """Turn the quiet command shell into an interactive one on the guest's console tty.

    A new session with the console as controlling terminal gives job control and ^C; when
    that shell exits, the guest powers off.
    """
    size = f"stty rows {rows} cols {cols} </dev/tty0; " if rows and cols else ""
    return (
        f"stty sane </dev/tty0; {size}"
        "setsid -w -c /bin/sh -i </dev/tty0 >/dev/tty0 2>&1; "
        "echo o > /proc/sysrq-trigger\n"
    ).encode()
