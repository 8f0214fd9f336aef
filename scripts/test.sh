#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs them on every
# supported Python (scripts/pythons.sh: 3.11, 3.12, 3.13), one after another.
#   system packages (Debian), each for the real peers the tests use:
#     xxd               the reference for the stress tool's output check
#     user-mode-linux   a real Linux kernel as the guest (tty, v9fs and virtio_console drivers)
#     kmod              insmod, to load UML's 9p and virtio_console modules in the guest
#     diod              a real 9P2000.L server and its clients (diodls, diodcat)
#     iproute2          `ip`, for the private network namespace a guest's 9P share rides on
#     tmux              a terminal emulator that keeps a screen, so the commands' tests can see
#                       where the cursor ended up (tests/test_cli_terminal.py)
#   Python: one venv per version (in $SIGPOLL_VENVS, default .venvs/) with the package
#   installed editable plus the dev extras (pytest, pexpect, hypothesis, uvloop...).
# Steps: the one-wheel check (scripts/wheel_smoke.sh: the abi3 wheel built once, installed and
# smoke-tested on each version), then the suite on each version: in full on the oldest and
# the newest, and on the ones between the tests that depend most on the version (the loop,
# CPython's own test_asyncio of that version, asyncio internals, devices, 9P); three full
# suites took 62 minutes on a shared 2-core machine, too close to CI's 90.
# SIGPOLL_FULL_ON_EVERY_PYTHON=1 runs the full suite on every version.  A supported Python that
# cannot be found is an error, not a skip.  Extra arguments replace the default selection and
# go to every pytest run, e.g. `bash scripts/test.sh -k poller`; SIGPOLL_TEST_PYTHONS="3.12"
# limits the versions (for a local run, not for CI).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pythons.sh

need_apt=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
have xxd || need_apt+=(xxd)
have linux.uml || need_apt+=(user-mode-linux)
have insmod || need_apt+=(kmod)
have diod || need_apt+=(diod)
have ip || need_apt+=(iproute2)
have tmux || need_apt+=(tmux)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "note: cannot install ${need_apt[*]} (not root or no apt-get); tests that need them will skip" >&2
    fi
fi

read -r -a versions <<<"${SIGPOLL_TEST_PYTHONS:-${SUPPORTED_PYTHONS[*]}}"
venvs=${SIGPOLL_VENVS:-$PWD/.venvs}
declare -A python_of
for ver in "${versions[@]}"; do
    python_of[$ver]=$(find_python "$ver")  # fails the run if missing
done

# Install every version first: the editable installs share the tree's one _core.abi3.so.
for ver in "${versions[@]}"; do
    if [ ! -x "$venvs/$ver/bin/python" ]; then
        "${python_of[$ver]}" -m venv "$venvs/$ver"
    fi
    "$venvs/$ver/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]' \
        2> >(grep -v "^WARNING: Location" >&2)
done

start=$SECONDS
status=0
summary=()
if [ -z "${SIGPOLL_TEST_PYTHONS:-}" ]; then
    step=$SECONDS
    if bash scripts/wheel_smoke.sh; then
        summary+=("wheel: one abi3 wheel on ${versions[*]}: ok ($((SECONDS - step)) s)")
    else
        summary+=("wheel: FAILED"); status=1
    fi
fi
# What the versions between the oldest and the newest run, unless arguments say otherwise.
middle_tests=(tests/test_loop.py tests/test_busy_poll.py tests/test_faults.py
              tests/test_asyncio_internals.py tests/test_devices.py tests/test_public_api.py
              tests/test_cpython_asyncio.py tests/test_ninep_*.py)
last=$((${#versions[@]} - 1))
for i in "${!versions[@]}"; do
    ver=${versions[$i]}
    step=$SECONDS
    args=("$@")
    what="full suite"
    (($#)) && what="pytest $*"
    if ((! $#)) && ((i != 0 && i != last)) && [ -z "${SIGPOLL_FULL_ON_EVERY_PYTHON:-}" ]; then
        args=("${middle_tests[@]}")
        what="loop, CPython test_asyncio, devices and 9P tests"
    fi
    echo "=== Python $ver: $("$venvs/$ver/bin/python" -c 'import sys; print(sys.version.split()[0])'), $what"
    log=$(mktemp)
    if "$venvs/$ver/bin/python" -m pytest "${args[@]}" 2>&1 | tee "$log"; then rc=0; else rc=$?; fi
    ((rc == 0)) || status=1
    summary+=("Python $ver ($what): $(grep -E '^=* ?[0-9]+ (passed|failed)|^[0-9]+ (passed|failed)|no tests ran' "$log" | tail -1 | tr -d '=' | sed 's/^ *//') ($((SECONDS - step)) s)")
    rm -f "$log"
done
echo
echo "=== summary ($((SECONDS - start)) s in all)"
printf '  %s\n' "${summary[@]}"
exit $status
