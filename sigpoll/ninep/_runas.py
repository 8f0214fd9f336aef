"""``--user``: the user a root 9P server drops to once its export is open and it listens.

Kept apart from the command line so any front end can use it: :func:`resolve_user` checks
the request against the squash options (a server running as a user can only give new
files to itself), :func:`drop_to` switches.
"""

from __future__ import annotations

import os
import pwd

__all__ = ["resolve_user", "drop_to"]


def resolve_user(user: str, squash_uid: int | None = None,
                 squash_gid: int | None = None) -> pwd.struct_passwd:
    """The password entry for ``user`` (a name or a uid); ValueError with a one-line
    reason when it cannot be used."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"--user: no such user: {user}") from None
    if os.geteuid() != 0:
        raise ValueError("--user needs root (the server is already running as a user)")
    if squash_gid is None:
        squash_gid = squash_uid
    if squash_uid not in (None, pw.pw_uid) or squash_gid not in (None, pw.pw_gid):
        raise ValueError(f"--squash-uid/--squash-gid: a server running as {pw.pw_name} "
                         "can only give new files to itself")
    return pw


def drop_to(pw: pwd.struct_passwd) -> None:
    """Become ``pw`` for good: its groups, its gid, its uid (glibc applies each call to
    every thread of the process)."""
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
