"""CPython's own asyncio tests, run against sigpoll's loop.

Nothing is copied: the test classes are imported from the installed interpreter's
``test.test_asyncio`` package and bound to sigpoll the way CPython binds its own loops.

* The generic loop tests (``test_events.UnixEventLoopTestsMixin`` + ``SubprocessTestsMixin``,
  ``test_sock_lowlevel.BaseSockTestsMixin``, ``test_sendfile.SendfileTestsBase``) get a
  ``create_event_loop`` that returns ``sigpoll.new_event_loop()``, exactly like CPython's
  ``EPollEventLoopTests`` classes return ``SelectorEventLoop(EpollSelector())``.
* The policy-driven modules (test_locks, test_queues, test_streams, ...) create their loops
  through ``asyncio.new_event_loop()``/``asyncio.run()``/``IsolatedAsyncioTestCase``.  Each of
  their TestCase classes is subclassed here with sigpoll's EventLoopPolicy installed around
  every test, and a final check proves sigpoll loops were really handed out.

Every test runs under a per-test timeout (pytest-timeout), so a hang is a failure.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
import unittest
import warnings
from types import ModuleType
from typing import Any, ClassVar

import pytest

from sigpoll._loop import EventLoopPolicy, Loop, new_event_loop

__all__: list[str] = []  # test module: nothing to import from it

pytestmark = pytest.mark.timeout(60)

if sys.platform != "linux":  # pragma: no cover
    pytest.skip("sigpoll is Linux-only", allow_module_level=True)


def _import(name: str) -> ModuleType:
    # Some distributions ship Python without its test package; skip rather than fail.
    try:
        return importlib.import_module(f"test.test_asyncio.{name}")
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"CPython's test.test_asyncio is not installed: {exc}", allow_module_level=True)
        raise


test_utils = _import("utils")
test_events = _import("test_events")
test_sock_lowlevel = _import("test_sock_lowlevel")
test_sendfile = _import("test_sendfile")
test_buffered_proto = _import("test_buffered_proto")
test_sslproto = _import("test_sslproto")
test_server = _import("test_server")


# -- the generic loop tests, bound like CPython's EPollEventLoopTests ----------------------


class SigpollEventLoopTests(
    test_events.UnixEventLoopTestsMixin,
    test_events.SubprocessTestsMixin,
    test_utils.TestCase,
):
    def create_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()


class SigpollSockLowlevelTests(test_sock_lowlevel.BaseSockTestsMixin, test_utils.TestCase):
    def create_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()


class SigpollSendfileTests(test_sendfile.SendfileTestsBase, test_utils.TestCase):
    def create_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()


# Functional tests CPython binds to its selector loop through ``new_loop``: the selector
# variants are subclassed so their selector-only extra tests run too.


class SigpollBufferedProtocolTests(test_buffered_proto.BufferedProtocolSelectorTests):
    def new_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()


class SigpollStartTLSTests(test_sslproto.SelectorStartTLSTests):
    def new_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()


class SigpollStartServerTests(test_server.SelectorStartServerTests):
    def new_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()


# -- the policy-driven modules ----------------------------------------------------------

#: Modules whose tests get their loops from the event loop policy (every supported version).
POLICY_MODULES = (
    "test_locks",
    "test_queues",
    "test_streams",
    "test_subprocess",
    "test_taskgroups",
    "test_timeouts",
    "test_waitfor",
    "test_tasks",
    "test_futures2",
    "test_context",
    "test_threads",
    "test_ssl",
    "test_sslproto",
)

#: Policy-driven modules that only some versions have, bound where the running one does:
#: test_eager_task_factory (3.12+), test_staggered (3.13+; earlier versions test it with
#: a fake loop), and test_server, whose IsolatedAsyncioTestCase classes (3.12+) check the
#: Server.close()/wait_closed() semantics that changed in 3.12 and 3.13.
OPTIONAL_POLICY_MODULES = ("test_eager_task_factory", "test_staggered", "test_server")

#: Every policy-driven module the running interpreter's test_asyncio has.
BOUND_MODULES = POLICY_MODULES + tuple(
    name for name in OPTIONAL_POLICY_MODULES
    if importlib.util.find_spec(f"test.test_asyncio.{name}") is not None
)

#: Classes bound above with sigpoll's loop directly; not bound a second time.
_BOUND_DIRECTLY = {test_server.SelectorStartServerTests}

#: How many sigpoll loops each module's tests created (checked at the end).
LOOPS_CREATED: dict[str, int] = {name: 0 for name in BOUND_MODULES}


class _CountingPolicy(EventLoopPolicy):
    """sigpoll's policy, counting the loops it hands out per module."""

    def __init__(self, module: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # policies are (3.12+)
            super().__init__()
        self._module = module

    def _loop_factory(self) -> Loop:  # type: ignore[override]
        LOOPS_CREATED[self._module] += 1
        return super()._loop_factory()


class _UnderSigpollPolicy:
    """Mixin: run each test with sigpoll's policy installed, then restore the default."""

    _sigpoll_module: ClassVar[str]

    def run(self, result: Any = None) -> Any:
        policy = _CountingPolicy(self._sigpoll_module)
        asyncio.set_event_loop_policy(policy)
        # CPython runs these tests after others have called set_event_loop(None) on the
        # policy (test_utils.TestCase does in every tearDown), and some depend on it:
        # test_create_subprocess_with_pidfd expects get_event_loop() to raise rather than
        # warn and make a loop, which a policy nobody has set a loop on does.
        policy.set_event_loop(None)
        try:
            return super().run(result)  # type: ignore[misc]
        finally:
            asyncio.set_event_loop_policy(None)


def _bind_policy_module(name: str) -> None:
    module = _import(name)
    for attr, obj in list(vars(module).items()):
        if not (
            isinstance(obj, type)
            and issubclass(obj, unittest.TestCase)
            and obj.__module__ == module.__name__
            and obj not in _BOUND_DIRECTLY
            # Skipped here whatever the loop (Windows-only classes): nothing to bind, and a
            # module with only those must not count as run.
            and not getattr(obj, "__unittest_skip__", False)
        ):
            continue
        bound_name = f"{name}__{attr}"
        bound = type(
            bound_name,
            (_UnderSigpollPolicy, obj),
            {"__module__": __name__, "__qualname__": bound_name, "_sigpoll_module": name},
        )
        globals()[bound_name] = bound


for _name in BOUND_MODULES:
    _bind_policy_module(_name)
del _name


def test_policy_modules_used_sigpoll_loops(request: pytest.FixtureRequest) -> None:
    """Every policy module that ran must have been handed sigpoll loops, not asyncio's."""
    ran = {
        item.cls._sigpoll_module
        for item in request.session.items
        if item.cls is not None and issubclass(item.cls, _UnderSigpollPolicy)
    }
    missing = sorted(name for name in ran if LOOPS_CREATED[name] == 0)
    assert not missing, f"these modules never created a sigpoll loop: {missing}"
