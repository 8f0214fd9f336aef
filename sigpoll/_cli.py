"""What every ``sigpoll-*`` / ``python -m sigpoll...`` command shares: one style for all of them.

The conventions (docs/commands.md says them to users):

* **Errors** are one line on stderr, ``sigpoll.NAME: error: MESSAGE``, never a traceback for
  anything a user can cause; usage errors (a bad option or value, an argument that cannot
  be used: a missing directory, a file where a socket goes, a closed ``--fd``) exit with
  status 2 (:data:`EXIT_USAGE`), failures of the work itself with 1 (:data:`EXIT_FAILURE`).
* **Signals**: SIGINT, SIGTERM and SIGHUP cancel the command's main task, so its cleanup
  runs, and the command exits 128 + the signal's number (130, 143, 129).  Commands that run
  a program (``console run``, ``guest run``) exit with the program's status otherwise.
* **Messages** go through :mod:`logging` with named loggers (``sigpoll.console``,
  ``sigpoll.ninep``, ``sigpoll.virtio``, ``sigpoll.guest``, ``sigpoll.stress``,
  ``sigpoll.soak``), formatted ``sigpoll.NAME: MESSAGE`` (``error:`` / ``warning:`` before
  the message for those levels).  ``-q/--quiet`` shows only warnings and errors, ``-v``
  adds debug messages; the default is informational (status lines).
* **Unix sockets** are written ``unix:PATH`` wherever a value names where to listen or
  connect (``--listen unix:PATH``, ``--port NAME=unix:PATH``); an option that takes nothing
  but a socket (``--socket``) also takes the bare PATH.  Every listener goes through
  :func:`sigpoll._unixsock.listen_unix`: mode 0600, peers checked, no file and no live
  socket ever taken over.
* **Sizes** take binary suffixes: ``4096``, ``64K``, ``256M``, ``1G`` (also ``KiB``,
  ``MiB``...; case does not matter).  **Durations** are seconds (decimals allowed).
  **Addresses** are ``HOST:PORT`` or ``[IPv6]:PORT``, port 0 to 65535.
* **--help** shows each option's default as ``(default: X)``, added by the formatter.
* **--version** on every command prints ``NAME (sigpoll VERSION)``.
* **Progress**: long work (a soak, a stress run, a boot, a bench) shows one live line on
  stderr when stderr is a terminal (:class:`Progress`), and nothing when it is not.

:func:`run_command` is the one entry every command's main coroutine runs through, on the
sigpoll loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import select
import signal
import stat
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TextIO

from ._poller import _MAX_BUSY_POLL_US

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "Parser",
    "Progress",
    "UsageError",
    "add_busy_poll_option",
    "add_verbosity_options",
    "check_fd",
    "command_name",
    "format_size",
    "host_port",
    "integer",
    "listen_address",
    "parse_size",
    "port_name",
    "real",
    "run_command",
    "setup_logging",
    "signal_status",
    "size",
    "unix_path",
    "unpollable",
    "version_string",
]

EXIT_OK = 0
EXIT_FAILURE = 1  #: the work failed
EXIT_USAGE = 2  #: the command line cannot be used

#: Signals that stop a command: its main task is cancelled and it exits 128 + the number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_status(signum: int) -> int:
    """The exit status of a command stopped by ``signum``: 128 + its number, as shells say."""
    return 128 + int(signum)


class CommandError(Exception):
    """Raised anywhere in a command: printed as one error line, exits with ``status``."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class UsageError(CommandError):
    """A command line that cannot be used (exit status 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


# -- names and versions ----------------------------------------------------------------------


def command_name(module: str) -> str:
    """How the user ran the command whose module is ``module`` (``sigpoll.ninep``): the
    installed script's name (``sigpoll-ninep``) or ``python -m sigpoll.ninep``."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script.startswith("sigpoll-"):
        return script
    return f"python -m {module}"


def version_string(module: str) -> str:
    """What ``--version`` prints."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("sigpoll")
        except PackageNotFoundError:
            number = ""
    except ImportError:  # pragma: no cover
        number = ""
    if not number:
        from . import __version__ as number
    return f"{command_name(module)} (sigpoll {number}, Python {sys.version.split()[0]})"


# -- the parser ------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds ``(default: X)`` to an option's help when it has a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
            or not action.option_strings
            or action.nargs == 0
        ):
            return text
        if getattr(action.type, "__name__", "") == "size" and isinstance(default, int):
            shown = format_size(default)
        elif isinstance(default, float):
            shown = f"{default:g}"
        else:
            shown = str(default)
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with the commands' conventions: one-line errors (status 2), ``--version``,
    defaults in ``--help``, and the logger's name (``sigpoll.ninep``) on every error line.

    ``module`` is the command's module (``sigpoll.ninep``); subcommand parsers made with
    ``add_subparsers()`` share its conventions.
    """

    def __init__(self, module: str = "sigpoll", *args: Any, top: bool = True, **kwargs: Any) -> None:
        self.module = module
        kwargs.setdefault("prog", command_name(module))
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        if top:
            self.add_argument("--version", action="version", version=version_string(self.module),
                              help="show the version and exit")

    def add_subparsers(self, **kwargs: Any) -> Any:
        """Subcommands share this parser's conventions (and not its --version)."""
        kwargs.setdefault("parser_class", Parser)
        action = super().add_subparsers(**kwargs)
        module = self.module
        original = action.add_parser

        def add_parser(name: str, **kw: Any) -> Any:
            kw.setdefault("module", module)
            kw.setdefault("top", False)
            kw.setdefault("formatter_class", _HelpFormatter)
            return original(name, **kw)

        action.add_parser = add_parser  # type: ignore[method-assign]
        return action

    def error(self, message: str) -> NoReturn:
        """One line, the command's name first, exit status 2: no usage block, no traceback."""
        _write_line(sys.stderr, f"{self.module}: error: {message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


def add_verbosity_options(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` (repeatable), read by :func:`setup_logging`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="only warnings and errors on stderr")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="more detail on stderr (debug messages); repeat for asyncio's too")


def add_busy_poll_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--busy-poll-us N``: the loop's adaptive busy-polling ceiling (0, off, by default)."""
    parser.add_argument(
        "--busy-poll-us", type=real(0, _MAX_BUSY_POLL_US, what="a number of microseconds"),
        default=0.0, metavar="N",
        help="before sleeping, poll for events for up to N microseconds (adaptive): "
             "lower latency per request for a spinning CPU; 0 is off")


# -- value types -----------------------------------------------------------------------------


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``minimum`` to ``maximum`` (inclusive)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            value = None
        if value is None or (minimum is not None and value < minimum) or (
                maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {_range('a whole number', minimum, maximum)}, "
                                             f"got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def real(minimum: float | None = None, maximum: float | None = None, *, above: bool = False,
         what: str = "a number") -> Callable[[str], float]:
    """An argparse type: a finite number from ``minimum`` (or above it, with ``above``) to
    ``maximum``.  ``what`` names it in the error (``a number of seconds``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        if ok and minimum is not None:
            ok = value > minimum if above else value >= minimum
        if ok and maximum is not None:
            ok = value <= maximum
        if not ok:
            wanted = _range(what, minimum, maximum, above=above)
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _range(what: str, lo: float | None, hi: float | None, *, above: bool = False) -> str:
    def show(v: float) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if lo is not None and hi is not None:
        return f"{what} {'above' if above else 'from'} {show(lo)} {'up to' if above else 'to'} {show(hi)}"
    if lo is not None:
        return f"{what} {'above' if above else 'of at least'} {show(lo)}"
    if hi is not None:
        return f"{what} of at most {show(hi)}"
    return what


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|(b))?\s*", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``1.5M``, ``2GiB`` -> bytes (binary multiples).  ValueError if not."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"expected a size such as 4096, 64K, 256M or 1G, got {text!r}")
    number, unit = m.group(1), (m.group(2) or "").lower()
    value = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Bytes -> the shortest exact suffixed form (``262144`` -> ``256K``)."""
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix.lower()]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def size(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a size (see :func:`parse_size`) from ``minimum`` to ``maximum``."""

    def parse(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value < minimum or (maximum is not None and value > maximum):
            span = (f"from {format_size(minimum)} to {format_size(maximum)}" if maximum is not None
                    else f"at least {format_size(minimum)}")
            raise argparse.ArgumentTypeError(f"must be a size {span}, got {text!r}")
        return value

    parse.__name__ = "size"
    return parse


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (HOST may be empty: 127.0.0.1) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f"the port must be a number from 0 to 65535, got {port!r} in {text!r}")
    if not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"the port must be from 0 to 65535, got {port} in {text!r}")
    if host.startswith("[") != host.endswith("]"):
        raise argparse.ArgumentTypeError(f"unbalanced brackets in {text!r} (IPv6 is [ADDR]:PORT)")
    host = host[1:-1] if host.startswith("[") else host
    if ":" in host and not text.startswith("["):
        raise argparse.ArgumentTypeError(f"write an IPv6 address in brackets: [ADDR]:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


from ._unixsock import MAX_PATH as MAX_UNIX_PATH  # noqa: E402


def _check_unix_path(path: str, text: str) -> str:
    if not path:
        raise argparse.ArgumentTypeError(f"expected unix:PATH, got {text!r}")
    if "\0" in path:
        raise argparse.ArgumentTypeError("a socket path cannot contain a NUL byte")
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise argparse.ArgumentTypeError(
            f"a unix socket path is at most {MAX_UNIX_PATH} bytes, {path!r} is {len(os.fsencode(path))}")
    return path


def unix_path(text: str) -> str:
    """``unix:PATH`` (or a bare PATH) -> PATH, for options that take only a unix socket."""
    path = text[5:] if text.startswith("unix:") else text
    return _check_unix_path(path, text)


def strict_unix_path(text: str) -> str:
    """``unix:PATH`` only -> PATH."""
    if not text.startswith("unix:"):
        raise argparse.ArgumentTypeError(f"expected unix:PATH, got {text!r}")
    return _check_unix_path(text[5:], text)


def listen_address(text: str) -> tuple[str, Any]:
    """``unix:PATH`` -> ("unix", PATH); ``HOST:PORT`` -> ("tcp", (HOST, PORT))."""
    if text.startswith("unix:"):
        return "unix", strict_unix_path(text)
    try:
        return "tcp", host_port(text)
    except argparse.ArgumentTypeError as exc:
        if ":" not in text:
            raise argparse.ArgumentTypeError(f"expected HOST:PORT or unix:PATH, got {text!r}") from None
        raise exc


def port_name(name: str) -> str:
    """A virtio-console port name as every command accepts it (the guest runtime's rule):
    letters, digits, ``-``, ``_`` and ``.`` (not first), at most 64 characters.  ValueError
    if not."""
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
        raise ValueError(f"port name {name!r}: use letters, digits, '-', '_' or '.'")
    if len(name) > 64:
        raise ValueError(f"port name {name!r} is longer than 64 characters")
    return name


# -- file descriptors ------------------------------------------------------------------------


def unpollable(fd: int) -> str | None:
    """Why epoll refuses ``fd`` (``"a regular file"``, ``"/dev/null"``...), or None if it can
    be watched (a tty, pipe, socket, most character devices)."""
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN)
    except PermissionError:
        return _describe(fd)
    except OSError:
        return None  # closed and the like: reported by whoever uses it
    finally:
        ep.close()
    return None


def _describe(fd: int) -> str:
    try:
        st = os.fstat(fd)
    except OSError:
        return "not open"
    if stat.S_ISREG(st.st_mode):
        return "a regular file"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    with contextlib.suppress(OSError):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith("/"):
            return target
    return "a file epoll cannot watch"


def check_fd(fd: int, *, read: bool = False, write: bool = False, what: str = "") -> None:
    """Raise :class:`UsageError` unless ``fd`` is open (for reading/writing as asked) and
    can be polled.  ``what`` names it in the message (default ``fd N``)."""
    name = what or f"fd {fd}"
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise UsageError(f"{name} is not an open file descriptor") from None
        raise UsageError(f"{name}: {exc.strerror}") from None
    why = unpollable(fd)
    if why is not None:
        raise UsageError(f"{name} is {why}, which cannot be watched for input: "
                         "give a socket, a pipe or a tty")
    access = flags & os.O_ACCMODE
    if read and access == os.O_WRONLY:
        raise UsageError(f"{name} is open for writing only; it must be readable")
    if write and access == os.O_RDONLY:
        raise UsageError(f"{name} is open for reading only; it must be writable")


# -- messages --------------------------------------------------------------------------------


def _write_line(stream: TextIO, line: str) -> None:
    # A terminal may be in raw mode (a console is attached): end lines with CR LF there.
    end = "\r\n" if _isatty(stream) else "\n"
    with contextlib.suppress(OSError, ValueError):
        stream.write(line + end)
        stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR and logging.getLogger("sigpoll").isEnabledFor(
                logging.DEBUG):
            message += "\n" + self.formatException(record.exc_info)
        level = {logging.WARNING: "warning: ", logging.ERROR: "error: ",
                 logging.CRITICAL: "error: ", logging.DEBUG: "debug: "}.get(record.levelno, "")
        return f"{record.name}: {level}{message}"


class _Handler(logging.Handler):
    """Writes records as lines on stderr (CR LF on a terminal), clearing and redrawing an
    active :class:`Progress` line around them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # pragma: no cover - logging's own rule: never raise
            self.handleError(record)
            return
        stream = sys.stderr
        progress = Progress.active
        if progress is not None:
            progress.clear()
        for line in text.splitlines() or [""]:
            _write_line(stream, line)
        if progress is not None:
            progress.redraw()


_handler: _Handler | None = None


class _OthersQuieter(logging.Filter):
    """Informational records only from the command's own loggers; others' from warnings up."""

    def __init__(self) -> None:
        super().__init__()
        self.own = ""
        self.others_level = logging.WARNING

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.own or record.name == self.own or record.name.startswith(self.own + "."):
            return True
        return record.levelno >= self.others_level


def setup_logging(args: argparse.Namespace | None = None, *, own: str | None = None,
                  quiet: bool = False, verbose: int = 0) -> None:
    """Send the ``sigpoll`` loggers' records to stderr in the commands' format, at the
    level ``-q``/``-v`` asked for (from ``args`` when given).

    ``own`` is the command's logger (``sigpoll.soak``): its informational lines show by
    default; the libraries it uses (``sigpoll.ninep``...) say only warnings and errors
    unless ``-v``.  Idempotent.
    """
    global _handler
    if args is not None:
        quiet = bool(getattr(args, "quiet", False))
        verbose = int(getattr(args, "verbose", 0) or 0)
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    if _handler is None:
        _handler = _Handler()
        _handler.addFilter(_OthersQuieter())
        logging.getLogger("sigpoll").addHandler(_handler)
    _handler.setLevel(level)
    for f in _handler.filters:
        if isinstance(f, _OthersQuieter):
            f.own = own or ""
            f.others_level = level if verbose else max(level, logging.WARNING)
    # The logger is only ever opened up (never raised above INFO), so a command run inside
    # another program (a test) does not hide that program's records.
    for name in ("sigpoll", "asyncio") if verbose >= 2 else ("sigpoll",):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level > min(level, logging.INFO):
            logger.setLevel(min(level, logging.INFO))
        if name == "asyncio" and _handler not in logger.handlers:
            logger.addHandler(_handler)


class Progress:
    """One live status line on stderr, redrawn in place, only when stderr is a terminal.

    ``update(text)`` is cheap to call often (it redraws at most a few times a second);
    :meth:`close` (or leaving the ``with`` block) erases the line.  Log lines written while
    a progress line shows are printed above it.
    """

    active: Progress | None = None
    interval = 0.25

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.text = ""
        self._shown = 0.0
        self._drawn = False

    def __enter__(self) -> Progress:
        if self.enabled:
            Progress.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, text: str, *, force: bool = False) -> None:
        """Show ``text`` as the line (throttled unless ``force``)."""
        self.text = text
        now = time.monotonic()
        if self.enabled and (force or now - self._shown >= self.interval):
            self._shown = now
            self.redraw()

    def redraw(self) -> None:
        if self.enabled and self.text:
            width = _columns(self.stream)
            with contextlib.suppress(OSError, ValueError):
                self.stream.write("\r" + self.text[: max(width - 1, 10)] + "\x1b[K")
                self.stream.flush()
            self._drawn = True

    def clear(self) -> None:
        if self.enabled and self._drawn:
            with contextlib.suppress(OSError, ValueError):
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        """Erase the line and stop showing it."""
        self.clear()
        if Progress.active is self:
            Progress.active = None


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


# -- running a command -----------------------------------------------------------------------


class _Stop:
    """Which stop signal arrived (the first), for the exit status."""

    def __init__(self) -> None:
        self.signum: int | None = None


def run_command(main: Coroutine[Any, Any, int], *, busy_poll_us: float = 0,
                signals: Sequence[int] = STOP_SIGNALS,
                logger: str | logging.Logger = "sigpoll") -> int:
    """Run a command's main coroutine on a new sigpoll loop and return its exit status.

    SIGINT, SIGTERM and SIGHUP (``signals``) cancel the main task, so every ``finally`` and
    ``async with`` in it runs; the status is then 128 + the first signal's number, whatever
    the coroutine returns.  A second signal cancels the task again (cleanup that hangs can
    still be cut short).  A :class:`CommandError` becomes one error line and its status.
    The loop is closed afterwards with its async generators and executor, as
    :func:`asyncio.run` does, so no "Event loop is closed" or "Task was destroyed" follows.
    """
    from ._loop import new_event_loop

    log = logging.getLogger(logger) if isinstance(logger, str) else logger
    stop = _Stop()

    async def guarded() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if stop.signum is None:
                stop.signum = signum
            task.cancel()

        installed = []
        for signum in signals:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                loop.add_signal_handler(signum, on_signal, signum)
                installed.append(signum)
        try:
            return await main
        except asyncio.CancelledError:
            if stop.signum is None:
                raise
            return signal_status(stop.signum)
        finally:
            for signum in installed:
                with contextlib.suppress(ValueError, RuntimeError, OSError):
                    loop.remove_signal_handler(signum)

    def factory() -> asyncio.AbstractEventLoop:
        return new_event_loop(busy_poll_us=busy_poll_us)

    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            status = runner.run(guarded())
    except CommandError as exc:
        log.error("%s", exc.message)
        return exc.status
    except KeyboardInterrupt:  # a SIGINT before the handlers were in place or after
        main.close()
        return signal_status(signal.SIGINT)
    if stop.signum is not None:
        return signal_status(stop.signum)
    return status
