# Sourced by scripts/test.sh and scripts/wheel_smoke.sh: which Pythons sigpoll supports and
# where to find each.  Keep SUPPORTED in step with requires-python and the classifiers in
# pyproject.toml.
SUPPORTED_PYTHONS=(3.11 3.12 3.13)

# find_python 3.12 -> prints the path of a working python3.12, or fails saying where it looked.
# Looks in $SIGPOLL_PYTHON_3_12 (if set), pyenv's versions (newest patch release first), then
# python3.12 on PATH.  A missing interpreter is an error, never a silent skip.
find_python() {
    local ver=$1 var="SIGPOLL_PYTHON_${1//./_}" candidate root
    local -a candidates=()
    [ -n "${!var:-}" ] && candidates+=("${!var}")
    root=$( (command -v pyenv >/dev/null && pyenv root) 2>/dev/null || echo "$HOME/.pyenv")
    while IFS= read -r candidate; do
        candidates+=("$candidate")
    done < <(ls -d "$root"/versions/"$ver".*/bin/python"$ver" 2>/dev/null | sort -rV)
    command -v "python$ver" >/dev/null 2>&1 && candidates+=("$(command -v "python$ver")")
    for candidate in "${candidates[@]}"; do
        if [ -x "$candidate" ] && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info[:2] != tuple(map(int, sys.argv[1].split("."))))' "$ver" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: no Python $ver found (looked at \$$var, $root/versions/$ver.*, python$ver on PATH);" \
         "sigpoll supports ${SUPPORTED_PYTHONS[*]} and CI runs every one: install it (pyenv install $ver)" \
         "or point $var at it" >&2
    return 1
}
