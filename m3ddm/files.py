"""Files written atomically, under temporary names that say who is writing them.

Every output is written to a temporary name beside its target and renamed when complete. The name
records its writer, so that a later run can tell a dead writer's debris from a live sibling's file
(several torchrun ranks, possibly on several machines, may write into one folder at once):

    .<stem>.m3ddm-<host>-<pidns>-<pid>-<random>.<kind><suffix>     e.g. .clip_16-9.m3ddm-node7_1a2b3c4d-4026531836-4242-9f3e01aa.part.mp4

host: the host name (letters and digits only, at most 24) plus 8 hex of its sha1, so that two hosts never
share a tag; pidns: the inode of the writer's PID namespace (two containers on one host with the same host
name see different PIDs); pid: the writer's process id.

`remove_own_temps()` deletes what this process created and did not rename, whatever the code path (the command
lines call it on the way out, so a signal landing between a file's creation and the code that would clean it
up leaves nothing). `remove_stale_temps(folder)` deletes only the temporary files whose writer is verifiably dead: same host
tag, same PID namespace, another pid, and no process with that pid. Files of other hosts or namespaces,
of live processes (a reused pid counts as live) and files with any other name are never touched.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Callable

_TEMP_RE = re.compile(r"^\..*\.m3ddm-(?P<host>[A-Za-z0-9]+_[0-9a-f]{8})-(?P<ns>\d+)-(?P<pid>\d+)-[0-9a-f]{8}"
                      r"\.[a-z]+(\.[A-Za-z0-9]+)?$")


_OWN = set()        # temporary names this process handed out (renamed ones are simply gone)


def host_tag() -> str:
    host = socket.gethostname()
    return re.sub(r"[^A-Za-z0-9]", "", host)[:24] + "_" + hashlib.sha1(host.encode()).hexdigest()[:8]


def pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:          # no /proc (macOS): one namespace per host
        return "0"


def temp_path(target, kind: str = "tmp", suffix: str = None) -> Path:
    """A fresh temporary name beside `target` (not created). kind: a lower-case word (part, mux, tmp, ...);
    suffix: the file suffix to end with (default: the target's, so writers that go by it still work)."""
    target = Path(target)
    suffix = target.suffix if suffix is None else suffix
    owner = f"{host_tag()}-{pid_namespace()}-{os.getpid()}-{secrets.token_hex(4)}"
    path = target.with_name(f".{target.stem}.m3ddm-{owner}.{kind}{suffix}")
    _OWN.add(path)      # before the file exists: no moment where it exists unrecorded
    return path


def create_temp(target, kind: str = "tmp", suffix: str = None) -> Path:
    """Like temp_path, and the file is created (empty, exclusively) so that the name is reserved."""
    while True:
        path = temp_path(target, kind, suffix)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # EPERM: it exists, under another user
        return True
    return True


def stale_temps(folder) -> list:
    """The temporary files in `folder` whose writer is verifiably dead (see the module doc), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    me, ns = host_tag(), pid_namespace()
    stale = []
    for path in folder.iterdir():
        m = _TEMP_RE.match(path.name)
        if not m or m["host"] != me or m["ns"] != ns:
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not _alive(pid) and path.is_file():
            stale.append(path)
    return sorted(stale)


def remove_stale_temps(folder) -> list:
    """Delete the dead writers' temporary files in `folder`; returns the paths removed."""
    removed = []
    for path in stale_temps(folder):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:    # a sibling run removed it first
            pass
    return removed


def remove_own_temps() -> list:
    """Delete every temporary file this process created that still exists; returns the paths removed."""
    removed = []
    for path in sorted(_OWN):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:    # renamed to its target, or already cleaned up
            pass
    _OWN.clear()
    return removed


def write_atomic(path, write: Callable[[Path], None]):
    """write(tmp) fills a temporary file beside `path` (same suffix, so writers that go by it still work),
    which is then renamed to `path`; on any failure nothing is left under either name."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
