"""``python -m sigpoll.ninep serve DIR`` (``sigpoll-ninep``): export a directory over 9P2000.L.

See ``_DESCRIPTION`` (what ``serve --help`` says).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import sys
from typing import Any

from .._cli import (
    CommandError,
    Parser,
    UsageError,
    add_busy_poll_option,
    add_verbosity_options,
    check_fd,
    integer,
    listen_address,
    real,
    run_command,
    setup_logging,
    size,
    unix_path,
)
from .._unixsock import listen_unix, remove_unix
from ._runas import drop_to, resolve_user
from ._server import DEFAULT_MSIZE, MIN_MSIZE, Limits, NinepServer, fd_limit

__all__ = ["main"]

#: What ``serve --help`` says about the command.
_DESCRIPTION = """\
Export DIR over 9P2000.L on exactly one transport: --listen HOST:PORT (TCP),
--listen unix:PATH (a unix socket, mode 0600, only this user and root may connect;
--unix PATH says the same) or --fd R[,W] (one connection on inherited descriptors, as
the kernel's trans=fd uses: a socket, a tty, or a read pipe and a write pipe).

One log line per connection on stderr (-q: none).  SIGINT and SIGTERM close every
connection and exit with status 130 and 143; with --fd the command exits 0 when its one
connection ends.  Exit status 2: the command line cannot be used."""

log = logging.getLogger("sigpoll.ninep")

_MAX_MSIZE = 16 * 1024 * 1024
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel


def _fds(text: str) -> tuple[int, int]:
    import argparse

    parts = text.split(",")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected R or R,W (fd numbers), got {text!r}")
    r = int(parts[0])
    w = int(parts[1]) if len(parts) == 2 else r
    return r, w


def _parser() -> Parser:
    p = Parser("sigpoll.ninep", description="A 9P2000.L file server.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="export a directory", description=_DESCRIPTION)
    s.add_argument("dir", help="directory to export")
    t = s.add_mutually_exclusive_group(required=True)
    t.add_argument("--listen", type=listen_address, metavar="HOST:PORT|unix:PATH",
                   help="a TCP address, or a unix socket (mode 0600, this user and root only)")
    t.add_argument("--unix", type=unix_path, metavar="PATH", help="the same as --listen unix:PATH")
    t.add_argument("--fd", type=_fds, metavar="R[,W]",
                   help="serve one connection on inherited fds (a socket or tty, or two pipes)")
    s.add_argument("--read-only", action="store_true", help="refuse every change (EROFS)")
    s.add_argument("--msize", type=size(MIN_MSIZE, _MAX_MSIZE), default=DEFAULT_MSIZE,
                   metavar="SIZE", help="largest message")
    s.add_argument("--security-model", choices=("mapped", "passthrough"), default="mapped",
                   help="mapped: clients' owners, modes, device nodes and xattrs live in an "
                        "xattr of plain host files; passthrough: owners and modes are the "
                        "host's (either way no device node, set-id bit or privileged xattr "
                        "reaches the host; see docs/ninep.md)")
    s.add_argument("--squash-uid", type=integer(0, _MAX_ID), metavar="UID",
                   help="new files belong to UID on the host (and its --squash-gid); files "
                        "that exist are never re-owned")
    s.add_argument("--squash-gid", type=integer(0, _MAX_ID), metavar="GID")
    s.add_argument("--user", metavar="USER",
                   help="once the export is open and the listener bound, run as USER "
                        "(a name or a uid; needs root)")
    s.add_argument("--workers", type=integer(1, 1024), default=8, metavar="N",
                   help="file system threads")
    d = Limits()
    s.add_argument("--max-fids", type=integer(1), default=d.max_fids, metavar="N",
                   help="fids per connection, EMFILE past it")
    s.add_argument("--max-inflight", type=integer(1), default=d.max_inflight, metavar="N",
                   help="requests waiting for threads per connection; past it the connection is not read")
    s.add_argument("--max-connections", type=integer(1), default=d.max_connections, metavar="N",
                   help="connections at once; more are closed")
    s.add_argument("--max-connections-per-peer", type=integer(1),
                   default=d.max_connections_per_peer, metavar="N",
                   help="connections from one address (a unix socket: one user) at once")
    s.add_argument("--max-connection-memory", "--max-queued-output", type=size(1),
                   dest="max_connection_memory", default=d.max_connection_memory, metavar="SIZE",
                   help="bytes one connection's requests and unread replies may hold; past it "
                        "the connection is not read (--max-queued-output: its old name)")
    s.add_argument("--max-server-memory", type=size(1), default=d.max_server_memory,
                   metavar="SIZE", help="the same for all connections together")
    s.add_argument("--max-fds", type=integer(1), metavar="N",
                   help="descriptors all fids may hold (default: RLIMIT_NOFILE less 64)")
    s.add_argument("--max-connection-fds", type=integer(1), metavar="N",
                   help="descriptors one connection's fids may hold (default: an eighth of --max-fds)")
    s.add_argument("--version-timeout", type=real(0, above=True, what="a number of seconds"),
                   default=d.version_timeout,
                   metavar="SECONDS", help="close a connection that has not negotiated a version by then")
    s.add_argument("--max-threads-per-peer", type=integer(1), metavar="N",
                   help="worker threads one address's calls may hold (default: half of --workers)")
    s.add_argument("--no-inline", dest="inline", action="store_false",
                   help="every file system call in a thread (for exports on file systems that may hang)")
    add_busy_poll_option(s)
    add_verbosity_options(s)
    return p


def _listen_error(where: str, exc: OSError) -> CommandError:
    if isinstance(exc, FileExistsError):
        reason = "the path exists and is not a socket (it is left alone)"
    elif exc.errno == errno.EADDRINUSE:
        reason = "another server is listening there"
    else:
        reason = exc.strerror or str(exc)
    return UsageError(f"cannot listen on {where}: {reason}")


async def _serve(args: Any) -> int:
    fd_limit()  # as high as the hard limit allows: the fids' budget comes from it
    limits = Limits(max_fids=args.max_fids, max_inflight=args.max_inflight,
                    max_connections=args.max_connections,
                    max_connections_per_peer=args.max_connections_per_peer,
                    max_connection_memory=args.max_connection_memory,
                    max_server_memory=args.max_server_memory, max_fds=args.max_fds,
                    max_connection_fds=args.max_connection_fds,
                    version_timeout=args.version_timeout,
                    max_threads_per_peer=args.max_threads_per_peer)
    try:
        server = NinepServer(args.dir, read_only=args.read_only, msize=args.msize,
                             squash_uid=args.squash_uid, squash_gid=args.squash_gid,
                             workers=args.workers, limits=limits, inline=args.inline,
                             security_model=args.security_model)
    except OSError as exc:  # squash without root, no user.* xattrs for the mapped model
        raise UsageError(f"cannot export {args.dir}: {exc.strerror or exc}") from None
    listener: socket.socket | None = None
    try:
        if args.fd is not None:
            if args.user is not None:
                drop_to(args.user)
            await server.serve_fds(*args.fd)
            return 0
        kind, where = args.listen
        if kind == "unix":
            try:
                listener = listen_unix(where, backlog=64)
            except OSError as exc:
                raise _listen_error(where, exc) from None
            await server.start_socket(listener)
            if args.user is not None:
                drop_to(args.user)
            log.info("serving %s on unix:%s", args.dir, where)
        else:
            host, port = where
            try:
                srv = await server.start_tcp(host, port)
            except OSError as exc:
                raise _listen_error(f"{host}:{port}", exc) from None
            if args.user is not None:
                drop_to(args.user)
            bound = getattr(srv, "sockets")[0].getsockname()
            log.info("serving %s on %s:%d", args.dir, bound[0], bound[1])
        await asyncio.get_running_loop().create_future()  # until a signal cancels us
        return 0
    finally:
        await server.close()
        if listener is not None:
            remove_unix(listener)


def _is_fifo(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    args = _parser().parse_args(argv)
    setup_logging(args, own="sigpoll.ninep")
    if args.unix is not None:
        args.listen = ("unix", args.unix)
    try:
        if not os.path.isdir(args.dir):
            raise UsageError(f"not a directory: {args.dir}")
        if args.fd is not None:
            r, w = args.fd
            if w == r and _is_fifo(r):
                raise UsageError(f"--fd {r} is a pipe, which goes one way only: give a socket or "
                                 "a tty, or a read pipe and a write pipe as --fd R,W")
            check_fd(r, read=True, write=w == r, what=f"--fd {r}")
            if w != r:
                check_fd(w, write=True, what=f"--fd {r},{w}: fd {w}")
        if args.user is not None:
            try:
                args.user = resolve_user(args.user, args.squash_uid, args.squash_gid)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    except UsageError as exc:
        log.error("%s", exc.message)
        return exc.status
    return run_command(_serve(args), busy_poll_us=args.busy_poll_us, logger=log)


if __name__ == "__main__":
    sys.exit(main())
