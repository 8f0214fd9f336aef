"""The package as a new user meets it: the wheel and the sdist built from this tree, the wheel
installed in a fresh venv, every command run from outside the tree, the sdist's own tests.

Slow (a build and a venv, with packages from the index): one test does it all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["console", "ninep", "virtio", "guest", "stress", "soak"]
# A quick subset of the sdist's own suite: pure codecs, the terminal filter, the commands'
# conventions (which start the installed commands in real terminals) and the public API.
SDIST_TESTS = ["tests/test_xxd.py", "tests/test_termfilter.py", "tests/test_cli.py",
               "tests/test_public_api.py", "tests/test_ninep_codec.py"]


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    return out  # type: ignore[no-any-return]


@pytest.mark.timeout(1200)
def test_wheel_and_sdist_install_and_run_from_outside_the_tree(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="the packaging test needs `build` (the test extra)")
    dist = tmp_path / "dist"
    built = _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")  # built from the sdist: the sdist builds
    (sdist,) = dist.glob("*.tar.gz")

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert any(n.endswith("licenses/LICENSE") for n in names)
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    for command in COMMANDS:
        assert f"sigpoll-{command} = sigpoll.{command}.__main__:main" in entry_points
    assert "License-Expression: MIT" in metadata and "Project-URL: Source" in metadata
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in metadata
    for extra in ("test", "fuzz", "typing", "compare", "dev"):
        assert f"Provides-Extra: {extra}" in metadata

    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
        t.extractall(tmp_path / "src", filter="data")
    for needed in ("LICENSE", "tests/conftest.py", "scripts/test.sh", "fuzz/ninep_decode.py", "csrc/poller.c",
                   "tests/test_cli.py"):
        assert needed in members, needed
    assert not any(m.endswith((".so", ".pyc")) for m in members)
    src = next((tmp_path / "src").iterdir())

    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    assert _run([base, "-m", "venv", str(venv)]).returncode == 0
    py, bindir = venv / "bin" / "python", venv / "bin"
    pip = _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel),
                "pytest", "pytest-timeout", "pexpect", "hypothesis"])
    assert pip.returncode == 0, pip.stderr[-3000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for command in COMMANDS:
        for argv in ([str(bindir / f"sigpoll-{command}")], [str(py), "-m", f"sigpoll.{command}"]):
            shown = argv[0].rsplit("/", 1)[-1] if len(argv) == 1 else f"python -m sigpoll.{command}"
            out = _run([*argv, "--help"], cwd=outside, env=env)
            if command == "guest":  # its name and --version come with the guest branch's use
                assert out.returncode == 0 and out.stdout.startswith("usage: "), out  # of the shared parser
                continue
            assert out.returncode == 0 and out.stdout.startswith(f"usage: {shown}"), (argv, out.stdout, out.stderr)
            out = _run([*argv, "--version"], cwd=outside, env=env)
            assert out.returncode == 0 and out.stdout.startswith(f"{shown} (sigpoll 0."), (argv, out.stdout, out.stderr)

    # Item 8: the installed sigpoll run from inside a source tree (the unpacked sdist,
    # whose sigpoll/ has no built core): one line saying what to do.
    out = _run([str(py), "-m", "sigpoll.stress", "xxd"], cwd=src, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "run from another directory" in out.stderr

    # The sdist's own tests (a quick subset), against the installed wheel, from outside.
    # A short base directory: the tests make unix sockets in their tmp_path, and a path of a socket
    # is at most 107 bytes (this test's own tmp_path is already long).
    with tempfile.TemporaryDirectory(prefix="sp-sdist-") as short:
        tests = _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(src / "pyproject.toml"),
                      "--rootdir", str(src), "--basetemp", short, *[str(src / t) for t in SDIST_TESTS]],
                     cwd=outside, env=env)
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and " failed" not in tests.stdout
