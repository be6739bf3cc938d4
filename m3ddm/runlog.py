"""A training run's log: metrics.jsonl in the run folder and one progress line on stderr (rank 0 only).

What is logged is the trainer's business (train.py's "Log" section); this keeps the file consistent with a
resumed run and shows the progress with an ETA.
"""
import json
import sys
import time
from pathlib import Path


class RunLog:
    """metrics.jsonl (one JSON record per line) and stderr lines; enabled=False (ranks > 0) writes nothing.

    On a resumed run the records after the resumed step (a crashed run's tail) are dropped, so the file reads as
    if the run had never stopped."""

    def __init__(self, folder, enabled, total_steps, resume_step=0):
        self.enabled, self.total_steps = enabled, total_steps
        self.path = Path(folder) / "metrics.jsonl"
        self.tty = sys.stderr.isatty()
        self.t0, self.step0 = time.time(), resume_step
        self.t_lap = self.t0
        if enabled and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def lap(self) -> float:
        """Seconds since the previous lap (or the start)."""
        now = time.time()
        seconds, self.t_lap = now - self.t_lap, now
        return seconds

    def elapsed(self) -> float:
        return time.time() - self.t0

    def record(self, **rec):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def progress(self, step, text, final=False):
        """`step S/N TEXT ETA h:mm:ss`, rewritten in place on a terminal, one line each otherwise."""
        if not self.enabled:
            return
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else 0.0
        line = (f"step {step}/{self.total_steps} {text} "
                f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        end = "\n" if (final or not self.tty) else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)

    def message(self, text):
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)
