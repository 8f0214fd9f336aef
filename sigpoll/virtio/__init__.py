"""virtio devices for guests, served over vhost-user.

:class:`VhostUserBackend` serves a device on a unix socket to one frontend after another
(User-Mode Linux's ``virtio_uml``, QEMU, ...).  :class:`ConsoleDevice` is a virtio console
with a console port and named ports; each port is a host-side asyncio transport
(:class:`PortTransport`) with the interface of :class:`sigpoll.tty.ConsoleTransport`.

    device = ConsoleDevice(["data"])
    backend = VhostUserBackend(device)
    reader, writer = await open_port(device.ports[1])
    await backend.serve("/run/console.sock")

The guest gets ``virtio_uml.device=/run/console.sock:3`` (UML) and the virtio_console driver.
:class:`PortSocket` exposes a port as a unix socket; :func:`serve_ninep` serves a
:class:`sigpoll.ninep.NinepServer` on a port, which the guest mounts with
:func:`ninep_mount_command`.
"""

from ._backend import VhostUserBackend, VirtioDevice
from ._console import (
    ConsoleDevice,
    ConsolePort,
    ControlEvent,
    PortTransport,
    ResizeOrder,
    open_port,
)
from ._services import PortSocket, ninep_mount_command, serve_ninep
from ._memory import GuestMemory, MemoryFault
from ._vhost_user import ProtocolError
from ._virtqueue import Chain, Virtqueue

__all__ = [
    "Chain",
    "ConsoleDevice",
    "ConsolePort",
    "ControlEvent",
    "GuestMemory",
    "MemoryFault",
    "PortSocket",
    "PortTransport",
    "ProtocolError",
    "ResizeOrder",
    "VhostUserBackend",
    "VirtioDevice",
    "Virtqueue",
    "ninep_mount_command",
    "open_port",
    "serve_ninep",
]
