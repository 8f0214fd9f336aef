"""The Linux kernel's own 9P client (v9fs in User-Mode Linux) against sigpoll's server.

The transport is UML networking to a tap device in a private network namespace, not
trans=fd on a serial line: UML's serial input path drops its fd from epoll when the guest's
tty throttles and never re-adds it (see sigpoll.guest._netns and docs/ninep.md).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from sigpoll.guest import _uml
from sigpoll.guest import Guest

try:
    _uml.find_kernel()
except _uml.UmlNotFound as exc:  # pragma: no cover - on these machines UML is installed
    pytestmark = pytest.mark.skip(reason=str(exc))
if os.geteuid() != 0:  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="a private network namespace for the guest needs root")

WORKLOAD = r"""
set -e
cd /mnt/x
echo created > new.txt
head -c 1000000 /dev/urandom > data.bin
md5sum data.bin > data.md5
md5sum -c data.md5 >/dev/null
mv new.txt renamed.txt
test "$(cat renamed.txt)" = created
mkdir -p dir/sub
i=0; while [ $i -lt 1000 ]; do : > dir/sub/f$i; i=$((i+1)); done
ls dir/sub | wc -l > count.txt
ln -s renamed.txt link
test "$(readlink link)" = renamed.txt
test "$(cat link)" = created
chmod 640 renamed.txt
stat -c %a renamed.txt > mode.txt
head -c 5000 /dev/urandom > trunc.bin
truncate -s 1234 trunc.bin
stat -c %s trunc.bin > size.txt
rm data.md5
head -c 67108864 /dev/urandom > big.bin
md5sum big.bin | cut -d' ' -f1 > big.md5
echo WORKLOAD-OK
"""


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.timeout(600)
def test_v9fs_in_a_real_guest_runs_a_full_workload(run: Any, tmp_path: Any) -> None:
    export = tmp_path / "export"
    export.mkdir()

    async def main() -> tuple[int, bytes, bytes]:
        async with Guest(shares=[f"{export}:x"]) as g:
            result = await g.run(WORKLOAD, timeout=500)
            # Read the 64 MiB file back through v9fs as well.
            back = await g.run("md5sum /mnt/x/big.bin | cut -d' ' -f1", timeout=300)
        return result.status, result.output, back.output

    status, output, read_back = run(main(), timeout=580)
    assert status == 0 and output.endswith(b"WORKLOAD-OK\n"), output[-2000:]
    assert (export / "renamed.txt").read_text() == "created\n"
    assert not (export / "new.txt").exists() and not (export / "data.md5").exists()
    assert (export / "count.txt").read_text() == "1000\n"
    assert len(os.listdir(export / "dir" / "sub")) == 1000
    # The share's (mapped) security model keeps the guest's symlink as a file holding its
    # target, so nothing on the host ever follows it (docs/ninep.md, "Security models").
    assert (export / "link").read_text() == "renamed.txt"
    assert (export / "mode.txt").read_text() == "640\n"
    assert oct((export / "renamed.txt").stat().st_mode & 0o777) == "0o640"
    assert (export / "size.txt").read_text() == "1234\n" and (export / "trunc.bin").stat().st_size == 1234
    assert (export / "big.bin").stat().st_size == 64 * 1024 * 1024
    host_md5 = _md5(str(export / "big.bin"))
    assert (export / "big.md5").read_text().strip() == host_md5
    assert read_back.strip().decode() == host_md5
