"""The core poller against real ptys, pipes, sockets and signals."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

import sigpoll
from sigpoll import READABLE, WRITABLE, Poller, PollerClosedError

F_GETSIG = 11
F_GETOWN_EX = 16


def owner_of(fd: int) -> tuple[int, int]:
    """(type, pid) from F_GETOWN_EX."""
    raw = fcntl.fcntl(fd, F_GETOWN_EX, b"\0" * 8)
    return struct.unpack("ii", raw)


def fill(fd: int) -> int:
    """Write until EAGAIN; return the byte count."""
    total = 0
    chunk = b"x" * 4096
    while True:
        try:
            total += os.write(fd, chunk)
        except BlockingIOError:
            return total


def drain(fd: int) -> int:
    total = 0
    while True:
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return total
        if not data:
            return total
        total += len(data)


@pytest.fixture
def poller() -> Iterator[Poller]:
    p = Poller()
    yield p
    p.close()


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    os.set_blocking(master, False)
    yield master, slave
    os.close(master)
    os.close(slave)


# -- registration -------------------------------------------------------------------------


def test_register_sets_async_nonblock_signal_and_thread_owner(poller: Poller, pty_pair) -> None:
    _, slave = pty_pair
    before = fcntl.fcntl(slave, fcntl.F_GETFL)
    assert not before & (os.O_NONBLOCK | fcntl.FASYNC)
    poller.register(slave, READABLE)
    flags = fcntl.fcntl(slave, fcntl.F_GETFL)
    assert flags & os.O_NONBLOCK and flags & fcntl.FASYNC
    assert fcntl.fcntl(slave, F_GETSIG) == poller.signal == sigpoll.DEFAULT_SIGNAL
    kind, tid = owner_of(slave)
    assert (kind, tid) == (0, threading.get_native_id())  # F_OWNER_TID is 0
    assert slave in poller and len(poller) == 1


def test_unregister_restores_flags_signal_and_owner(poller: Poller, pty_pair) -> None:
    _, slave = pty_pair
    before = (fcntl.fcntl(slave, fcntl.F_GETFL), fcntl.fcntl(slave, F_GETSIG), owner_of(slave))
    poller.register(slave, READABLE | WRITABLE, edge=True)
    poller.unregister(slave)
    after = (fcntl.fcntl(slave, fcntl.F_GETFL), fcntl.fcntl(slave, F_GETSIG), owner_of(slave))
    assert after == before
    assert slave not in poller


def test_close_restores_every_fd(pty_pair, pipe) -> None:
    _, slave = pty_pair
    r, _ = pipe
    before = [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in (slave, r)]
    p = Poller()
    p.register(slave, READABLE)
    p.register(r, READABLE)
    p.close()
    p.close()  # idempotent
    assert [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in (slave, r)] == before
    assert p.closed
    with pytest.raises(PollerClosedError):
        p.wait(0)
    with pytest.raises(PollerClosedError):
        p.register(slave, READABLE)


def test_signals_false_leaves_flags_alone(poller: Poller) -> None:
    a, b = socket.socketpair()
    with a, b:
        before = fcntl.fcntl(a.fileno(), fcntl.F_GETFL)
        poller.register(a, READABLE, signals=False)
        assert fcntl.fcntl(a.fileno(), fcntl.F_GETFL) == before
        b.send(b"x")
        assert poller.wait(1) == [(a.fileno(), READABLE)]
        poller.unregister(a)


def test_modify_changes_events_and_keeps_edge(poller: Poller, pipe) -> None:
    r, w = pipe
    poller.register(w, READABLE, edge=True)
    assert poller.wait(0) == []
    poller.modify(w, WRITABLE)
    assert poller.wait(0) == [(w, WRITABLE)]
    assert poller.wait(0) == []  # still edge-triggered
    poller.modify(w, WRITABLE, edge=False)
    assert poller.wait(0) == [(w, WRITABLE)]
    assert poller.wait(0) == [(w, WRITABLE)]  # level now


def test_unknown_fd_modify_unregister(poller: Poller, pipe) -> None:
    r, _ = pipe
    with pytest.raises(KeyError, match=f"fd {r} is not registered"):
        poller.modify(r, READABLE)
    with pytest.raises(KeyError, match=f"fd {r} is not registered"):
        poller.unregister(r)


def test_double_registration_is_refused_and_changes_nothing(poller: Poller, pipe) -> None:
    r, _ = pipe
    poller.register(r, READABLE)
    flags = fcntl.fcntl(r, fcntl.F_GETFL)
    with pytest.raises(FileExistsError, match=f"fd {r} is already registered"):
        poller.register(r, WRITABLE)
    assert fcntl.fcntl(r, fcntl.F_GETFL) == flags


def test_bad_fd_names_the_fd(poller: Poller) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError, match=f"fd {r} is not an open file descriptor") as info:
        poller.register(r, READABLE)
    assert info.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        poller.register(-1, READABLE)
    with pytest.raises(ValueError):
        poller.register(object(), READABLE)  # type: ignore[arg-type]


def test_regular_file_is_refused_without_side_effects(poller: Poller, tmp_path) -> None:
    with open(tmp_path / "f", "w") as f:
        before = fcntl.fcntl(f.fileno(), fcntl.F_GETFL)
        with pytest.raises(OSError, match=rf"fd {f.fileno()} \(regular file\)"):
            poller.register(f, READABLE)
        assert fcntl.fcntl(f.fileno(), fcntl.F_GETFL) == before
        assert f not in poller and len(poller) == 0


def test_fd_without_async_support_is_refused_cleanly(poller: Poller) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        before = fcntl.fcntl(efd, fcntl.F_GETFL)
        with pytest.raises(OSError, match=rf"fd {efd} .*does not support O_ASYNC") as info:
            poller.register(efd, READABLE)
        assert info.value.errno == errno.EOPNOTSUPP
        assert fcntl.fcntl(efd, fcntl.F_GETFL) == before and efd not in poller
        poller.register(efd, READABLE, signals=False)  # epoll alone is fine
        os.eventfd_write(efd, 1)
        assert poller.wait(1) == [(efd, READABLE)]
    finally:
        poller.unregister(efd)
        os.close(efd)


def test_unregister_after_close_of_fd(poller: Poller) -> None:
    r, w = os.pipe()
    poller.register(r, READABLE)
    os.close(r)
    os.close(w)
    poller.unregister(r)  # forgotten quietly
    assert len(poller) == 0


def test_unregister_after_the_number_was_reused_leaves_the_new_file_alone(poller: Poller) -> None:
    r, w = os.pipe()
    poller.register(r, READABLE)
    os.close(r)
    a, b = socket.socketpair()  # likely to take the freed number
    extra = None
    try:
        if a.fileno() != r:
            extra = os.dup2(a.fileno(), r)  # make sure: the old number now names a socket
        os.set_blocking(r, False)  # a wrong restore (the pipe's old flags) would clear this
        before = fcntl.fcntl(r, fcntl.F_GETFL)
        poller.unregister(r)
        assert fcntl.fcntl(r, fcntl.F_GETFL) == before
    finally:
        if extra is not None:
            os.close(extra)
        os.close(w)
        a.close()
        b.close()


def test_invalid_arguments() -> None:
    with pytest.raises(TypeError):
        Poller(mode="naive")  # type: ignore[call-arg]  # UML's scheme lives in sigpoll.stress
    with pytest.raises(ValueError, match="max_events"):
        Poller(max_events=0)
    with pytest.raises(ValueError, match="not a real-time signal"):
        Poller(signal=signal.SIGUSR1)


def test_signal_with_a_handler_is_refused() -> None:
    signo = signal.SIGRTMIN + 3
    old = signal.signal(signo, lambda *a: None)
    try:
        with pytest.raises(ValueError, match="already has a handler"):
            Poller(signal=signo)
    finally:
        signal.signal(signo, old)


# -- readiness ----------------------------------------------------------------------------


def test_level_and_edge(poller: Poller, pipe) -> None:
    r, w = pipe
    r2, w2 = os.pipe()
    try:
        poller.register(r, READABLE)
        poller.register(r2, READABLE, edge=True)
        os.write(w, b"a")
        os.write(w2, b"a")
        assert sorted(poller.wait(1)) == sorted([(r, READABLE), (r2, READABLE)])
        assert poller.wait(0) == [(r, READABLE)]  # level repeats, edge does not
        os.read(r, 1)
        assert poller.wait(0) == []
        os.write(w2, b"b")  # a new edge
        assert poller.wait(1) == [(r2, READABLE)]
    finally:
        poller.unregister(r2)
        os.close(r2)
        os.close(w2)


def test_pty_write_edge_after_eagain(poller: Poller, pty_pair) -> None:
    master, slave = pty_pair
    poller.register(slave, WRITABLE, edge=True)
    assert poller.wait(1) == [(slave, WRITABLE)]
    # The pty's flush work frees room after EAGAIN, which is a real edge: fill until the
    # buffers on both sides are full and no edge follows.
    for _ in range(50):
        fill(slave)
        if poller.wait(0.05) == []:
            break
    else:
        pytest.fail("the pty never stayed full")
    drain(master)
    events = poller.wait(2)
    assert events == [(slave, WRITABLE)]


def test_timeout_and_wake(poller: Poller) -> None:
    t0 = time.monotonic()
    assert poller.wait(0.05) == []
    assert time.monotonic() - t0 >= 0.045
    threading.Timer(0.05, poller.wake).start()
    t0 = time.monotonic()
    assert poller.wait(10) == []
    assert time.monotonic() - t0 < 5
    poller.wake()
    assert poller.wait(None) == []  # a wake before the wait is not lost


def test_python_signal_handlers_run_during_a_long_wait(poller: Poller) -> None:
    """EINTR never surfaces, but Python's handlers still run at once (PEP 475's way), and
    an exception they raise propagates out of wait()."""
    calls: list[float] = []
    old = signal.signal(signal.SIGALRM, lambda *a: calls.append(time.monotonic()))
    try:
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert poller.wait(0.5) == []  # the handler ran; the wait went on to its timeout
        elapsed = time.monotonic() - t0
        assert len(calls) == 1 and calls[0] - t0 < 0.4
        assert 0.45 <= elapsed < 2

        def boom(*a: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGALRM, boom)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            poller.wait(10)
        assert time.monotonic() - t0 < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_close_from_another_thread_raises_distinct_error(pipe) -> None:
    r, _ = pipe
    p = Poller()
    p.register(r, READABLE)
    flags = fcntl.fcntl(r, fcntl.F_GETFL)
    threading.Timer(0.1, p.close).start()
    with pytest.raises(PollerClosedError):
        p.wait(None)
    assert not fcntl.fcntl(r, fcntl.F_GETFL) & fcntl.FASYNC  # restored after the waiter left
    assert flags & fcntl.FASYNC


def test_second_concurrent_waiter_is_refused(poller: Poller) -> None:
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: poller.wait(1))
    t.start()
    time.sleep(0.1)
    try:
        poller.wait(0)
    except RuntimeError as e:
        errors.append(e)
    poller.wake()
    t.join()
    assert errors and "already waiting" in str(errors[0])


def test_waiting_from_another_thread_reaims_signals(pty_pair) -> None:
    master, slave = pty_pair
    p = Poller()
    p.register(slave, READABLE)
    result: list[object] = []

    def run() -> None:
        result.append(p.wait(2))
        result.append(owner_of(slave)[1])
        result.append(threading.get_native_id())

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)
    os.write(master, b"hello\n")
    t.join()
    p.close()
    assert result[0] == [(slave, READABLE)]
    assert result[1] == result[2]


def test_counters_count_signals_and_hints(poller: Poller, pipe) -> None:
    r, w = pipe
    poller.register(r, READABLE)
    for _ in range(5):
        os.write(w, b"x")
        assert poller.wait(1) == [(r, READABLE)]
        os.read(r, 1)
    c = poller.counters
    assert c.signals >= 5 and c.wakeups >= 5
    assert c.hints_confirmed + c.edges_recovered + c.hints_pending >= 5
    assert set(c.as_dict()) == {
        "wakeups", "signals", "hints_confirmed", "hints_pending",
        "edges_recovered", "overflows", "rescans", "polled",
    }


def test_many_events_in_one_batch_respect_max_events(pipe) -> None:
    p = Poller(max_events=4)
    pipes = [os.pipe() for _ in range(10)]
    try:
        for r, w in pipes:
            p.register(r, READABLE)
            os.write(w, b"x")
        seen: set[int] = set()
        for _ in range(10):
            batch = p.wait(0)
            assert len(batch) <= 4
            seen.update(fd for fd, _ in batch)
            for fd, _ in batch:
                os.read(fd, 1)
        assert seen == {r for r, _ in pipes}
    finally:
        p.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_thousand_fds() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    p = Poller(max_events=1024)
    pairs = [socket.socketpair() for _ in range(1000)]
    try:
        for a, _ in pairs:
            p.register(a, READABLE)
        assert len(p) == 1000
        for _, b in pairs[::3]:
            b.send(b"x")
        expected = {a.fileno() for a, _ in pairs[::3]}
        got: set[int] = set()
        deadline = time.monotonic() + 5
        while got != expected and time.monotonic() < deadline:
            got.update(fd for fd, _ in p.wait(0.5))
        assert got == expected
    finally:
        p.close()
        for a, b in pairs:
            a.close()
            b.close()


# -- signals ------------------------------------------------------------------------------


def test_signal_storm_from_another_thread_loses_nothing(pty_pair) -> None:
    """SIGUSR1 (with a Python handler) and stray RT signals hammer the polling thread while
    it moves data through a pty; no wait ever raises EINTR and every byte arrives."""
    master, slave = pty_pair
    handled = 0

    def on_usr1(signum: int, frame: object) -> None:
        nonlocal handled
        handled += 1

    old = signal.signal(signal.SIGUSR1, on_usr1)
    p = Poller()
    p.register(slave, WRITABLE, edge=True)
    target = threading.get_native_id()
    main_ident = threading.main_thread().ident
    assert threading.current_thread().ident == main_ident
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            signal.pthread_kill(main_ident, signal.SIGUSR1)
            try:
                signal.pthread_kill(main_ident, p.signal)  # no fd: must be ignored as a hint
            except BlockingIOError:
                pass  # the RT queue is full: that is part of the storm
            time.sleep(0.0002)

    received = bytearray()

    def reader() -> None:
        while True:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    return
                received.extend(data)
                time.sleep(0.0005)  # slow enough to force EAGAIN
            elif stop.is_set():
                return

    payload = bytes(range(256)) * 8000
    total = len(payload)
    stormer = threading.Thread(target=storm)
    rd = threading.Thread(target=reader)
    # make the slave raw so bytes pass through unchanged
    import tty

    tty.setraw(slave)
    stormer.start()
    rd.start()
    sent = 0
    try:
        while sent < total:
            try:
                sent += os.write(slave, payload[sent : sent + 8192])
            except BlockingIOError:
                p.wait(1)
    finally:
        deadline = time.monotonic() + 10
        while len(received) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        stormer.join()
        rd.join()
        p.close()
        signal.signal(signal.SIGUSR1, old)
    assert handled > 0
    assert bytes(received) == payload
    assert p.counters.signals > 0


OVERFLOW_SCRIPT = textwrap.dedent(
    """
    import os, resource, socket, sys, json
    import sigpoll
    # A tiny pending-signal budget: the 64 fds below each queue an RT signal at once,
    # so the kernel runs out and falls back to a plain SIGIO with no fd.
    resource.setrlimit(resource.RLIMIT_SIGPENDING, (8, 8))
    p = sigpoll.Poller(max_events=256)
    pairs = [socket.socketpair() for _ in range(64)]
    for a, _ in pairs:
        p.register(a, sigpoll.READABLE, edge=True)
    # Drain the registration edges first, so what follows are fresh edges.
    p.wait(0)
    for _, b in pairs:
        b.send(b"x")
    got = set()
    for _ in range(20):
        got.update(fd for fd, _ in p.wait(0.2))
        if len(got) == len(pairs):
            break
    c = p.counters.as_dict()
    print(json.dumps({"got": len(got), "want": len(pairs), **c}))
    """
)


def test_forced_rt_queue_overflow_delivers_every_event() -> None:
    out = subprocess.run(
        [sys.executable, "-c", OVERFLOW_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    import json

    res = json.loads(out.stdout)
    assert res["got"] == res["want"], res
    assert res["overflows"] >= 1 and res["rescans"] >= 1, res


MASK_SCRIPT = textwrap.dedent(
    """
    import signal, threading, time, warnings, sigpoll
    # A blocked mask survives exec, so undo what the parent test process may have passed on.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sigpoll.DEFAULT_SIGNAL, signal.SIGIO})
    ev = threading.Event()
    t = threading.Thread(target=ev.wait)
    t.start()   # started before the poller: it does not block the signals
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p = sigpoll.Poller()
    ev.set(); t.join()
    print(len(w), w[0].category.__name__ if w else "", t.native_id in sigpoll.threads_not_blocking(p.signal))
    """
)


def test_threads_that_do_not_block_the_signal_are_reported() -> None:
    out = subprocess.run(
        [sys.executable, "-c", MASK_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    count, category, _ = out.stdout.split()
    assert count == "1" and category == "SignalMaskWarning"


def test_threads_started_after_the_poller_inherit_the_block(poller: Poller) -> None:
    seen: list[list[int]] = []
    t = threading.Thread(target=lambda: seen.append(sigpoll.threads_not_blocking(poller.signal)))
    t.start()
    t.join()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert poller.signal in mask and signal.SIGIO in mask


# -- fork ---------------------------------------------------------------------------------


def test_fork_then_use_in_child(pipe) -> None:
    r, w = pipe
    p = Poller()
    p.register(r, READABLE)
    pid = os.fork()
    if pid == 0:  # child: its own epoll set, its own signalfd
        code = 1
        try:
            r2, w2 = os.pipe()
            p.register(r2, READABLE)
            os.write(w2, b"c")
            first = p.wait(2)
            os.write(w, b"p")
            second = sorted(p.wait(2))
            if first == [(r2, READABLE)] and second == sorted([(r, READABLE), (r2, READABLE)]):
                code = 0
            p.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's poller is untouched by the child's registrations and close.
    assert p.wait(1) == [(r, READABLE)]
    assert len(p) == 1
    assert fcntl.fcntl(r, fcntl.F_GETFL) & fcntl.FASYNC
    p.close()


# -- UML's scheme, for the reproducer ------------------------------------------------------


def test_the_reproducers_naive_poller_is_umls_scheme(pty_pair) -> None:
    """``python -m sigpoll.stress xxd --mode naive`` plays UML on select.epoll and
    sigtimedwait (sigpoll.stress._writers.NaivePoller): SIGIO, owned by the process,
    edge-triggered, and the fd's settings put back afterwards."""
    from sigpoll.stress._writers import NaivePoller

    master, slave = pty_pair
    before = (fcntl.fcntl(slave, fcntl.F_GETFL), fcntl.fcntl(slave, F_GETSIG), owner_of(slave))
    p = NaivePoller(slave, select.EPOLLOUT)
    try:
        assert fcntl.fcntl(slave, F_GETSIG) == signal.SIGIO
        assert owner_of(slave) == (1, os.getpid())  # F_OWNER_PID: the process, as UML does
        assert fcntl.fcntl(slave, fcntl.F_GETFL) & os.O_ASYNC
        fill(slave)
        drain(master)
        # Whatever it reports, it must never block past its timeout.
        t0 = time.monotonic()
        p.wait(0.5)
        assert time.monotonic() - t0 < 2
        threading.Timer(0.05, p.wake).start()
        assert p.wait(5) == []
    finally:
        p.close()
    assert (fcntl.fcntl(slave, fcntl.F_GETFL), fcntl.fcntl(slave, F_GETSIG), owner_of(slave)) == before


# -- races in the core, played in a fixed order ------------------------------------------
#
# tests/c/stall.c, preloaded into a child interpreter, stops one thread inside a chosen
# system call until the test lets it go, so the other thread's call lands exactly in the
# window the race needs.


@pytest.fixture(scope="module")
def stall_shim(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build tests/c/stall.c")
    out = str(tmp_path_factory.mktemp("shim") / "stall.so")
    src = os.path.join(os.path.dirname(__file__), "c", "stall.c")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", out, src, "-ldl"], check=True)
    return out


def _run_with_shim(shim: str, script: str) -> dict[str, object]:
    import json

    env = dict(os.environ, LD_PRELOAD=shim)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


WAKE_DURING_CLOSE = """
    import ctypes, json, os, threading, sigpoll
    shim = ctypes.CDLL(None)
    def eventfds():
        found = set()
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]":
                    found.add(int(name))
            except OSError:
                pass
        return found
    before = eventfds()
    p = sigpoll.Poller()
    (evfd,) = eventfds() - before
    victim_r, victim_w = os.pipe()   # a file ready to take over the eventfd's number
    reached_r, reached_w = os.pipe()
    go_r, go_w = os.pipe()
    shim.stall_arm(b"write", evfd, reached_w, go_r)
    waker = threading.Thread(target=p.wake)
    waker.start()
    os.read(reached_r, 1)            # the waker has loaded the fd number and is in write()
    closer = threading.Thread(target=p.close)
    closer.start()
    closer.join(1.0)
    closed_first = not closer.is_alive()
    try:
        os.fstat(evfd)               # still open: close() waits for the wake in flight
    except OSError:
        os.dup2(victim_w, evfd)      # closed under the waker: the number now names a pipe
    os.write(go_w, b"g")
    waker.join()
    closer.join()
    os.set_blocking(victim_r, False)
    try:
        stolen = len(os.read(victim_r, 64))
    except BlockingIOError:
        stolen = 0
    print(json.dumps({"closed_first": closed_first, "stolen": stolen}))
"""


def test_a_wake_racing_close_never_writes_into_a_reused_fd_number(stall_shim: str) -> None:
    """wake() reads the eventfd's number without the lock (it must be async-signal-safe);
    close() used to close it at once, so a wake in flight could write 8 bytes into whatever
    file got the number next.  close() now waits for wakes in flight."""
    res = _run_with_shim(stall_shim, WAKE_DURING_CLOSE)
    assert res == {"closed_first": False, "stolen": 0}, res


REBUILD_AFTER_FORK = """
    import ctypes, json, os, threading, sigpoll
    shim = ctypes.CDLL(None)
    p = sigpoll.Poller()
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
    res = {}
    try:
        r, w = os.pipe()
        reached_r, reached_w = os.pipe()
        go_r, go_w = os.pipe()
        shim.stall_arm(b"epoll_create1", -1, reached_w, go_r)
        # Thread A's call is the child's first: it rebuilds the poller's own fds, and stops
        # inside that, in epoll_create1.
        a = threading.Thread(target=p.wait, args=(0,))
        a.start()
        os.read(reached_r, 1)
        outcome = []
        def register():
            try:
                p.register(r, sigpoll.READABLE, signals=False)
                outcome.append("ok")
            except Exception as exc:
                outcome.append(repr(exc))
        b = threading.Thread(target=register)
        b.start()
        b.join(1.0)
        res["registered_during_rebuild"] = not b.is_alive()
        os.write(go_w, b"g")
        a.join()
        b.join()
        res["register"] = outcome[0]
        os.write(w, b"x")
        res["events"] = p.wait(2)
        res["mine"] = r
    finally:
        print(json.dumps(res), flush=True)
        os._exit(0)
"""


def test_a_second_thread_in_a_fresh_child_waits_for_the_rebuild(stall_shim: str) -> None:
    """In a forked child the first call rebuilds the poller's fds.  That ran before the
    lock, so a second thread could use the half-built poller (and both could initialise
    the mutex): now the child's locks are reset by the fork hook and the rebuild holds
    the lock."""
    res = _run_with_shim(stall_shim, REBUILD_AFTER_FORK)
    assert res["registered_during_rebuild"] is False, res
    assert res["register"] == "ok", res
    assert res["events"] == [[res["mine"], READABLE]], res


def test_a_change_of_waiting_thread_counts_its_rescan(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    p = Poller()
    try:
        p.register(r, READABLE)
        p.wait(0)
        assert p.counters.rescans == 0
        t = threading.Thread(target=p.wait, args=(0,))  # a new owner: every fd is rechecked
        t.start()
        t.join()
        assert p.counters.rescans == 1
    finally:
        p.close()


def test_the_core_stub_names_exactly_what_the_header_declares() -> None:
    """sigpoll/_core.pyi types the compiled module by hand: it must not drift from it."""
    import ast

    import sigpoll._core as core

    stub = ast.parse(open(os.path.join(os.path.dirname(sigpoll.__file__), "_core.pyi")).read())
    (lib_class,) = [n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "_Lib"]
    typed = {n.name for n in lib_class.body if isinstance(n, ast.FunctionDef)}
    typed |= {n.target.id for n in lib_class.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    compiled = {name for name in dir(core.lib) if name.lower().startswith("sp_")}
    assert typed == compiled
