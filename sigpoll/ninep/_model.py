"""The export's security models: what a 9P client may make of the host's files.

Pure rules, no I/O; :class:`sigpoll.ninep._fs.Export` applies them.  See docs/ninep.md
("Security models") for the design and why.

``mapped`` (the default): the client's view of owners, modes, file types and device
numbers lives in one extended attribute per file (:data:`ATTR_XATTR`), and the host holds
plain files, directories and regular files that stand for symlinks and special files,
owned by the server, with no set-id bits and no group or other write permission.  The
client's own extended attributes, whatever their namespace, are stored under
:data:`XATTR_PREFIX`, where they mean nothing to the host.

``passthrough``: the client's owners and modes are the host's, within limits: no device
nodes, no set-user-ID or set-group-ID bit ever added, extended attributes only in ``user.``
and the POSIX ACL names.
"""

from __future__ import annotations

import errno
import stat
import struct
from dataclasses import dataclass

__all__ = [
    "ATTR_XATTR", "Attr", "MAPPED", "MODELS", "PASSTHROUGH", "XATTR_PREFIX",
    "decode_attr", "encode_attr", "host_mode", "passthrough_chmod", "passthrough_create_mode",
    "xattr_to_client", "xattr_to_host",
]

MAPPED = "mapped"
PASSTHROUGH = "passthrough"
MODELS = (MAPPED, PASSTHROUGH)

#: The mapped model's record of a file as the client sees it.  One attribute, so a stat
#: costs one getxattr and a chown or chmod changes the record in one step.
ATTR_XATTR = "user.sigpoll"
#: Where the mapped model stores the client's own attributes: ``security.capability``
#: becomes ``user.sigpoll.security.capability``, a name no host kernel acts on.
XATTR_PREFIX = ATTR_XATTR + "."

# The names POSIX ACLs travel under; passthrough lets them through (an ACL grants no
# more than chmod could), everything else outside user.* is refused.
_ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")
_XATTR_NAME_MAX = 255  # Linux's XATTR_NAME_MAX

# version, uid, gid, mode, rdev (the Linux dev_t encoding), little-endian.
_ATTR = struct.Struct("<BIIIQ")
_ATTR_VERSION = 1

# What may be a client-visible file type in the mapped model (mknod's S_IFMT values).
_KINDS = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                    stat.S_IFIFO, stat.S_IFSOCK})
_SETID = stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True, slots=True)
class Attr:
    """A file as the mapped model's client sees it."""

    uid: int
    gid: int
    mode: int  # file type and all twelve permission bits
    rdev: int = 0


def encode_attr(a: Attr) -> bytes:
    return _ATTR.pack(_ATTR_VERSION, a.uid & 0xFFFFFFFF, a.gid & 0xFFFFFFFF,
                      a.mode & 0xFFFFFFFF, a.rdev & 0xFFFFFFFFFFFFFFFF)


def decode_attr(raw: bytes) -> Attr | None:
    """The record in ``raw``, or None for anything that is not one (the file then shows
    its host attributes)."""
    if len(raw) != _ATTR.size:
        return None
    version, uid, gid, mode, rdev = _ATTR.unpack(raw)
    if version != _ATTR_VERSION or stat.S_IFMT(mode) not in _KINDS:
        return None
    return Attr(uid, gid, mode, rdev)


def host_mode(kind: int, mode: int) -> int:
    """The permission bits the mapped model gives the host's file for a client file of
    type ``kind`` and mode ``mode``.

    No set-id or sticky bit and no group or other write; the owner (the server) can
    always read and write it, and search it if it is a directory.  Files that stand for
    symlinks, devices, fifos and sockets are 0600 regular files.
    """
    if kind == stat.S_IFDIR:
        return (mode & 0o755) | 0o700
    if kind == stat.S_IFREG:
        return (mode & 0o755) | 0o600
    return 0o600


def passthrough_create_mode(mode: int) -> int:
    """Permission bits of a file the passthrough model creates: the client's, less the
    set-id bits (dropped as Linux drops S_ISGID for a creator outside the group)."""
    return mode & 0o1777


def passthrough_chmod(mode: int, current: int) -> int:
    """Permission bits for a passthrough chmod to ``mode`` of a file whose mode is
    ``current``; a set-id bit the file does not already have is EPERM."""
    added = mode & _SETID & ~current
    if added:
        raise OSError(errno.EPERM, "set-user-ID and set-group-ID bits cannot be set "
                                   "through this export")
    return mode & 0o7777


def _check_name(name: str) -> None:
    if not name or "\0" in name:
        raise OSError(errno.EINVAL, "invalid attribute name")


def xattr_to_host(model: str, name: str) -> str:
    """The host's name for the client's attribute ``name``; OSError when the model
    refuses it."""
    _check_name(name)
    if model == MAPPED:
        host = XATTR_PREFIX + name
        if len(host.encode("utf-8", "surrogateescape")) > _XATTR_NAME_MAX:
            raise OSError(errno.ERANGE, "attribute name too long")
        return host
    if name == ATTR_XATTR or name.startswith(XATTR_PREFIX):
        raise OSError(errno.EPERM, "reserved attribute name")
    if name.startswith("user.") or name in _ACL_NAMES:
        return name
    raise OSError(errno.EOPNOTSUPP, "only user.* and POSIX ACL attributes are exported")


def xattr_to_client(model: str, host_name: str) -> str | None:
    """The client's name for the host attribute ``host_name``, or None if it is hidden."""
    if model == MAPPED:
        if host_name.startswith(XATTR_PREFIX) and len(host_name) > len(XATTR_PREFIX):
            return host_name[len(XATTR_PREFIX):]
        return None
    if host_name == ATTR_XATTR or host_name.startswith(XATTR_PREFIX):
        return None
    if host_name.startswith("user.") or host_name in _ACL_NAMES:
        return host_name
    return None
