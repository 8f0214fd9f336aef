"""``python tests/support/ninep_proc.py serve DIR --listen ...``: the 9P server's command, in a
process of its own, with faults injected for the reliability tests.

``NINEP_FAULTS`` (comma-separated) stands in for a file system that misbehaves:

* ``hang_mkdir``: Tmkdir of a name starting with ``hang`` never returns (a dead NFS
  server, a FUSE daemon that stopped answering);
* ``slow_mkdir``: Tmkdir of a name starting with ``slow`` takes two seconds.

Everything else is the real command (``sigpoll.ninep.__main__.main``).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from sigpoll.ninep import _fs
from sigpoll.ninep.__main__ import main

_faults = set(filter(None, os.environ.get("NINEP_FAULTS", "").split(",")))
_real_mkdir = _fs.Export.mkdir
_never = threading.Event()


def _mkdir(self: _fs.Export, d: _fs.Handle, name: str, *args: object) -> os.stat_result:
    if "hang_mkdir" in _faults and name.startswith("hang"):
        _never.wait()
    if "slow_mkdir" in _faults and name.startswith("slow"):
        time.sleep(2)
    return _real_mkdir(self, d, name, *args)  # type: ignore[arg-type]


_fs.Export.mkdir = _mkdir  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
