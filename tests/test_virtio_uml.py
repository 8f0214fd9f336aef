"""A real guest on the virtio console: User-Mode Linux's virtio_uml as the frontend and the
guest's own Linux virtio_console driver on top (Debian's user-mode-linux, kernel 6.1).

Covers data both ways with checksums (hvc0 and two named ports), port names, the window
size (initial and a resize, checking the RESIZE field order against this kernel), a
second boot against the same running backend (a reboot), and the whole thing without
REPLY_ACK, where UML sends the ring enables fire-and-forget.  Then 9P on a port: the
guest's v9fs mounts sigpoll's 9P server through the port (by way of the guest-side relay,
since trans=fd refuses port devices), twice in a row.  Last, a long stream both ways at
once through one port, which is where used-ring updates race the guest's reads of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import subprocess
import textwrap
from typing import Any

import pytest

from sigpoll.guest import _uml
from sigpoll.guest import Guest
from sigpoll.guest._init_script import GUEST_DIR
from sigpoll.ninep import NinepServer
from sigpoll.virtio import ConsoleDevice, ResizeOrder, VhostUserBackend, ninep_mount_command, open_port, serve_ninep

try:
    _uml.find_kernel()
    _MODULES = _uml.modules_dir()
    _VIRTIO_CONSOLE = os.path.join(_MODULES or "", "kernel/drivers/char/virtio_console.ko")
    if not os.path.exists(_VIRTIO_CONSOLE):
        raise _uml.UmlNotFound(f"UML's virtio_console module not found ({_VIRTIO_CONSOLE}); "
                               f"install it with: {_uml.INSTALL_HINT}")
except _uml.UmlNotFound as exc:  # pragma: no cover - on these machines UML is installed
    pytestmark = pytest.mark.skip(reason=f"needs User-Mode Linux with virtio_console: {exc}")

DATA_BYTES = 4 * 1024 * 1024

INIT = textwrap.dedent(
    """\
    #!/bin/sh
    mount -t proc proc /proc
    mount -t sysfs sys /sys
    # virtio_console has no module dependencies (modinfo: depends is empty)
    insmod {module}
    i=0
    while [ ! -e /dev/vport0p2 ] || [ ! -e /dev/hvc0 ]; do
        sleep 0.1; i=$((i + 1)); [ $i -gt 100 ] && break
    done
    exec </dev/hvc0 >/dev/hvc0 2>&1
    stty -echo -onlcr
    echo "@@NAMES $(cat /sys/class/virtio-ports/vport0p1/name) $(cat /sys/class/virtio-ports/vport0p2/name)@@"
    echo "@@SIZE1 $(stty size)@@"
    read -r line
    echo "@@GOT $line@@"
    cat {g2h} > /dev/vport0p1
    echo "@@H2G $(head -c {nbytes} /dev/vport0p2 | sha256sum | cut -d' ' -f1)@@"
    read -r line
    echo "@@SIZE2 $(stty size)@@"
    echo o > /proc/sysrq-trigger
    sleep 30
    """
)


async def _marker(reader: asyncio.StreamReader, name: str, timeout: float = 60) -> str:
    await asyncio.wait_for(reader.readuntil(f"@@{name} ".encode()), timeout)
    value = await asyncio.wait_for(reader.readuntil(b"@@"), timeout)
    return value[:-2].decode().strip()


async def _boot_once(device: ConsoleDevice, sock: str, init: str, g2h_data: bytes, tmp: str) -> None:
    """One guest boot: checks every exchange of the init script."""
    device.ports[0].resize(31, 97)  # the size persists across boots, like a terminal's
    reader, writer = await open_port(device.ports[0], limit=1 << 20)
    # Keep both writers referenced: a StreamWriter closes its transport when collected.
    g2h_reader, g2h_writer = await open_port(device.ports[1], limit=1 << 20)
    h2g_reader, h2g_writer = await open_port(device.ports[2])
    h2g_data = os.urandom(DATA_BYTES)
    cmd = _uml.kernel_command(init, console="null", extra=[f"virtio_uml.device={sock}:3"])
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            **_uml.spawn_kwargs(tmpdir=tmp))

    async def h2g() -> None:
        await device.ports[2].wait_guest_open()
        h2g_writer.write(h2g_data)
        await h2g_writer.drain()

    feeder = asyncio.ensure_future(h2g())
    try:
        assert await _marker(reader, "NAMES") == "g2h h2g"
        assert await _marker(reader, "SIZE1") == "31 97"  # rows cols, as the host set them
        writer.write(b"hello from the host\n")
        assert await _marker(reader, "GOT") == "hello from the host"
        received = await asyncio.wait_for(g2h_reader.read(-1), 60)  # up to the guest's close
        assert len(received) == len(g2h_data)
        assert hashlib.sha256(received).digest() == hashlib.sha256(g2h_data).digest()
        assert await _marker(reader, "H2G") == hashlib.sha256(h2g_data).hexdigest()
        device.ports[0].resize(47, 151)
        writer.write(b"go on\n")
        assert await _marker(reader, "SIZE2") == "47 151"
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        feeder.cancel()
        _uml.kill_group(proc)
        for w in (writer, g2h_writer, h2g_writer):
            w.close()


def _setup(tmp_path: Any) -> tuple[str, str, bytes]:
    g2h = tmp_path / "g2h.bin"
    data = os.urandom(DATA_BYTES)
    g2h.write_bytes(data)
    init = tmp_path / "init.sh"
    init.write_text(INIT.format(module=_VIRTIO_CONSOLE, g2h=g2h, nbytes=DATA_BYTES))
    init.chmod(0o755)
    return str(tmp_path / "vu.sock"), str(init), data


@pytest.mark.parametrize("reply_ack", [True, False], ids=["reply-ack", "fire-and-forget"])
def test_uml_guest_both_ways_names_resize_and_reboot(run: Any, tmp_path: Any, reply_ack: bool) -> None:
    sock, init, g2h_data = _setup(tmp_path)

    async def main() -> None:
        # This kernel (6.1.176) reads RESIZE as the spec's (cols, rows); SIZE1/SIZE2 check it.
        device = ConsoleDevice(["g2h", "h2g"], size=(31, 97), resize_order=ResizeOrder.COLS_ROWS)
        backend = VhostUserBackend(device, reply_ack=reply_ack)
        backend.listen(sock)
        server = asyncio.ensure_future(backend.serve())
        try:
            boots = 2 if reply_ack else 1  # the reboot: a second guest, same backend
            for _ in range(boots):
                await _boot_once(device, sock, init, g2h_data, str(tmp_path))
            await asyncio.sleep(0.2)
            assert backend.sessions == boots and not backend.dropped
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)

    run(main(), timeout=150)


NINEP_INIT = textwrap.dedent(
    """\
    #!/bin/sh
    mount -t proc proc /proc
    mount -t sysfs sys /sys
    insmod {module}
    for m in fs/netfs/netfs.ko fs/fscache/fscache.ko net/9p/9pnet.ko net/9p/9pnet_fd.ko fs/9p/9p.ko; do
        insmod {modules}/kernel/$m
    done
    i=0
    while [ ! -e /dev/vport0p1 ] || [ ! -e /dev/hvc0 ]; do
        sleep 0.1; i=$((i + 1)); [ $i -gt 100 ] && break
    done
    exec </dev/hvc0 >/dev/hvc0 2>&1
    stty -echo -onlcr
    mount -t tmpfs tmpfs /mnt && mkdir /mnt/m  # not over /tmp: a checkout there holds the relay
    {mount}; echo "@@MOUNT $?@@"
    echo "@@READ $(sha256sum < /mnt/m/in.bin | cut -d' ' -f1)@@"
    cat /mnt/m/in.bin > /mnt/m/sub/out.bin; echo "@@WROTE $?@@"
    umount /mnt/m; echo "@@UMOUNT $?@@"
    {mount}; echo "@@MOUNT2 $?@@"
    echo "@@LS $(ls /mnt/m/sub)@@"
    umount /mnt/m
    sleep 0.5
    echo "@@RELAYS $(ps ax -o args | grep -c '^[^ ]*python[^ ]* -I -S .*_fd_relay')@@"
    echo o > /proc/sysrq-trigger
    sleep 30
    """
)


def test_uml_guest_mounts_9p_over_a_port(run: Any, tmp_path: Any) -> None:
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    data = os.urandom(3 * 1024 * 1024 + 123)  # far past the 4 KiB a serial line hangs on
    (export / "in.bin").write_bytes(data)
    init = tmp_path / "init.sh"
    mount = shlex.join(ninep_mount_command("/dev/vport0p1", "/mnt/m", msize=256 * 1024))
    init.write_text(NINEP_INIT.format(module=_VIRTIO_CONSOLE, modules=_MODULES, mount=mount))
    init.chmod(0o755)
    sock = str(tmp_path / "vu.sock")

    async def main() -> None:
        device = ConsoleDevice(["ninep"])
        backend = VhostUserBackend(device)
        backend.listen(sock)
        server = NinepServer(str(export))
        tasks = [asyncio.ensure_future(backend.serve()), asyncio.ensure_future(serve_ninep(device.ports[1], server))]
        reader, writer = await open_port(device.ports[0], limit=1 << 20)
        proc = subprocess.Popen(_uml.kernel_command(str(init), console="null", extra=[f"virtio_uml.device={sock}:3"]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                **_uml.spawn_kwargs(tmpdir=str(tmp_path)))
        try:
            assert await _marker(reader, "MOUNT") == "0"
            assert await _marker(reader, "READ") == hashlib.sha256(data).hexdigest()
            assert await _marker(reader, "WROTE") == "0"
            assert await _marker(reader, "UMOUNT") == "0"
            assert await _marker(reader, "MOUNT2") == "0"  # a fresh 9P session on the same port
            assert await _marker(reader, "LS") == "out.bin"
            assert await _marker(reader, "RELAYS") == "0"  # each relay ended with its mount
            assert await asyncio.to_thread(proc.wait, 60) == 0
        finally:
            _uml.kill_group(proc)
            writer.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.close()
        assert (export / "sub" / "out.bin").read_bytes() == data
        assert not backend.dropped

    run(main(), timeout=110)


# Runs in the guest (the host's python3): writes UP_BYTES of a seeded pattern to the port in
# 32 KiB writes while a thread reads DOWN_BYTES from it; prints what it read as a count and
# a sha256.  Its own writes cannot fail short: it loops on partial writes.
STREAM_GUEST = textwrap.dedent(
    """\
    import hashlib, os, sys, threading
    up, down = int(sys.argv[1]), int(sys.argv[2])
    fd = os.open("/dev/virtio-ports/p", os.O_RDWR)
    got, count = hashlib.sha256(), 0
    def read():
        global count
        while count < down:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            got.update(data)
            count += len(data)
    reader = threading.Thread(target=read)
    reader.start()
    block = hashlib.shake_256(b"sigpoll up").digest(1 << 20)
    view = memoryview(block)
    for _ in range(up >> 20):
        off = 0
        while off < len(block):
            off += os.write(fd, view[off : off + 32768])
    reader.join()
    print("@@DOWN", count, got.hexdigest(), "@@", flush=True)
    """
)
STREAM_UP = 1024 * 1024 * 1024  # guest -> host
STREAM_DOWN = 256 * 1024 * 1024  # host -> guest, at the same time


def test_uml_guest_streams_both_ways_at_once_through_one_port(run: Any) -> None:
    # The guest's driver polls the transmit ring's used index on every write while the
    # backend pushes used buffers as fast as it can, on another CPU.  A used index that is
    # ever visible half-written (struct.pack_into zeroes before it stores) hands the guest
    # a stale element: Linux marks the queue broken ("id N is not a head!") and the stream
    # stops short, often after a few hundred MB.  tests/test_virtio_ring.py catches the
    # store itself every time; this checks the whole path end to end.
    up_block = hashlib.shake_256(b"sigpoll up").digest(1 << 20)
    down_block = hashlib.shake_256(b"sigpoll down").digest(1 << 20)
    up_sha = hashlib.sha256()
    down_sha = hashlib.sha256()
    for _ in range(STREAM_UP >> 20):
        up_sha.update(up_block)
    for _ in range(STREAM_DOWN >> 20):
        down_sha.update(down_block)

    async def main() -> None:
        async with Guest(ports=["p"]) as g:
            assert g.tmpdir is not None
            with open(os.path.join(g.tmpdir, "stream.py"), "w") as f:
                f.write(STREAM_GUEST)
            reader, writer = await g.open_port("p")
            # The guest's output as it comes: a broken ring leaves the guest blocked in a
            # write for good, so its kernel's complaint, if it reaches the console, ends
            # the test early (otherwise the time limit does).
            output = bytearray()
            complained = asyncio.get_running_loop().create_future()

            def take(chunk: bytes) -> None:
                output.extend(chunk)
                if b"not a head" in output and not complained.done():
                    complained.set_result(None)

            guest = asyncio.ensure_future(
                g.run(["python3", f"{GUEST_DIR}/stream.py", str(STREAM_UP), str(STREAM_DOWN)], output=take))

            async def send() -> None:
                for _ in range(STREAM_DOWN >> 20):
                    writer.write(down_block)
                    await writer.drain()

            async def receive() -> tuple[int, bytes]:
                got, count = hashlib.sha256(), 0
                while chunk := await reader.read(1 << 20):  # up to the guest's close
                    got.update(chunk)
                    count += len(chunk)
                return count, got.digest()

            sender = asyncio.ensure_future(send())
            receiver = asyncio.ensure_future(receive())
            try:
                both = asyncio.gather(receiver, sender, guest)
                await asyncio.wait([both, complained], return_when=asyncio.FIRST_COMPLETED)
                text = output.decode(errors="replace")
                assert not complained.done(), f"the guest's virtqueue broke: {text}"
                (count, digest), _, result = both.result()
            finally:
                for task in (receiver, sender, guest):
                    task.cancel()
                writer.close()
            assert result.status == 0, text
            assert count == STREAM_UP and digest == up_sha.digest()
            assert text.split("@@DOWN", 1)[1].split()[:2] == [str(STREAM_DOWN), down_sha.hexdigest()]

    run(main(), timeout=110)
