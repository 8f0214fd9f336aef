"""The public surface is small and explicit: tested, so it only changes on purpose."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

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
    import pathlib

    assert (pathlib.Path(sigpoll.__file__).parent / "py.typed").exists()
