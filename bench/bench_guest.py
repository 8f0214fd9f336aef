"""The guest runtime: time to a ready guest, and throughput seen from inside the guest.

    python bench/bench_guest.py [--boots 5] [--mib 16] [--json]

- ``boot``: wall time from ``python -m sigpoll.guest run -- true`` starting to its exit, and
  from ``Guest.start()`` to the guest's init being ready (median of ``--boots``).
- ``console``: guest-to-host MB/s of ``head -c N /dev/zero | xxd`` over the guest's console
  (UML's own fd console on a sigpoll pty; ``SigioNudger`` keeps UML's side from stalling).

Results go to docs/performance.md by hand, with the date and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--mib", type=int, default=16, help="MiB of zeros through xxd in the guest")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import sigpoll

    cli = cli_round_trip(args.boots)
    factory = getattr(sigpoll, "new_event_loop", asyncio.new_event_loop)
    loop = factory()
    try:
        boots, console_mbps, nbytes = loop.run_until_complete(api_boot_and_console(args.boots, args.mib))
    finally:
        loop.close()
    result = {
        "cli_true_seconds_median": statistics.median(cli),
        "boot_to_ready_seconds_median": statistics.median(boots),
        "console_guest_to_host_mb_per_s": console_mbps,
        "console_bytes": nbytes,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"python -m sigpoll.guest run -- true   median {result['cli_true_seconds_median']:.2f} s over {args.boots}")
    print(f"Guest.start() to ready init            median {result['boot_to_ready_seconds_median']:.2f} s")
    print(f"console, guest to host (xxd of {args.mib} MiB)   {console_mbps:.2f} MB/s ({nbytes:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
