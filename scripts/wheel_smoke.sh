#!/usr/bin/env bash
# Build sigpoll's wheel once and prove that the one file works on every supported Python:
# install it into a fresh venv of each, then (outside the source tree, so the wheel is what
# gets imported) import it, run `python -m sigpoll.stress xxd --seconds 2`, and make a
# round trip through sigpoll's loop and a pty device.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pythons.sh

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
interpreters=()
for ver in "${SUPPORTED_PYTHONS[@]}"; do
    interpreters+=("$(find_python "$ver")")
done

"${interpreters[0]}" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" . \
    2> >(grep -v "^WARNING: Location" >&2)
wheels=("$work"/dist/sigpoll-*.whl)
[ ${#wheels[@]} = 1 ] || { echo "error: expected one wheel, got: ${wheels[*]}" >&2; exit 1; }
wheel=${wheels[0]}
case "$(basename "$wheel")" in
    *-cp311-abi3-*) ;;
    *) echo "error: $(basename "$wheel") is not tagged cp311-abi3" >&2; exit 1 ;;
esac
echo "wheel: $(basename "$wheel")"

for python in "${interpreters[@]}"; do
    ver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    venv="$work/venv-$ver"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel" \
        2> >(grep -v "^WARNING: Location" >&2)
    (
        cd "$work"
        "$venv/bin/python" -W error::DeprecationWarning - <<'PY'
import asyncio, os, pathlib, socket, sys, tty
import sigpoll
from sigpoll import _core

site = pathlib.Path(sys.prefix).resolve()
core = pathlib.Path(_core.__file__).resolve()
assert site in core.parents, f"imported {core}, not the installed wheel"
assert core.name == "_core.abi3.so", core.name

async def main() -> bytes:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, sigpoll.Loop)
    master, slave = os.openpty()
    tty.setraw(slave)
    got = loop.create_future()
    loop.add_device_reader(master, lambda: got.done() or got.set_result(os.read(master, 100)))
    os.write(slave, b"round trip")
    data = await asyncio.wait_for(got, 10)
    loop.remove_device_reader(master)
    os.close(master)
    os.close(slave)
    # And a stream round trip over a socket (an ordinary fd in the same poller).
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    peer_reader, peer_writer = await asyncio.open_connection(sock=b)
    writer.write(data)
    echoed = await peer_reader.readexactly(len(data))
    for w in (writer, peer_writer):
        w.close()
        await w.wait_closed()
    return echoed

assert sigpoll.run(main()) == b"round trip"
print(f"  python {sys.version.split()[0]}: import, pty and socket round trips on the loop ok ({core.name})")
PY
        "$venv/bin/python" -W error::DeprecationWarning -m sigpoll.stress xxd --seconds 2 >"$work/stress-$ver.out"
        echo "  python $ver: stress xxd --seconds 2 ok ($(grep -c . "$work/stress-$ver.out") lines of report)"
    )
done
echo "one wheel, ${#interpreters[@]} Pythons: ok"
