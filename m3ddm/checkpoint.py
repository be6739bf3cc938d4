"""Training checkpoints on disk: OUT/checkpoint-STEP/ folders written atomically, the latest one found again.

    OUT/checkpoint-0000500/unet.safetensors       the model (m3ddm format), its _ema twin with EMA on
    OUT/checkpoint-0000500/trainer_state.pt       whatever the trainer needs to resume (torch.save of tensors,
                                                  numbers, strings, lists and dicts: read with weights_only=True)
    OUT/unet.safetensors                          a copy of the newest checkpoint's model files

What goes into the state and how a run resumes is train.py's business; this module only stores and finds it.
"""
import os
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .weights import save_model

STATE_FILE = "trainer_state.pt"


def weights_filename(kind: str) -> str:
    """The model file of a checkpoint of `kind` ("unet" or "vae")."""
    return f"{kind}.safetensors"


def save_checkpoint(out, step, kind, model_state, config, state, metadata, ema=None, keep=0) -> Path:
    """OUT/checkpoint-STEP/{model, ema model, trainer_state.pt} via a temporary folder renamed at the end; then
    OUT/<kind>.safetensors (and the EMA's), each written atomically. ema: (state dict, decay) or None.
    keep > 0: only the newest `keep` checkpoint folders stay. Returns the checkpoint folder."""
    out = Path(out)
    final = out / f"checkpoint-{step:07d}"
    tmp = out / f".checkpoint-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = weights_filename(kind)
    save_model(tmp / name, model_state, kind, config, metadata=metadata)
    if ema is not None:
        ema_state, decay = ema
        save_model(tmp / name.replace(".safetensors", "_ema.safetensors"), ema_state, kind, config,
                   metadata={**metadata, "ema_decay": str(decay)})
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for f in final.glob("*.safetensors"):
        shutil.copyfile(f, out / f".{f.name}.tmp")
        os.replace(out / f".{f.name}.tmp", out / f.name)
    if keep > 0:
        for old in sorted(out.glob("checkpoint-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder) -> Path:
    """folder itself when it is a checkpoint, else its newest checkpoint-*/ (UserError when there is none)."""
    folder = Path(folder)
    if (folder / STATE_FILE).is_file():
        return folder
    found = sorted(p for p in folder.glob("checkpoint-*") if (p / STATE_FILE).is_file())
    if not found:
        raise UserError(f"--resume {folder} holds no checkpoint ({STATE_FILE} or checkpoint-*/); "
                        "give a checkpoint folder or the --out folder of an earlier run.")
    return found[-1]


def load_state(checkpoint) -> dict:
    """The trainer state of a checkpoint folder (on the CPU; no arbitrary unpickling)."""
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
