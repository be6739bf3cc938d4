"""m3ddm/cli.py: the one way every command line ends (errors, signals, M3DDM_DEBUG), and that all six use it."""
import importlib
import os
import signal
import sys

import numpy as np
import pytest

from conftest import ROOT
from m3ddm import cli
from m3ddm.errors import UserError

sys.path.insert(0, str(ROOT))


def test_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def body():
        raise UserError("--size 100 is not a multiple of 64; use 128.")
    assert cli.run(body) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: --size 100 is not a multiple of 64; use 128.\n"   # no blank line first


def test_return_value_and_bugs(capsys):
    assert cli.run(lambda: None) == 0 and cli.run(lambda: 3) == 3
    with pytest.raises(ZeroDivisionError):                 # a bug keeps its traceback
        cli.run(lambda: 1 / 0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_clean_up_then_one_line(signum, capsys):
    before = {s: signal.getsignal(s) for s in cli.SIGNALS}
    cleaned = []

    def body():
        try:
            os.kill(os.getpid(), signum)
            for _ in range(1000):                          # the handler raises at the next bytecode
                sum(range(1000))
            raise AssertionError("the signal was not raised")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)          # a second signal during cleanup is ignored
            cleaned.append(True)
    assert cli.run(body, interrupted="no partial output was kept") == 128 + signum
    _, err = capsys.readouterr()
    assert cleaned == [True]
    assert err == f"error: interrupted by {signal.Signals(signum).name}; no partial output was kept.\n"
    assert {s: signal.getsignal(s) for s in cli.SIGNALS} == before       # handlers restored


def test_a_signal_inside_signals_deferred_is_raised_when_the_block_ends(capsys):
    """Between a child process's start and the assignment of its handle the cleanup could not stop it, so a
    signal there waits for the end of the block (m3ddm/video.py starts ffmpeg that way)."""
    steps = []

    def body():
        try:
            with cli.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):                          # the handler runs here, and does not raise
                    pass
                steps.append("block finished")
            steps.append("after the block")                    # never reached
        finally:
            steps.append("cleanup")
    assert cli.run(body, interrupted="test") == 128 + signal.SIGTERM
    assert steps == ["block finished", "cleanup"]
    assert capsys.readouterr().err == "error: interrupted by SIGTERM; test.\n"
    assert cli._DEFERRED == {"depth": 0, "pending": None}


def test_debug_env_prints_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")

    def body():
        raise UserError("bad value; fix it.")
    assert cli.run(body) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in body" in err
    assert err.strip().splitlines()[-1] == "error: bad value; fix it."


# every command line goes through cli.run, and answers a bad value with one `error:` line and exit 2
BAD_CALLS = {
    "sample": ["/nonexistent/clip.mp4"],
    "train": ["--data", "/nonexistent/videos", "--out", "{tmp}/run", "--target", "vae", "--vae-config", "tiny"],
    "evaluate": ["/nonexistent/clip.mp4", "--out", "{tmp}/eval", "--method", "zero"],
    "weights_convert": ["info", "/nonexistent/unet.safetensors"],
    "m3ddm.bench": ["--sections", "nonsense"],
    "m3ddm.demo": ["preview", "/nonexistent/a.mp4", "/nonexistent/b.mp4", "/nonexistent/c.mp4", "{tmp}/p.png"],
}


@pytest.mark.parametrize("module", sorted(BAD_CALLS))
def test_every_cli_uses_the_helper(module, tmp_path, capsys, monkeypatch):
    calls = []
    real_run = cli.run

    def spy(body, interrupted=""):
        calls.append(module)
        return real_run(body, interrupted)
    monkeypatch.setattr(cli, "run", spy)
    main = importlib.import_module(module).main
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in BAD_CALLS[module]])
    out, err = capsys.readouterr()
    assert calls == [module]
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "nonexistent" in lines[0] or "nonsense" in lines[0], err


def test_a_signal_between_creation_and_cleanup_code_leaves_nothing(tmp_path, capsys):
    """The race a real SIGINT once hit: the writer exists (temporary file, ffmpeg running) but the code that
    would abort it never saw it. cli.run aborts open writers and deletes this process's temporaries."""
    from m3ddm import files
    from m3ddm.video import VideoWriter

    held = []                                              # keeps the writer alive: no __del__ to rescue it

    def body():
        held.append(VideoWriter(tmp_path / "out.mp4", 16, 16, 25))
        held[0].write(np.zeros((2, 16, 16, 3), np.uint8))
        files.create_temp(tmp_path / "side.json")         # as if the signal hit inside create_temp's caller
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
        raise AssertionError("not reached")
    ffmpeg_before = _children()
    assert cli.run(body) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert _children() <= ffmpeg_before                    # the writer's ffmpeg was stopped, not left running
    assert capsys.readouterr().err.count("\n") == 1


def _children() -> set:
    """PIDs of this process's child processes (Linux /proc)."""
    me = str(os.getpid())
    kids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1] == me:
                    kids.add(d)
            except (OSError, IndexError):
                pass
    return kids


class _Stream:
    def __init__(self, tty):
        self.tty, self.writes = tty, []

    def isatty(self):
        return self.tty

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


@pytest.mark.parametrize("tty", [False, True])
def test_progress_lines_are_one_write_each(tty, monkeypatch):
    stream = _Stream(tty)
    monkeypatch.setattr(cli.sys, "stderr", stream)
    monkeypatch.setattr(cli, "_line_open", False)
    cli.progress_line("step 1/2", final=False)
    cli.progress_line("step 2/2", final=False)
    cli.progress_line("error: interrupted by SIGTERM.")
    cli.progress_line("done")
    if tty:     # rewritten in place; the line after it replaces it and ends it
        assert stream.writes == ["step 1/2\033[K", "\rstep 2/2\033[K", "\rerror: interrupted by SIGTERM.\033[K\n",
                                 "done\n"]
    else:       # a log: whole lines, each with its newline in the same write
        assert stream.writes == ["step 1/2\n", "step 2/2\n", "error: interrupted by SIGTERM.\n", "done\n"]


DEMO_BAD_VALUES = [
    (["split", "/nonexistent/cache", "{tmp}/data"], "not a folder"),
    (["synth", "/nonexistent/photos", "{tmp}/clips"], "not a folder"),
    (["synth", "{tmp}", "{tmp}/clips", "--frames", "0"], "--frames 0"),
    (["preview", "{clip}", "{clip}", "{clip}", "{tmp}/p.png", "--frames", "0"], "--frames 0"),
    (["preview", "{clip}", "{clip}", "{clip}", "{tmp}/p.png", "--width", "-4"], "--width -4"),
    (["vae-l1", "{clip}", "{clip}", "--size", "12"], "--size 12"),
    (["rescale", "/nonexistent/vae.safetensors", "{tmp}/out.safetensors", "{tmp}"], "does not exist"),
]


@pytest.mark.parametrize("argv,named", DEMO_BAD_VALUES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in DEMO_BAD_VALUES])
def test_demo_bad_values_give_one_error_line(argv, named, tmp_path, capsys):
    """python -m m3ddm.demo: each bad value is one error line naming it, exit 2, nothing written."""
    from m3ddm import demo
    clip = ROOT / "m3ddm" / "assets" / "kivy_city_4x3.mp4"
    before = sorted(tmp_path.iterdir())
    rc = demo.main([a.replace("{tmp}", str(tmp_path)).replace("{clip}", str(clip)) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err
    assert sorted(tmp_path.iterdir()) == before
