"""The fuzz harnesses of fuzz/ in the test suite: seed replay, short atheris runs, properties.

* Every seed under ``fuzz/corpus/<target>/`` (regression seeds for fixed bugs included) is
  replayed through its harness's ``one_input``: the harness's own oracle must hold.
* Each harness runs a short coverage-guided atheris session in a subprocess, with
  libFuzzer's ``-rss_limit_mb`` and ``-timeout`` so unbounded memory or a hang fails the
  test, not just a crash.  Longer runs: docs/fuzzing.md.
* Hypothesis drives the codecs with structured strategies (valid messages of every type
  round-trip; mutated ones decode or are refused with the codec's own error) and the
  harnesses with random programs (hostile chains, memory layouts, message sequences).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigpoll.ninep import _codec as c
from sigpoll.virtio import _vhost_user as vu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
TARGETS = ["ninep_decode", "ninep_server", "ninep_session", "vhost_user", "virtqueue"]
# Short atheris runs: (runs, -timeout seconds per input).  The server target does real
# file system work per input, so it gets fewer.
RUNS = {"ninep_decode": 4000, "ninep_server": 300, "ninep_session": 4000, "vhost_user": 1000,
        "virtqueue": 3000}


def _load(target: str) -> ModuleType:
    name = f"sigpoll_fuzz_{target}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(FUZZ, f"{target}.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def harness() -> Iterator[Any]:
    loaded: list[ModuleType] = []

    def get(target: str) -> ModuleType:
        mod = _load(target)
        loaded.append(mod)
        return mod

    yield get
    for mod in set(loaded):
        shutdown = getattr(mod, "shutdown", None)
        if shutdown is not None:  # loops, a 9P server and scratch trees live across inputs
            shutdown()


def _seeds(target: str) -> list[str]:
    d = os.path.join(FUZZ, "corpus", target)
    return sorted(os.path.join(d, f) for f in os.listdir(d))


def test_corpus_is_small_and_complete() -> None:
    total = 0
    for target in TARGETS:
        seeds = _seeds(target)
        assert seeds, f"no seeds for {target}"
        total += sum(os.path.getsize(p) for p in seeds)
    assert total < 1 << 20


@pytest.mark.parametrize("target", TARGETS)
def test_replay_corpus(harness: Any, target: str) -> None:
    mod = harness(target)
    for path in _seeds(target):
        with open(path, "rb") as f:
            data = f.read()
        try:
            mod.one_input(data)
        except BaseException as exc:
            raise AssertionError(f"seed {os.path.relpath(path, ROOT)} fails: {exc!r}") from exc


def _have_atheris() -> bool:
    return importlib.util.find_spec("atheris") is not None


@pytest.mark.skipif(not _have_atheris(), reason="atheris is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize("target", TARGETS)
def test_short_atheris_run(tmp_path: Any, target: str) -> None:
    work = tmp_path / "corpus"
    work.mkdir()
    cmd = [sys.executable, os.path.join(FUZZ, f"{target}.py"), str(work),
           os.path.join(FUZZ, "corpus", target), f"-runs={RUNS[target]}",
           "-max_total_time=20", "-rss_limit_mb=1024", "-timeout=30", "-max_len=4096",
           f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env, cwd=tmp_path)
    tail = "\n".join(proc.stderr.splitlines()[-40:])
    assert proc.returncode == 0, f"{target} fuzzer failed (rc {proc.returncode}):\n{tail}"
    assert "stat::number_of_executed_units" in proc.stderr, tail


# --------------------------------------------------------------------------- 9P properties

_S = st.text(st.characters(codec="utf-8"), max_size=12) | st.binary(max_size=12).map(
    lambda b: b.decode("utf-8", "surrogateescape"))
_KIND = {
    "u8": st.integers(0, 0xFF), "u16": st.integers(0, 0xFFFF), "u32": st.integers(0, 0xFFFFFFFF),
    "u64": st.integers(0, (1 << 64) - 1), "s": _S, "data": st.binary(max_size=64),
    "qid": st.builds(c.Qid, st.integers(0, 0xFF), st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1)),
}
_KIND["wnames"] = st.lists(_S, max_size=c.MAXWELEM)
_KIND["wqids"] = st.lists(_KIND["qid"], max_size=c.MAXWELEM)


@st.composite
def messages(draw: st.DrawFn) -> c.Message:
    cls = c.MESSAGE_CLASSES[draw(st.sampled_from(sorted(c.MESSAGE_CLASSES)))]
    values = [draw(_KIND[k.rstrip("?")]) for k in cls.KINDS]
    return cls(*values, tag=draw(st.integers(0, 0xFFFF)))


@settings(max_examples=300, deadline=None)
@given(messages())
def test_random_valid_9p_messages_round_trip(msg: c.Message) -> None:
    wire = c.encode(msg)
    assert c.decode(wire) == msg
    assert c.encode(c.decode(wire)) == wire


@settings(max_examples=300, deadline=None)
@given(messages(), st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 64))
def test_mutated_9p_frames_decode_or_are_refused(msg: c.Message, flips: list[tuple[int, int]], cut: int) -> None:
    check = _load("ninep_decode").check_frame
    wire = bytearray(c.encode(msg))
    for at, value in flips:
        wire[at % len(wire)] = value
    check(bytes(wire))  # decodes and round-trips, or raises the codec's error only
    check(bytes(wire[:max(0, len(wire) - cut)]))


# --------------------------------------------------------------------------- vhost-user properties

_U32 = st.integers(0, 0xFFFFFFFF)
_U64 = st.integers(0, (1 << 64) - 1)


@st.composite
def mem_tables(draw: st.DrawFn) -> list[vu.MemoryRegion]:
    n = draw(st.integers(1, vu.MAX_MEM_REGIONS))
    out, at = [], draw(st.integers(0, 1 << 40))
    for _ in range(n):
        size = draw(st.integers(1, 1 << 30))
        out.append(vu.MemoryRegion(at, size, draw(st.integers(0, (1 << 63))), draw(st.integers(0, 1 << 40))))
        at += size + draw(st.integers(0, 1 << 20))
    return draw(st.permutations(out))


@settings(max_examples=200, deadline=None)
@given(mem_tables(), st.integers(0, 8 - 1), st.builds(vu.VringAddr, _U32, _U32, _U64, _U64, _U64, _U64),
       st.integers(0, 256).flatmap(lambda off: st.tuples(st.just(off), st.binary(max_size=256 - off))))
def test_random_valid_vhost_payloads_round_trip(regions: list[vu.MemoryRegion], pad: int, addr: vu.VringAddr,
                                                 cfg: tuple[int, bytes]) -> None:
    table = vu.encode_mem_table(regions)
    assert vu.decode_mem_table(table, len(regions)) == regions
    if len(regions) + pad <= vu.MAX_MEM_REGIONS:  # QEMU-style padding to a fixed array
        assert vu.decode_mem_table(table + bytes(32 * pad), len(regions)) == regions
    assert vu.decode_vring_addr(vu.encode_vring_addr(addr)) == addr
    payload = vu.ConfigPayload(cfg[0], len(cfg[1]), 0, cfg[1])
    assert vu.decode_config(vu.encode_config(payload)) == payload


_DECODERS = [
    lambda p, n: vu.decode_mem_table(p, n),
    lambda p, n: vu.decode_vring_addr(p),
    lambda p, n: vu.decode_vring_state(p),
    lambda p, n: vu.decode_vring_file(p),
    lambda p, n: vu.decode_config(p),
    lambda p, n: vu.decode_u64(p),
    lambda p, n: vu.decode_header(p[:12].ljust(12, b"\0")),
]


@settings(max_examples=300, deadline=None)
@given(mem_tables(), st.binary(max_size=400), st.integers(0, 10),
       st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4))
def test_mutated_vhost_payloads_decode_or_are_refused(regions: list[vu.MemoryRegion], junk: bytes, nfds: int,
                                                      flips: list[tuple[int, int]]) -> None:
    for base in (vu.encode_mem_table(regions), junk):
        p = bytearray(base)
        for at, value in flips:
            if p:
                p[at % len(p)] = value
        for decode in _DECODERS:
            try:
                decode(bytes(p), nfds)
            except vu.ProtocolError as exc:
                assert str(exc)


# --------------------------------------------------------------------------- harness programs

# Random programs for the structured harnesses: hostile chains and memory layouts for the
# ring walker, message sequences for the live vhost-user backend.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=8, max_size=600))
def test_random_rings_and_chains(data: bytes) -> None:
    _load("virtqueue").one_input(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_vhost_user_programs(harness: Any, data: bytes) -> None:
    harness("vhost_user").one_input(b"\0\0" + data)  # no memory image: straight to messages


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_9p_server_programs(harness: Any, data: bytes) -> None:
    harness("ninep_server").one_input(b"\1" + data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_9p_session_programs(data: bytes) -> None:
    _load("ninep_session").one_input(data)


def test_ninep_server_harness_reads_lose_nothing(harness: Any) -> None:
    """Issue 19 item 3: the harness once saw a server "hung" with nothing pending because
    its reads (wait_for around sock_recv) dropped bytes on Python 3.12+ whenever the
    timeout and the data arrived together.  Its Reader, under the same race, loses none."""
    import asyncio
    import socket

    mod = harness("ninep_server")

    async def body() -> int:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        reader = mod.Reader(a)

        async def write() -> None:
            for i in range(3000):
                await asyncio.sleep(0.0005 * (i % 7))
                b.send(b"x")

        writer = asyncio.ensure_future(write())
        got = 0
        async with asyncio.timeout(30):
            while got < 3000:
                chunk = await reader.read(0.0015)  # times that race the writer's
                if chunk:
                    got += len(chunk)
        await writer
        reader.close()
        a.close()
        b.close()
        return got

    assert asyncio.run(body()) == 3000
