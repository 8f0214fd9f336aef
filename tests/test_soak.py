"""The soak, short: one UML guest, console + 9P + port traffic and a signal storm, nothing lost.

`python -m sigpoll.soak --minutes N` runs it for longer; docs/reliability.md has a 10-minute run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sigpoll import _uml

try:
    _uml.find_kernel()
except _uml.UmlNotFound as exc:  # the soak needs a real guest: Debian's user-mode-linux
    pytestmark = pytest.mark.skip(reason=str(exc))


def test_short_soak_moves_every_stream_and_loses_nothing() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sigpoll.soak", "--minutes", "0.25", "--interval", "2", "--json"],
        capture_output=True, text=True, timeout=110,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and not report["errors"]
    for name, stream in report["streams"].items():
        assert stream["items"] > 0 and stream["bytes"] > 0, name
        assert stream["lost"] == 0 and stream["bad"] == 0 and stream["stalls"] == 0, (name, stream)
    assert report["signals_handled"] > 0
    assert len(report["rss_kib"]) >= 3 and len(report["fds"]) >= 3
    assert "sigpoll.soak: guest up in" in out.stderr


@pytest.mark.parametrize("minutes", ["0", "-1", "soon", "100000"])
def test_bad_minutes_is_a_usage_error_without_a_traceback(minutes: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sigpoll.soak", "--minutes", minutes],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "--minutes" in out.stderr
