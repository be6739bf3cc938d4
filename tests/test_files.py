"""m3ddm/files.py: temporary names that record their writer; only dead writers' files are ever removed."""
import os
import subprocess
import sys

import pytest

from m3ddm import files


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def named(folder, host, ns, pid, kind="part", suffix=".mp4", stem="clip_16-9"):
    path = folder / f".{stem}.m3ddm-{host}-{ns}-{pid}-0123abcd.{kind}{suffix}"
    path.write_bytes(b"x")
    return path


def test_temp_names_record_the_writer(tmp_path):
    target = tmp_path / "clip_16-9.mp4"
    tmp = files.create_temp(target, "part", ".mp4")
    assert tmp.exists() and tmp.parent == tmp_path and tmp.name.startswith(".clip_16-9.m3ddm-")
    assert tmp.name.endswith(".part.mp4")
    m = files._TEMP_RE.match(tmp.name)
    assert m and (m["host"], m["ns"], int(m["pid"])) == (files.host_tag(), files.pid_namespace(), os.getpid())
    assert files.temp_path(target) != files.temp_path(target)           # random part
    assert files.stale_temps(tmp_path) == []                              # our own file: never stale


def test_only_dead_writers_on_this_host_are_removed(tmp_path):
    me, ns = files.host_tag(), files.pid_namespace()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = [named(tmp_path, me, ns, dead_pid()),
                named(tmp_path, me, ns, dead_pid(), kind="mux"),
                named(tmp_path, me, ns, dead_pid(), kind="tmp", suffix=".json", stem="clip")]
        kept = [named(tmp_path, me, ns, sleeper.pid),                          # a live sibling run on this host
                named(tmp_path, "otherhost_0badc0de", ns, dead_pid()),         # another machine's writer
                named(tmp_path, me, str(int(ns) + 1), dead_pid()),             # another PID namespace (container)
                named(tmp_path, me, ns, os.getpid())]                          # this process
        for name in (".clip_16-9.abc123.part.mp4", "clip_16-9.mp4", ".hidden", "notes.txt"):
            (tmp_path / name).write_bytes(b"user file")                          # not our pattern: never touched
            kept.append(tmp_path / name)
        assert files.stale_temps(tmp_path) == sorted(dead)
        assert sorted(files.remove_stale_temps(tmp_path)) == sorted(dead)
        assert sorted(tmp_path.iterdir()) == sorted(kept)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "record.json"
    files.write_atomic(target, lambda tmp: tmp.write_text("{}"))
    assert target.read_text() == "{}"

    def broken(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(target, broken)
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"] and target.read_text() == "{}"
