"""The public surface is small and explicit: tested, so it only changes on purpose."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import socket

import pytest

import sigpoll

EXPECTED_TOP_LEVEL = {
    "AttachedPoller",
    "DEFAULT_SIGNAL",
    "EventLoopPolicy",
    "Loop",
    "attach",
    "install",
    "new_event_loop",
    "run",
    "ERROR",
    "HANGUP",
    "READABLE",
    "WRITABLE",
    "Counters",
    "FileLike",
    "Poller",
    "PollerClosedError",
    "SignalMaskWarning",
    "WriteBufferFullError",
    "threads_not_blocking",
}


def _modules() -> list[str]:
    names = ["sigpoll"]
    for info in pkgutil.walk_packages(sigpoll.__path__, "sigpoll."):
        if info.name.endswith("__main__") or info.name == "sigpoll._core":
            continue
        names.append(info.name)
    return names


def test_top_level_names() -> None:
    assert EXPECTED_TOP_LEVEL <= set(sigpoll.__all__)
    for name in sigpoll.__all__:
        assert hasattr(sigpoll, name), name


def test_every_module_declares_all_and_it_resolves() -> None:
    for name in _modules():
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        for public in module.__all__:
            assert hasattr(module, public), f"{name}.__all__ names missing {public}"


def test_public_classes_and_functions_have_docstrings() -> None:
    missing = []
    for name in _modules():
        if name.rsplit(".", 1)[-1].startswith("_"):
            continue  # private modules: their public names are re-exported and checked there
        module = importlib.import_module(name)
        for public in module.__all__:
            obj = getattr(module, public)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
                missing.append(f"{name}.{public}")
    assert not missing, f"no docstring: {missing}"


def test_package_is_typed() -> None:
    assert (pathlib.Path(sigpoll.__file__).parent / "py.typed").exists()


def _entry_points() -> list[pathlib.Path]:
    root = pathlib.Path(sigpoll.__file__).parent
    return sorted(root.rglob("__main__.py"))


def test_command_line_entry_points_run_on_the_sigpoll_loop() -> None:
    # Every ``python -m sigpoll...`` command is a sigpoll program: none may fall back to
    # the stock loop (the stress tool's rivals are built in its writers, not here).
    offenders = []
    for path in _entry_points():
        text = path.read_text()
        for stock in ("asyncio.run(", "asyncio.new_event_loop(", "asyncio.Runner("):
            if stock in text:
                offenders.append(f"{path.relative_to(path.parents[1])}: {stock}")
    assert not offenders, offenders


def test_ninep_serve_runs_on_the_sigpoll_loop(tmp_path: pathlib.Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncio import events

    from sigpoll.ninep.__main__ import main

    seen: list[type] = []
    real = events._set_running_loop

    def record(loop: object) -> None:
        if loop is not None:
            seen.append(type(loop))
        real(loop)  # type: ignore[arg-type]

    monkeypatch.setattr(events, "_set_running_loop", record)
    a, b = socket.socketpair()
    b.close()  # the one connection ends at once, and so does the server
    try:
        assert main(["serve", str(tmp_path), "--fd", str(a.fileno()), "-q"]) == 0
    finally:
        a.close()
    assert seen and all(t is sigpoll.Loop for t in seen), seen
