"""The guest's PID 1, a shell script built from the guest's configuration, and the console
protocol the host speaks with it: command lines in, marked output and statuses out (pure,
no I/O)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

__all__ = [
    "GUEST_DIR",
    "PORTS_DIR",
    "SHARE_OPTIONS",
    "CommandScanner",
    "command_line",
    "command_text",
    "init_script",
    "interactive_line",
    "interrupt_line",
    "port_setup",
    "reap_line",
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


#: 9P mount options every share gets, whatever carries it.  access=client: one attach per
#: guest user, so the server knows who creates a file and the guest kernel checks
#: permissions against the owners the server reports.  cache=none: the host may change
#: the files too.
SHARE_OPTIONS = "access=client,cache=none"


def share_setup(modules_dir: str, mounts: Sequence[tuple[str, str, int]], msize: int) -> list[str]:
    """Init lines that load v9fs and mount each ``(tag, host_address, port)`` at /mnt/TAG.

    /mnt gets a tmpfs first: the host's root may be read-only.  A failed mount is reported
    on the console with a marker the host turns into an error.
    """
    # privport: the guest kernel connects from a port below 1024, which only the guest's root
    # may bind, so the server can tell the guest's mount from a guest user's own client.
    options = f"version=9p2000.L,msize={msize},{SHARE_OPTIONS},privport"
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


def init_script(token: str, *, host_dir: str, read_only: bool, setup: Sequence[str] = (),
                setuid_off: bool = False) -> str:
    """PID 1 for a guest on the host's root file system.

    It mounts what a shell needs, mounts ``host_dir`` (the guest's private directory, as UML
    sees it) at :data:`GUEST_DIR` with hostfs, covers /tmp with a tmpfs, runs ``setup`` lines
    (share mounts, module loads), prints a
    ready marker carrying ``token`` and then becomes a quiet shell that reads commands from
    the console: no echo, no prompt, no CR insertion, so the host sees command output byte
    for byte.  Whatever happens, it powers the guest off rather than exiting (PID 1 exiting
    panics the kernel).

    ``setuid_off``: run everything with no_new_privs, so set-user-ID bits do nothing in the
    guest.  For a guest whose host files appear owned by nobody (a jail in a user namespace
    maps every id but ours to the overflow id), where a setuid ``mount`` would otherwise
    run as nobody.
    """
    lines = ["#!/bin/sh"]
    if setuid_off:
        lines.append('[ -n "$SIGPOLL_NNP" ] || SIGPOLL_NNP=1 exec setpriv --no-new-privs "$0" "$@"')
    lines += [
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "export HOME=/root TERM=${TERM:-vt100}",
        "mount -t proc proc /proc",
        "mount -t sysfs sys /sys",
    ]
    lines += [
        "mount -t tmpfs tmpfs /run",
        f"mkdir -p {GUEST_DIR}",
        # hostfs straight from the host's path: it may lie under the /run just covered.
        f"mount -t hostfs none {GUEST_DIR} -o {shlex.quote(host_dir)}",
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


def command_line(token: str, number: int, script: str) -> bytes:
    """What the host types to run command ``number`` (its text in ``script``) in the guest.

    The command itself travels as a file (the guest sees the host's root, and with it the
    guest's private directory): the console line stays short whatever the command is, so
    neither the tty's 4095-byte line limit nor UML's console input path (which loses input
    once the guest's tty throttles) can touch it, and no quoting is needed.  It runs in a
    subshell with stdin from /dev/null, so ``exit`` or ``set -e`` cannot end the guest's
    command loop and the command cannot swallow the host's next line.

    It runs in the background, in a session of its own (``setsid``): the guest's command
    loop stays free to read the next line, so :func:`interrupt_line` (or a power-off) works
    while it runs.  Its output is framed by markers carrying ``token`` and ``number``:
    ``@@TOKEN:START:N@@`` before it, ``@@TOKEN:EXIT:N:STATUS@@`` after it, so output and
    status of one command can never be taken for another's.
    """
    body = (f'printf "@@%s:START:%s@@\\n" {token} {number}; ( . "$1" ) </dev/null; '
            f'printf "@@%s:EXIT:%s:%d@@\\n" {token} {number} $?')
    return (f"setsid sh -c {shlex.quote(body)} sh {shlex.quote(script)} </dev/null & "
            f"_sp_{number}=$!\n").encode()


def reap_line(number: int) -> bytes:
    """Collect command ``number``'s wrapper once it has printed its exit marker (the guest's
    PID 1 must reap what it started)."""
    return f"wait $_sp_{number} 2>/dev/null\n".encode()


def interrupt_line(token: str, number: int) -> bytes:
    """Kill command ``number`` and everything in its session; the guest answers
    ``@@TOKEN:KILLED:N@@`` once it is gone."""
    return (f"kill -KILL -$_sp_{number} 2>/dev/null; wait $_sp_{number} 2>/dev/null; "
            f"printf '@@%s:KILLED:%s@@\\n' {token} {number}\n").encode()


class CommandScanner:
    """Picks one command's output and status out of the guest's console stream (pure).

    :meth:`feed` takes console bytes and returns the output that belongs to command
    ``number``: nothing before its start marker (leftovers of an earlier, interrupted
    command), and nothing of the markers.  :attr:`status` is set when its exit marker
    arrives, :attr:`killed` when an interruption's does; :attr:`done` is either.  A tail
    that may be the start of a split marker is held back until the next feed.
    """

    def __init__(self, token: str, number: int) -> None:
        self._start = f"@@{token}:START:{number}@@\n".encode()
        self._exit = f"@@{token}:EXIT:{number}:".encode()
        self._killed = f"@@{token}:KILLED:{number}@@\n".encode()
        self._pending = b""
        self.started = False
        self.status: int | None = None
        self.killed = False

    @property
    def done(self) -> bool:
        return self.status is not None or self.killed

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        self._pending += data
        out = b""
        if not self.started:
            at = self._pending.find(self._start)
            if at < 0:
                if self._killed in self._pending:  # interrupted before it even started
                    self.killed = True
                self._pending = self._pending[-len(self._killed):]
                return b""
            self.started = True
            self._pending = self._pending[at + len(self._start):]
        at = self._pending.find(self._exit)
        if at >= 0:
            end = self._pending.find(b"@@\n", at + len(self._exit))
            if end < 0:
                out, self._pending = self._pending[:at], self._pending[at:]  # status not all here
                return out
            self.status = int(self._pending[at + len(self._exit):end])
            return self._pending[:at]
        at = self._pending.find(self._killed)
        if at >= 0:
            self.killed = True
            return self._pending[:at]
        keep = max(len(self._exit), len(self._killed)) - 1
        if len(self._pending) > keep:
            out, self._pending = self._pending[:-keep], self._pending[-keep:]
        return out


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
