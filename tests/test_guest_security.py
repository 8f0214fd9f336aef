"""A hostile guest gains nothing on the host (issue 13 item 1), against a real UML guest.

Two attackers, one guest boot each:

- the guest's root, inside the guest: it remounts its root read-write, mounts host paths with
  hostfs, writes, reads, chmods and mknods through them;
- the guest kernel itself, which may run any code as the UML process: played by a process
  with UML's credentials in UML's namespaces (``nsenter`` into them, UML's uid and gid,
  ``no_new_privs``), which tries the same and more (remount, a user namespace of its own,
  device nodes, host processes, the host's network).

Both must leave no file on the host outside the guest's own scratch tmpfs, read nothing that
only root may read, and the UML process must hold no privilege.

The attacks are aimed so that even a broken runtime (an unconfined UML, as root) damages
nothing: they only create marker files (looked for and removed afterwards), change a file and
mount on a directory the test made itself, and the guest kernel's part is only played once
UML is seen to run unprivileged.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

import sigpoll
from sigpoll.guest import Guest, _uml

try:
    _uml.find_kernel()
except _uml.UmlNotFound as exc:  # pragma: no cover - on these machines UML is installed
    pytestmark = pytest.mark.skip(reason=str(exc))

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Host directories a guest must not write (root-owned, world-writable and the checkout).
TARGETS = ["/etc", "/root", "/tmp", "/var/tmp", CHECKOUT]


def _run_loop(coro: Any, timeout: float = 180) -> Any:
    loop = sigpoll.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


@pytest.fixture
def marker() -> Iterator[str]:
    """A file name the attacks create; afterwards none may exist (any found is removed)."""
    name = f"sigpoll-attack-{secrets.token_hex(4)}"
    yield name
    for target in TARGETS:
        for path in (os.path.join(target, name), os.path.join(target, f"{name}-kmsg")):
            if os.path.lexists(path):
                os.unlink(path)


@pytest.fixture
def victim() -> Iterator[str]:
    """A root-owned file, mode 0755, in a root-owned directory: what the guest tries to chmod,
    chown and mount over (the directory)."""
    where = tempfile.mkdtemp(prefix="sigpoll-victim-", dir="/var/tmp")
    os.chmod(where, 0o755)
    path = os.path.join(where, "tool")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["umount", "-l", where], capture_output=True)  # only if an attack mounted
    shutil.rmtree(where, ignore_errors=True)


def _found(name: str, extra: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    return [os.path.join(d, name) for d in [*TARGETS, *extra] if os.path.lexists(os.path.join(d, name))]


# Each attempt is `try WHAT COMMAND...`: it prints "GAINED WHAT" if COMMAND succeeds, else
# "denied WHAT: its error".  Output goes to a file the attacker may write (in the jail even
# /dev/null is a device node it may not open), and the script ends with the number of tries,
# so an attempt that never ran cannot pass for one that was refused.
_TRY = r"""
tries=0
try() { what=$1; shift; tries=$((tries + 1))
  if "$@" >"$Q" 2>&1; then echo "GAINED $what"; else echo "denied $what: $(tail -c 120 "$Q" | tr '\n' ' ')"; fi; }
"""


def _guest_attack(name: str, private_dir: str, victim: str) -> str:
    """The guest root's attempts, inside the guest."""
    targets = " ".join(shlex.quote(t) for t in [*TARGETS, private_dir])
    return f"""
N={name}; Q=/tmp/quiet
{_TRY}
try "remount rw + write /etc" sh -c "mount -o remount,rw / && touch /etc/$N"
mkdir -p /tmp/h && mount -t hostfs none /tmp/h -o / || echo "NO-HOSTFS"
for d in {targets}; do try "write through hostfs of /: $d" touch "/tmp/h$d/$N"; done
i=0
for d in {targets}; do
  i=$((i + 1)); mkdir -p /tmp/m$i
  try "write through hostfs of $d" sh -c "mount -t hostfs none /tmp/m$i -o '$d' && touch /tmp/m$i/$N"
done
try "read /etc/shadow" head -c 1 /tmp/h/etc/shadow
try "list /root" ls /tmp/h/root
try "chmod u+s {victim}" chmod 4755 /tmp/h{victim}
try "chown {victim}" chown 1:1 /tmp/h{victim}
for d in /tmp /run/uml; do
  try "mknod in $d and read the node" sh -c "mknod /tmp/h$d/$N-kmsg c 1 11 && head -c 16 /tmp/h$d/$N-kmsg"
done
touch /tmp/h/run/uml/$N && echo "SCRATCH-WRITABLE"
echo "TRIES $tries"
"""


# A user namespace of its own (which any user may make) holds every capability over a new
# mount namespace: the read-only flags it copied must stay locked.  (Without id maps: the
# jail's /proc is read-only, so `unshare -r` cannot write them, but no map is needed for this.)
_USERNS_REMOUNT = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
    sys.exit("unshare: errno %d" % ctypes.get_errno())
if libc.mount(None, b"/", None, 32 | 4096, None) != 0:  # MS_REMOUNT | MS_BIND: clears ro
    sys.exit("remount: errno %d" % ctypes.get_errno())
open(sys.argv[1], "w").close()
"""


def _kernel_attack(name: str, host_pid: int, victim: str) -> str:
    """The guest kernel's attempts, as a process of the UML process's kind."""
    targets = " ".join(shlex.quote(t) for t in [*TARGETS, "/run/sigpoll"])
    return f"""
N={name}; Q=/run/uml/$N-quiet
USERNS_REMOUNT={shlex.quote(_USERNS_REMOUNT)}
{_TRY}
for d in {targets}; do try "write $d" touch "$d/$N"; done
try "read /etc/shadow" head -c 1 /etc/shadow
try "list /root" ls /root
try "remount rw" mount -o remount,rw /
try "mount" mount -t tmpfs none {os.path.dirname(victim)}
try "remount rw in a user namespace" unshare -Urm sh -c "mount -o remount,rw / && touch /etc/$N"
try "rw bind in a user namespace (no id maps)" python3 -c "$USERNS_REMOUNT" /tmp/$N
try "read /dev/kmsg" head -c 1 /dev/kmsg
try "write /dev/null (a host device node)" sh -c ": > /dev/null"
try "mknod" mknod /run/uml/$N-kmsg c 1 11
try "chmod {victim}" chmod 4755 {victim}
try "see host process {host_pid}" test -e /proc/{host_pid}
try "a host network interface" sh -c "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | grep -vx -e lo -e tap0"
yes 2>&- | head -c 419430400 > /run/uml/fill 2>&-
s=$(stat -c %s /run/uml/fill); rm -f /run/uml/fill
try "400M in its scratch (it stopped at $s bytes)" test "$s" -ge 419430400
touch /run/uml/$N && echo "SCRATCH-WRITABLE"
echo "TRIES $tries"
"""


def _all_denied(output: str) -> None:
    """Every attempt ran and was refused."""
    assert "GAINED" not in output, output
    tries = [int(line.split()[1]) for line in output.splitlines() if line.startswith("TRIES ")]
    denied = [line for line in output.splitlines() if line.startswith("denied ")]
    assert tries and len(denied) == tries[0], output
    assert "not found" not in output, output


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _mounts(pid: int) -> list[tuple[str, str, str, set[str]]]:
    """(mount point, fs type, source, options) of each mount process ``pid`` sees."""
    found = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields, extra = head.split(), tail.split()
            found.append((fields[4], extra[0], extra[1], set(fields[5].split(","))))
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="the jail of a root-started guest (the case that mattered) needs root")
@pytest.mark.timeout(300)
def test_a_hostile_guest_gains_nothing_on_the_host(marker: str, victim: str, tmp_path: Any) -> None:
    export = tmp_path / "export"
    export.mkdir()
    before = os.stat(victim)

    async def main() -> tuple[str, str, dict[str, str], list[Any], dict[str, str], str]:
        async with Guest(shares=[f"{export}:x"], ports=["p"]) as g:
            assert g.pid is not None and g.tmpdir is not None and g.confined
            inside = await g.run(_guest_attack(marker, g.tmpdir, victim), timeout=120)
            _all_denied(inside.output.decode(errors="replace"))
            status = _status(g.pid)
            mounts = _mounts(g.pid)
            namespaces = {ns: os.readlink(f"/proc/{g.pid}/ns/{ns}") for ns in ("mnt", "pid", "net", "ipc", "user")}
            uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
            # Never play a hostile kernel with root's rights on this machine.
            assert uid != "0", "UML runs as root: the guest kernel would be host root"
            # The guest kernel's own rights: a process with them, where it is.
            kernel = await asyncio.to_thread(
                subprocess.run,
                ["nsenter", "-t", str(g.pid), "-m", "-n", "-i", "-p", "-S", uid, "-G", gid,
                 "setpriv", "--no-new-privs", "sh", "-c", _kernel_attack(marker, os.getpid(), victim)],
                capture_output=True, text=True, timeout=60,
            )
            # The share still works from inside the jail (the tap is the guest's uid's).
            share = await g.run("echo through-9p > /mnt/x/f && cat /mnt/x/f")
            assert (share.status, share.output) == (0, b"through-9p\n")
            # Another guest at the same time runs as a user of its own.
            async with Guest() as other:
                assert other.pid is not None
                assert _status(other.pid)["Uid"].split()[0] != uid
        return inside.output.decode(errors="replace"), kernel.stdout + kernel.stderr, status, mounts, namespaces, uid

    inside, kernel, status, mounts, namespaces, uid = _run_loop(main())

    assert "NO-HOSTFS" not in inside and "SCRATCH-WRITABLE" in inside, inside  # hostfs worked
    assert "SCRATCH-WRITABLE" in kernel, kernel  # the attacker ran where it could write
    _all_denied(kernel)
    assert not _found(marker), "the guest wrote host files"
    after = os.stat(victim)
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)

    # The UML process holds nothing: a fresh uid/gid, no groups, no capabilities at all.
    assert int(uid) >= _uml.GUEST_ID_BASE, status["Uid"]
    assert len(set(status["Uid"].split())) == 1 and len(set(status["Gid"].split())) == 1
    assert status["Groups"].strip() == ""
    assert status["NoNewPrivs"].strip() == "1"
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    # ... in namespaces of its own (a root guest needs no user namespace) ...
    for ns in ("mnt", "pid", "net", "ipc"):
        assert namespaces[ns] != os.readlink(f"/proc/self/ns/{ns}"), ns
    # ... where every mount is read-only, nosuid and nodev but the jail's own few.
    writable = {point for point, *_, options in mounts if "rw" in options}
    assert writable <= {"/run", "/dev/pts", "/dev/ptmx", "/dev/net/tun"}, writable
    with_devices = {point for point, *_, options in mounts if "nodev" not in options}
    assert with_devices <= {"/dev/pts", "/dev/ptmx", "/dev/net/tun"}, with_devices
    assert all("nosuid" in options for *_, options in mounts), mounts


@pytest.mark.skipif(os.geteuid() != 0, reason="a share over the private network needs root")
@pytest.mark.timeout(150)
def test_a_guest_user_cannot_speak_to_the_share_server_itself(tmp_path: Any) -> None:
    # The share's server sits on the guest's network: a guest user's own 9P client could attach
    # claiming uid 0.  Only the guest kernel's mount, from a privileged port, is served.
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_text("shared\n")

    async def main() -> tuple[bytes, bytes, bytes]:
        async with Guest(shares=[f"{export}:x"]) as g:
            client = g.copy_in(os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "raw9p.py"))
            user = await g.run(f"cp {client} /tmp/raw9p.py && chmod 644 /tmp/raw9p.py && "
                               "setpriv --reuid=1000 --regid=1000 --clear-groups python3 /tmp/raw9p.py attach")
            root = await g.run(f"python3 {client} --privileged-port attach")
            mount = await g.run("cat /mnt/x/f")
        return user.output, root.output, mount.output

    user, root, mount = _run_loop(main())
    assert mount == b"shared\n"  # the kernel's own mount (privport) is served
    assert root.startswith(b"ATTACHED"), root  # (and so is the guest's root, as it may mount)
    assert user.startswith(b"REFUSED"), user


_SYSTEM_PYTHON = "/usr/bin/python3"


def _system_python_runs_sigpoll() -> bool:
    if not os.path.exists(_SYSTEM_PYTHON):
        return False
    done = subprocess.run([_SYSTEM_PYTHON, "-c", "import _cffi_backend"], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
@pytest.mark.skipif(not _system_python_runs_sigpoll(), reason="no system python3 with cffi for another user")
@pytest.mark.skipif(_uml.probe_jail("userns") is not None, reason="no unprivileged user namespaces here")
@pytest.mark.timeout(200)
def test_a_guest_of_an_unprivileged_user_cannot_write_that_users_files(marker: str) -> None:
    # `nobody` may write /tmp on the host; its guest (jailed in a user namespace) may not.
    if not all(os.access(p, os.R_OK | os.X_OK) for p in (CHECKOUT, os.path.join(CHECKOUT, "sigpoll"))):
        pytest.skip("the checkout is not readable by other users")
    script = (f"N={marker}; mkdir -p /tmp/h && mount -t hostfs none /tmp/h -o / && "
              "touch /tmp/h/tmp/$N 2>/dev/null && echo GAINED-tmp; "
              "mount -o remount,rw / 2>/dev/null; touch /tmp/h/tmp/$N 2>/dev/null && echo GAINED-remount; "
              "head -c 1 /tmp/h/etc/shadow >/dev/null 2>&1 && echo GAINED-shadow; "
              "touch /tmp/h/run/uml/ok && echo SCRATCH-WRITABLE")
    # nobody's HOME (/nonexistent) is not writable: UML must not need ~/.uml (issue 17 item 10).
    done = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env", "HOME=/nonexistent",
         f"PYTHONPATH={CHECKOUT}", _SYSTEM_PYTHON, "-m", "sigpoll.guest", "run", "--", "sh", "-c", script],
        capture_output=True, text=True, timeout=150, cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert "jailed" in done.stderr and "warning" not in done.stderr.lower(), done.stderr
    assert "SCRATCH-WRITABLE" in done.stdout and "GAINED" not in done.stdout, done.stdout
    assert not _found(marker)


def test_the_trusted_mode_says_so() -> None:
    # --rw is the one way to give the guest the invoking user's rights, and it warns.
    done = subprocess.run([sys.executable, "-m", "sigpoll.guest", "run", "--rw", "--", "true"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "trusts the guest" in done.stderr and "unconfined" in done.stderr


def test_without_namespaces_the_guest_runs_unconfined_and_says_so(monkeypatch: Any, caplog: Any) -> None:
    # Where no (user) namespaces may be made, UML runs as the invoking user, and a warning
    # says what the guest can then do.  (This machine allows them: the probe is faked.)
    monkeypatch.setattr(_uml, "jail_namespaces", lambda: "none")

    async def main() -> tuple[bool | None, int]:
        async with Guest() as g:
            confined = g.confined
            assert g.pid is not None
            return confined, int(_status(g.pid)["Uid"].split()[0])

    with caplog.at_level("WARNING", logger="sigpoll.guest"):
        confined, uid = _run_loop(main())
    assert confined is False and uid == os.geteuid()
    assert "cannot be jailed" in caplog.text and "unconfined" in caplog.text
