"""The guest's PID 1: a shell script built from the guest's configuration (pure, no I/O)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

__all__ = [
    "GUEST_DIR",
    "PORTS_DIR",
    "command_line",
    "command_text",
    "init_script",
    "interactive_line",
    "port_setup",
    "share_mount_lines",
    "share_setup",
]

# Load order of the guest kernel's 9P modules (each needs the ones before it).
_NINEP_MODULES = (
    "fs/netfs/netfs.ko",
    "fs/fscache/fscache.ko",
    "net/9p/9pnet.ko",
    "net/9p/9pnet_fd.ko",  # carries trans=tcp as well as trans=fd
    "fs/9p/9p.ko",
)


def share_setup(modules_dir: str, mounts: Sequence[tuple[str, str, int]], msize: int) -> list[str]:
    """Init lines that load v9fs and mount each ``(tag, host_address, port)`` at /mnt/TAG.

    /mnt gets a tmpfs first: the host's root may be read-only.  A failed mount is reported
    on the console with a marker the host turns into an error.
    """
    # access=client: one attach per guest user, so the server knows who creates a file
    # and the guest kernel checks permissions against the owners the server reports.
    options = f"version=9p2000.L,msize={msize},access=client,cache=none"
    return share_mount_lines(modules_dir, [
        (tag, f"mount -t 9p -o trans=tcp,port={port},{options} {host} /mnt/{tag}") for tag, host, port in mounts
    ])


def share_mount_lines(modules_dir: str, mounts: Sequence[tuple[str, str]]) -> list[str]:
    """Init lines that load v9fs and run each ``(tag, mount command)`` onto /mnt/TAG."""
    lines = [f"insmod {modules_dir}/kernel/{m} 2>/dev/null" for m in _NINEP_MODULES]
    lines.append("mount -t tmpfs tmpfs /mnt")
    for tag, command in mounts:
        lines += [f"mkdir -p /mnt/{tag}", f"{command} || echo '@@SHARE-FAILED:{tag}@@'"]
    return lines


#: Where the guest finds its named virtio-console ports, as udev would lay them out.
PORTS_DIR = "/dev/virtio-ports"


def port_setup(modules_dir: str, names: Sequence[str], wait_tenths: int = 100) -> list[str]:
    """Init lines that load virtio_console and link each named port at PORTS_DIR/NAME.

    UML guests have no udev, so the links /dev/virtio-ports/NAME -> ../vportNpM that udev
    makes elsewhere are made here, from /sys/class/virtio-ports/*/name.  A port's name
    arrives in a control message after its device node, so the script waits (up to
    ``wait_tenths`` tenths of a second) until every name is there; a port that never shows
    up is reported with a marker the host turns into an error.
    """
    lines = [
        f"insmod {modules_dir}/kernel/drivers/char/virtio_console.ko 2>/dev/null",
        f"mkdir -p {PORTS_DIR}",
        "_sp_link() { for _d in /sys/class/virtio-ports/*; do",
        "  _n=$(cat \"$_d/name\" 2>/dev/null)",
        f"  [ -n \"$_n\" ] && [ -e \"/dev/${{_d##*/}}\" ] && ln -sfn \"../${{_d##*/}}\" \"{PORTS_DIR}/$_n\"",
        "done; }",
    ]
    for name in names:
        q = shlex.quote(f"{PORTS_DIR}/{name}")
        lines += [
            f"_i=0; while _sp_link; [ ! -e {q} ] && [ $_i -lt {wait_tenths} ]; do sleep 0.1; _i=$((_i + 1)); done",
            f"[ -e {q} ] || echo '@@PORT-FAILED:{name}@@'",
        ]
    return lines


#: Where the guest sees the host's private directory for it (command scripts live there).
GUEST_DIR = "/run/sigpoll"


def init_script(token: str, *, host_dir: str, read_only: bool, setup: Sequence[str] = ()) -> str:
    """PID 1 for a guest on the host's root file system.

    It mounts what a shell needs, binds ``host_dir`` (the guest's private directory on the
    host) at :data:`GUEST_DIR` before /tmp is covered by a tmpfs, runs ``setup`` lines (share mounts, module loads), prints a
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
    lines += [
        "mount -t tmpfs tmpfs /run",
        f"mkdir -p {GUEST_DIR}",
        f"mount --bind {shlex.quote(host_dir)} {GUEST_DIR}",
    ]
    if read_only:
        # The host's root is mounted read-only: give the guest writable scratch space.
        lines.append("mount -t tmpfs tmpfs /tmp")
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


def command_line(token: str, script: str) -> bytes:
    """What the host types to run the command in ``script`` and learn its exit status.

    The command itself travels as a file (the guest sees the host's root, and with it the
    guest's private directory): the console line stays short whatever the command is, so
    neither the tty's 4095-byte line limit nor UML's console input path (which loses input
    once the guest's tty throttles) can touch it, and no quoting is needed.  It runs in a
    subshell with stdin from /dev/null, so ``exit`` or ``set -e`` cannot end the guest's
    command loop and the command cannot swallow the host's next line.  The status comes
    back as ``@@TOKEN:EXIT:N@@``.
    """
    return f"( . {shlex.quote(script)} ) </dev/null; printf '@@%s:EXIT:%d@@\\n' {token} $?\n".encode()


def command_text(argv: str | Sequence[str]) -> str:
    """The shell text of a command: a string as it is, a list quoted word by word."""
    return (argv if isinstance(argv, str) else shlex.join(argv)) + "\n"


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
