#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs them.
#   system packages (Debian), each for the real peers the tests use:
#     xxd               the reference for the stress tool's output check
#     user-mode-linux   a real Linux kernel as the guest (tty, v9fs and virtio_console drivers)
#     kmod              insmod, to load UML's 9p and virtio_console modules in the guest
#     diod              a real 9P2000.L server and its clients (diodls, diodcat)
#     iproute2          `ip`, for the private network namespace a guest's 9P share rides on
#     tmux              a terminal emulator that keeps a screen, so the commands' tests can see
#                       where the cursor ended up (tests/test_cli_terminal.py)
#   Python: the package itself plus the dev extras (pytest, pexpect, hypothesis, uvloop...)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k poller`.
set -euo pipefail
cd "$(dirname "$0")/.."

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

python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
exec python3 -m pytest "$@"
