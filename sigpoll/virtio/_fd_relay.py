"""Guest-side relay: run a command with a socket that is relayed to a virtio port device.

Runs *inside* a guest, with nothing but the standard library (start it with ``python3 -I
-S``).  It exists because Linux's ``trans=fd`` 9P transport reads and writes its fds with
kernel I/O, which needs ``read_iter``/``write_iter``; the virtio console's port devices only
have ``read``/``write``, so ``mount -t 9p -o trans=fd`` on ``/dev/vportNpM`` fails ("kernel
write not supported for file /vport0p1" in dmesg, EINVAL from mount).  A socket works, so::

    python3 -I -S _fd_relay.py /dev/vport0p1 3 -- mount -t 9p -o trans=fd,rfdno=3,wfdno=3,... none /mnt

makes a socketpair, forks a relay that copies bytes between the port and one end, runs the
command with the other end as fd 3, and exits with the command's status.  The relay lives on
(the kernel keeps its own reference to the mount's socket) until either side closes: the
port is hung up by the host, or the file system is unmounted.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

__all__ = ["main", "relay"]

_CHUNK = 1 << 16


def _copy(src: int, dst: int, done: threading.Event) -> None:
    try:
        while True:
            data = os.read(src, _CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
    except OSError:
        pass  # the other side went away: the relay ends either way
    finally:
        done.set()


def relay(device_fd: int, sock: socket.socket) -> None:
    """Copy bytes both ways between ``device_fd`` and ``sock`` until either side ends."""
    done = threading.Event()
    # One thread per direction with blocking I/O: each side drains its reads independently
    # (v9fs and the host's 9P server both do), so neither direction can hold up the other.
    fd = sock.fileno()
    for src, dst in ((device_fd, fd), (fd, device_fd)):
        threading.Thread(target=_copy, args=(src, dst, done), daemon=True).start()
    done.wait()


def main(argv: list[str]) -> int:
    """``DEVICE FD -- COMMAND...``: run COMMAND with fd FD relayed to DEVICE."""
    try:
        sep = argv.index("--")
        device, fdno = argv[:sep]
        target = int(fdno)
        command = argv[sep + 1:]
    except ValueError:
        command = []
    if not command or target < 3:
        sys.stderr.write("usage: _fd_relay.py DEVICE FD -- COMMAND [ARGS...]  (FD >= 3)\n")
        return 2
    try:
        dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        sys.stderr.write(f"_fd_relay: cannot open {device}: {exc.strerror}\n")
        return 1
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        # The relay: it must not hold the command's end, or it would never see it close.
        theirs.close()
        try:
            os.setsid()
            relay(dev, ours)
        finally:
            os._exit(0)
    os.close(dev)
    ours.close()
    os.dup2(theirs.fileno(), target, inheritable=True)
    theirs.close()
    try:
        child = os.fork()
        if child == 0:
            try:
                os.execvp(command[0], command)
            except OSError as exc:
                sys.stderr.write(f"_fd_relay: cannot run {command[0]}: {exc.strerror}\n")
            os._exit(127)
        _, status = os.waitpid(child, 0)
    finally:
        os.close(target)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
