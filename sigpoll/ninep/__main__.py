"""``python -m sigpoll.ninep serve DIR [options]``: export a directory over 9P2000.L.

Exactly one transport: ``--listen HOST:PORT`` (TCP), ``--unix PATH`` or ``--fd R[,W]``
(one connection on inherited descriptors, as the kernel's trans=fd uses).  One log line
per connection on stderr; SIGINT/SIGTERM end it cleanly with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import signal
import sys
from collections.abc import Callable

from .._cli import add_busy_poll_option
from .._loop import run
from ._runas import drop_to as _drop_to
from ._runas import resolve_user
from ._server import DEFAULT_MSIZE, MIN_MSIZE, Limits, NinepServer

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, status 2, no usage dump and no traceback.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _fds(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected R or R,W, got {text!r}")
    r = int(parts[0])
    w = int(parts[1]) if len(parts) == 2 else r
    return r, w


def _msize(text: str) -> int:
    if not text.isdigit() or int(text) < MIN_MSIZE or int(text) > 16 * 1024 * 1024:
        raise argparse.ArgumentTypeError(f"msize must be {MIN_MSIZE}..16777216, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sigpoll.ninep", description="9P2000.L file server")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    s = sub.add_parser("serve", help="export a directory")
    s.add_argument("dir", help="directory to export")
    t = s.add_mutually_exclusive_group(required=True)
    t.add_argument("--listen", type=_hostport, metavar="HOST:PORT", help="TCP address")
    t.add_argument("--unix", metavar="PATH", help="unix socket path")
    t.add_argument("--fd", type=_fds, metavar="R[,W]", help="serve one connection on fds")
    s.add_argument("--read-only", action="store_true", help="refuse every change (EROFS)")
    s.add_argument("--msize", type=_msize, default=DEFAULT_MSIZE, help="largest message")
    s.add_argument("--security-model", choices=("mapped", "passthrough"), default="mapped",
                   help="mapped (default): clients' owners, modes and device nodes are kept "
                        "in an xattr of plain host files; passthrough: they are the host's "
                        "(no devices, no set-id bits either way; see docs/ninep.md)")
    s.add_argument("--squash-uid", type=int, metavar="UID",
                   help="new files belong to UID on the host (and its --squash-gid); "
                        "existing files are never re-owned")
    s.add_argument("--squash-gid", type=int, metavar="GID")
    s.add_argument("--user", metavar="USER",
                   help="once the export is open and the listener bound, run as USER "
                        "(name or uid; needs root)")
    s.add_argument("--workers", type=_positive, default=8,
                   help="file system threads")
    d = Limits()
    s.add_argument("--max-fids", type=_positive, default=d.max_fids,
                   metavar="N", help=f"fids per connection, EMFILE past it ({d.max_fids})")
    s.add_argument("--max-inflight", type=_positive,
                   default=d.max_inflight, metavar="N",
                   help="requests waiting for threads per connection; past it the "
                        f"connection is not read ({d.max_inflight})")
    s.add_argument("--max-connections", type=_positive,
                   default=d.max_connections, metavar="N",
                   help=f"connections at once; more are closed ({d.max_connections})")
    s.add_argument("--max-queued-output", type=_positive,
                   default=d.max_queued_output, metavar="BYTES",
                   help="reply bytes queued for a client that does not read; past it "
                        f"the connection is not read ({d.max_queued_output})")
    s.add_argument("--no-inline", dest="inline", action="store_false",
                   help="every file system call in a thread (for exports on file "
                        "systems that may hang)")
    add_busy_poll_option(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no per-connection log")
    return p


def _stopper(stop: asyncio.Future[None]) -> Callable[[], None]:
    def fire() -> None:
        if not stop.done():
            stop.set_result(None)

    return fire


async def _serve(args: argparse.Namespace, user: pwd.struct_passwd | None = None) -> None:
    limits = Limits(max_fids=args.max_fids, max_inflight=args.max_inflight,
                    max_connections=args.max_connections,
                    max_queued_output=args.max_queued_output)
    server = NinepServer(args.dir, read_only=args.read_only, msize=args.msize,
                         squash_uid=args.squash_uid, squash_gid=args.squash_gid,
                         workers=args.workers, limits=limits, inline=args.inline,
                         security_model=args.security_model)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stopper(stop))
    log = logging.getLogger("sigpoll.ninep")
    try:
        if args.listen:
            srv = await server.start_tcp(*args.listen)
            if user is not None:
                _drop_to(user)
            host, port = srv.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
            log.info("ninep: serving %s on %s:%d", args.dir, host, port)
            await stop
        elif args.unix:
            await server.start_unix(args.unix)
            if user is not None:
                _drop_to(user)
            log.info("ninep: serving %s on %s", args.dir, args.unix)
            await stop
        else:
            if user is not None:
                _drop_to(user)
            job = asyncio.ensure_future(server.serve_fds(*args.fd))
            await asyncio.wait([job, stop], return_when=asyncio.FIRST_COMPLETED)
            job.cancel()
    finally:
        await server.close()
        if args.unix:
            try:
                os.unlink(args.unix)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not os.path.isdir(args.dir):
        sys.stderr.write(f"python -m sigpoll.ninep: error: not a directory: {args.dir}\n")
        return 2
    try:
        user = None if args.user is None else resolve_user(args.user, args.squash_uid,
                                                            args.squash_gid)
    except ValueError as exc:
        sys.stderr.write(f"python -m sigpoll.ninep: error: {exc}\n")
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        run(_serve(args, user), busy_poll_us=args.busy_poll_us)
    except OSError as exc:
        sys.stderr.write(f"python -m sigpoll.ninep: error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
