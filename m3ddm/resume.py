"""The work folder of one video's run: what an interrupted run needs to continue where it stopped.

    out/<stem>.m3ddm-work/
      work.json          what the result depends on: options, ratios, dtype, weights sha256, the source video,
                         the device type and the schedule's length
      position.pt        the schedule position: the next clip to run, and the state of the VAE sampling RNG
      state-CCCCCC.pt    clip C's new stored latents (the guides of later clips) and new input latents,
                         (4, h, w) each; deleted after the last clip that uses any of them
      final-CCCCCC.pt    clip C's final latents (n, 4, h, w) of the n output frames it finalised; kept to the end

Every file is written to a temporary name and renamed (m3ddm/files.py) after the clip that made it, position.pt
last, so the position never points past what is stored; a kill at any moment leaves a consistent folder (at
most a temporary file, which the next run removes as a dead writer's debris).

Resuming (pipeline.Outpainter.run): the global context and the black latent are recomputed (the same
computation on the same inputs), the stored and input latents still needed are loaded, the finished output
frames are decoded again from their final latents clip by clip, exactly as the first run decoded them (same
latents, same batches), and the schedule continues at the stored position. torch.load gives fresh, aligned
tensors, which are only copied or used whole, so the resumed run computes what an uninterrupted one computes:
its decoded frames, and its encoded files, are identical. Re-decoding instead of appending to the partial
video: a killed encoder leaves an mp4 without its index, which nothing can append to, and segmenting the
output would tie the encoded file to where the run was cut; the final latents cost 16 KiB per frame at
--size 256 (1/48 of the frame's pixels) and are streamed back one clip at a time, so disk and memory stay
bounded by the video's latents plus one clip.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .files import remove_stale_temps, write_atomic

WORK_SUFFIX = ".m3ddm-work"
KEY_FILE = "work.json"
POSITION_FILE = "position.pt"


def work_folder_path(out_dir, stem: str) -> Path:
    return Path(out_dir) / f"{stem}{WORK_SUFFIX}"


def _flat(d: dict, prefix=()) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _name(key: tuple) -> str:
    """A setting's name as the user knows it: the command-line flag where there is one."""
    key = key[1:] if key[0] == "made_with" else key
    flags = {("ratios",): "--ratio", ("dtype",): "--dtype", ("weights", "unet"): "--unet weights (sha256)",
             ("weights", "vae"): "--vae weights (sha256)", ("device_type",): "--device"}
    if key in flags:
        return flags[key]
    if key[0] == "options":
        return "--" + key[-1].replace("_", "-")
    if key[0] == "source":
        return f"the input video's {key[-1].replace('_', ' ')}"
    return ".".join(key)


def _short(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def describe_differences(old: dict, new: dict) -> str:
    """'--seed 6 (now 7), --unet weights (sha256) 1a2b... (now 3c4d...)': the settings in which old and new differ."""
    a, b = _flat(old), _flat(new)
    parts = [f"{_name(k)} {_short(a.get(k))} (now {_short(b.get(k))})"
             for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
    return ", ".join(parts) or "nothing"


def finished_clips(path) -> int:
    """How many clips of its schedule the unfinished run in work folder `path` has done (0 if none)."""
    try:
        return int(torch.load(Path(path) / POSITION_FILE, map_location="cpu", weights_only=True)["next_clip"])
    except (OSError, KeyError, RuntimeError, ValueError):
        return 0


class WorkFolder:
    """One video's work folder (see the module doc). `open` creates it or checks that it belongs to this run."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = Path(path), key
        self._sizes = {p.name: p.stat().st_size for p in self.path.iterdir() if p.is_file()}
        position = self._load(POSITION_FILE) if (self.path / POSITION_FILE).exists() else {}
        self.next_clip = int(position.get("next_clip", 0))
        self.vae_rng = position.get("vae_rng")

    @classmethod
    def open(cls, path, key: dict, overwrite: bool, video_name: str) -> "WorkFolder":
        """The work folder at `path` for a run with `key`: an existing one whose key matches is continued; one
        with another key is refused (naming what differs) unless overwrite, which starts over."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is in the way of {video_name}'s work folder (a file has its name); "
                            "move it away or choose another --out.")
        if path.is_dir():
            old = cls._read_key(path)
            if old is not None and old != key and not overwrite:
                raise UserError(f"{video_name}: the unfinished run in {path} was made with other settings: "
                                f"{describe_differences(old, key)}; rerun with those to continue it, or pass "
                                "--overwrite to discard it and start over.")
            if old != key:
                shutil.rmtree(path)
        if not path.is_dir():
            path.mkdir(parents=True)
            write_atomic(path / KEY_FILE, lambda tmp: Path(tmp).write_text(json.dumps(key, indent=1) + "\n"))
        remove_stale_temps(path)
        return cls(path, key)

    @staticmethod
    def _read_key(path: Path) -> Optional[dict]:
        try:
            return json.loads((path / KEY_FILE).read_text())
        except (OSError, ValueError):        # killed before work.json was written: nothing worth keeping
            return None

    def _load(self, name: str):
        return torch.load(self.path / name, map_location="cpu", weights_only=True)

    def _save(self, name: str, obj):
        write_atomic(self.path / name, lambda tmp: torch.save(obj, tmp))
        self._sizes[name] = (self.path / name).stat().st_size

    # -- per clip

    def save_clip(self, c: int, state: Optional[dict], final: Optional[torch.Tensor], vae_rng):
        """After clip c: its new stored/input latents, its final latents, then the position c + 1."""
        if state:
            self._save(f"state-{c:06d}.pt", state)
        if final is not None:
            self._save(f"final-{c:06d}.pt", final.cpu())
        self._save(POSITION_FILE, {"next_clip": c + 1, "vae_rng": vae_rng})
        self.next_clip = c + 1

    def load_state(self, c: int) -> Optional[dict]:
        path = self.path / f"state-{c:06d}.pt"
        return self._load(path.name) if path.exists() else None

    def load_final(self, c: int) -> torch.Tensor:
        path = self.path / f"final-{c:06d}.pt"
        if not path.exists():
            raise UserError(f"The work folder {self.path} lacks {path.name}; delete the folder (or pass "
                            "--overwrite) to start this video over.")
        return self._load(path.name)

    def drop_state(self, c: int):
        (self.path / f"state-{c:06d}.pt").unlink(missing_ok=True)
        self._sizes.pop(f"state-{c:06d}.pt", None)

    def size_bytes(self) -> int:
        """The folder's size now (kept up to date as files are written and deleted, not listed each time)."""
        return sum(self._sizes.values())

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)
