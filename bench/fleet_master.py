"""
salt-master with its file server wrapped: every file-server request a minion
makes (serve_file, file_hash, file_list, ...) is appended as one JSON line
(cmd, path, minion id, time) to $BENCH_FS_LOG, then served as usual.

Used by fleet.py as ``python fleet_master.py -c <config dir>``; the master's
worker processes are forked (Salt sets the fork start method), so they inherit
the wrapper.
"""

import json
import os
import sys
import time

import salt.fileserver
import salt.scripts

LOG = os.environ["BENCH_FS_LOG"]
WRAPPED = {
    "serve_file": "_serve_file",
    "file_hash": "_file_hash",
    "file_hash_and_stat": "_file_hash_and_stat",
    "file_list": "_file_list",
    "file_list_emptydirs": "_file_list_emptydirs",
    "dir_list": "_dir_list",
    "symlink_list": "_symlink_list",
    "_find_file": "_file_find",
}


def _record(cmd, load):
    load = load if isinstance(load, dict) else {}
    line = json.dumps({"cmd": cmd, "path": load.get("path", load.get("prefix")), "loc": load.get("loc"),
                       "id": load.get("id"), "t": time.time()})
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _wrap(method, cmd):
    original = getattr(salt.fileserver.Fileserver, method)

    def wrapper(self, load, *args, **kwargs):
        _record(cmd, load)
        return original(self, load, *args, **kwargs)

    wrapper.__name__ = original.__name__
    setattr(salt.fileserver.Fileserver, method, wrapper)


for _method, _cmd in WRAPPED.items():
    _wrap(_method, _cmd)

if __name__ == "__main__":
    sys.argv = ["salt-master", *sys.argv[1:]]
    salt.scripts.salt_master()
