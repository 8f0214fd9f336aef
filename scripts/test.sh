#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs them.
#   system packages: xxd (the reference for the stress tool's output check)
#   Python: the package itself plus the dev extras (pytest, pexpect, hypothesis, uvloop...)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k poller`.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v xxd >/dev/null 2>&1 || need_apt+=(xxd)
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
