"""The guest runtime: time to a ready guest, and throughput seen from inside the guest.

    python bench/bench_guest.py [--boots 5] [--mib 16] [--json]

- ``boot``: wall time from ``python -m sigpoll.guest run -- true`` starting to its exit, and
  from ``Guest.start()`` to the guest's init being ready (median of ``--boots``).
- ``console``: guest-to-host MB/s of ``head -c N /dev/zero | xxd`` over the guest's console
  (UML's own fd console on a sigpoll pty; ``SigioNudger`` keeps UML's side from stalling).
- ``virtio port``: ``--port-mib`` MiB of random bytes each way through a virtio-console port
  (``Guest(ports=...)``): guest to host is ``cat FILE > /dev/virtio-ports/NAME`` timed on the
  host to EOF, host to guest is ``head -c N /dev/virtio-ports/NAME > /dev/null`` timed from
  the first write to the command's end.
- ``9p``: from inside the guest, ``dd`` writes ``--ninep-mib`` MiB into a share and reads
  it back (``cache=none``, 512 KiB msize), over the private network (``share_via="net"``,
  v9fs trans=tcp) and over a virtio port (``share_via="virtio"``, trans=fd through the
  guest-side relay).  Timed in the guest around each ``dd``.

Results go to docs/performance.md by hand, with the date and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

__all__ = ["main"]


def cli_round_trip(boots: int) -> list[float]:
    times = []
    for _ in range(boots):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sigpoll.guest", "run", "-q", "--", "true"], check=True)
        times.append(time.perf_counter() - t0)
    return times


async def api_boot_and_console(boots: int, mib: int) -> tuple[list[float], float, int]:
    from sigpoll.guest import Guest

    boot_times = []
    for _ in range(boots):
        async with Guest() as g:
            assert g.boot_seconds is not None
            boot_times.append(g.boot_seconds)
    count = 0

    def take(chunk: bytes) -> None:
        nonlocal count
        count += len(chunk)

    async with Guest() as g:
        t0 = time.perf_counter()
        result = await g.run(f"head -c {mib * 1024 * 1024} /dev/zero | xxd", output=take)
        elapsed = time.perf_counter() - t0
    assert result.status == 0
    return boot_times, count / elapsed / 1e6, count


async def virtio_port(mib: int) -> tuple[float, float]:
    """(guest->host, host->guest) bytes/s through one virtio-console port."""
    from sigpoll.guest import Guest

    n = mib * 1024 * 1024
    async with Guest(ports=["bench"]) as g:
        assert g.tmpdir is not None
        with open(os.path.join(g.tmpdir, "up.bin"), "wb") as f:
            f.write(os.urandom(n))
        await g.run("cat /run/sigpoll/up.bin > /dev/null")  # warm the guest's page cache
        reader, writer = await g.open_port("bench")
        t0 = time.perf_counter()
        cat = asyncio.ensure_future(g.run("cat /run/sigpoll/up.bin > /dev/virtio-ports/bench"))
        got = 0
        while chunk := await reader.read(1 << 20):
            got += len(chunk)
        up = got / (time.perf_counter() - t0)
        assert (await cat).status == 0 and got == n
        writer.close()
        reader, writer = await g.open_port("bench")
        block = os.urandom(1 << 20)
        t0 = time.perf_counter()
        head = asyncio.ensure_future(g.run(f"head -c {n} /dev/virtio-ports/bench > /dev/null"))
        for _ in range(mib):
            writer.write(block)
            await writer.drain()
        assert (await head).status == 0
        down = n / (time.perf_counter() - t0)
        writer.close()
    return up, down


async def ninep_share(mib: int, via: str) -> tuple[float, float] | None:
    """(write, read) bytes/s of dd in the guest on a 9P share, or None if unavailable."""
    import tempfile

    from sigpoll.guest import BootError, Guest

    with tempfile.TemporaryDirectory(prefix="bench-guest-9p-") as export:
        try:
            async with Guest(shares=[f"{export}:x"], share_via=via) as g:
                script = (
                    "t0=$(date +%s%N); dd if=/dev/zero of=/mnt/x/f bs=512k count={c} 2>/dev/null; t1=$(date +%s%N); "
                    "dd if=/mnt/x/f of=/dev/null bs=512k 2>/dev/null; t2=$(date +%s%N); "
                    "echo $((t1 - t0)) $((t2 - t1))"
                ).format(c=mib * 2)
                result = await g.run(script, timeout=600)
        except BootError as exc:
            print(f"9p over {via}: skipped ({exc})", file=sys.stderr)
            return None
        assert result.status == 0, result.output
        w_ns, r_ns = (int(x) for x in result.output.split())
        assert os.path.getsize(os.path.join(export, "f")) == mib * 1024 * 1024
    n = mib * 1024 * 1024
    return n / (w_ns / 1e9), n / (r_ns / 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--mib", type=int, default=16, help="MiB of zeros through xxd in the guest")
    parser.add_argument("--port-mib", type=int, default=64, help="MiB each way through a virtio port")
    parser.add_argument("--ninep-mib", type=int, default=64, help="MiB written and read back on a 9P share")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import sigpoll

    cli = cli_round_trip(args.boots)
    loop = sigpoll.new_event_loop()
    try:
        boots, console_mbps, nbytes = loop.run_until_complete(api_boot_and_console(args.boots, args.mib))
        port_up, port_down = loop.run_until_complete(virtio_port(args.port_mib))
        ninep = {via: loop.run_until_complete(ninep_share(args.ninep_mib, via)) for via in ("net", "virtio")}
    finally:
        loop.close()
    result = {
        "cli_true_seconds_median": statistics.median(cli),
        "boot_to_ready_seconds_median": statistics.median(boots),
        "console_guest_to_host_mb_per_s": console_mbps,
        "console_bytes": nbytes,
        "virtio_port_guest_to_host_mb_per_s": port_up / 1e6,
        "virtio_port_host_to_guest_mb_per_s": port_down / 1e6,
    }
    for via, rates in ninep.items():
        if rates is not None:
            result[f"ninep_{via}_write_mb_per_s"] = rates[0] / 1e6
            result[f"ninep_{via}_read_mb_per_s"] = rates[1] / 1e6
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"python -m sigpoll.guest run -- true   median {result['cli_true_seconds_median']:.2f} s over {args.boots}")
    print(f"Guest.start() to ready init            median {result['boot_to_ready_seconds_median']:.2f} s")
    print(f"console, guest to host (xxd of {args.mib} MiB)   {console_mbps:.2f} MB/s ({nbytes:,} bytes)")
    print(f"virtio port, {args.port_mib} MiB each way          guest->host {port_up / 1e6:.1f} MB/s, "
          f"host->guest {port_down / 1e6:.1f} MB/s")
    for via, rates in ninep.items():
        if rates is not None:
            print(f"9p share over {via:<7} dd of {args.ninep_mib} MiB      write {rates[0] / 1e6:.1f} MB/s, "
                  f"read {rates[1] / 1e6:.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
