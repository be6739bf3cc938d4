"""What a training run keeps besides its computation (train.py holds that): the EMA, checkpoints, the run log.

    OUT/checkpoint-0000500/unet.safetensors       the model (m3ddm format), its _ema twin with --ema
    OUT/checkpoint-0000500/trainer_state.pt       what the trainer needs to resume (tensors, numbers, strings,
                                                  lists and dicts: read back with weights_only=True)
    OUT/unet.safetensors                          a copy of the newest checkpoint's model files
    OUT/metrics.jsonl                             one JSON record per step (and per validation, evaluation)

What goes into the state, the resume rules and what is logged are train.py's business; this module stores and
finds checkpoints atomically, keeps metrics.jsonl consistent with a resumed run, and shows the progress line.
"""
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .cli import progress_line
from .errors import UserError
from .weights import save_model

# ---------------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of all parameters and floating buffers, kept in fp32."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)


# ---------------------------------------------------------------------------------------------------
# Checkpoints

STATE_FILE = "trainer_state.pt"


def weights_filename(kind: str, ema: bool = False) -> str:
    """The model file of a checkpoint of `kind` ("unet" or "vae"), or of its EMA weights."""
    return f"{kind}_ema.safetensors" if ema else f"{kind}.safetensors"


def save_checkpoint(out, step, kind, model_state, config, state, metadata, ema=None, keep=0) -> Path:
    """OUT/checkpoint-STEP/{model, ema model, trainer_state.pt} via a temporary folder renamed at the end; then
    OUT/<kind>.safetensors (and the EMA's), each written atomically. ema: an EMA or None.
    keep > 0: only the newest `keep` checkpoint folders stay. Returns the checkpoint folder."""
    out = Path(out)
    final = out / f"checkpoint-{step:07d}"
    tmp = out / f".checkpoint-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = weights_filename(kind)
    save_model(tmp / name, model_state, kind, config, metadata=metadata)
    if ema is not None:
        save_model(tmp / weights_filename(kind, ema=True), ema.shadow, kind, config,
                   metadata={**metadata, "ema_decay": str(ema.decay)})
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


# ---------------------------------------------------------------------------------------------------
# The run log


class RunLog:
    """metrics.jsonl (one JSON record per line) and stderr lines; enabled=False (ranks > 0) writes nothing.

    On a resumed run the records after the resumed step (a crashed run's tail) are dropped, so the file reads as
    if the run had never stopped."""

    def __init__(self, folder, enabled, total_steps, resume_step=0):
        self.enabled, self.total_steps = enabled, total_steps
        self.path = Path(folder) / "metrics.jsonl"
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
        """Append one record; the first one creates the run folder (a run that fails before it leaves none)."""
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def step(self, step, loss, lr, grad_norm, clips, skipped_videos, every=1, data=None):
        """One optimizer step: its metrics.jsonl record (clips: drawn by all ranks since the previous step; data:
        --log-data's clips), and the progress line every `every` steps, at the first and at the last."""
        clips_per_s = clips / max(self.lap(), 1e-9)
        self.record(step=step, loss=loss, lr=lr, grad_norm=grad_norm, clips_per_s=clips_per_s, elapsed_s=self.elapsed(),
                    skipped_videos=skipped_videos, **({"data": data} if data is not None else {}))
        if step % every == 0 or step == self.total_steps or step == 1:
            text = f"loss {loss:.4f} lr {lr:.2e} clips/s {clips_per_s:.2f}"
            self.progress(step, text, final=step == self.total_steps)

    def validation(self, step, loss):
        self.record(step=step, val_loss=loss)
        self.message(f"step {step} validation loss {loss:.4f}")

    def progress(self, step, text, final=False):
        """`step S/N TEXT ETA h:mm:ss`, rewritten in place on a terminal, one line each otherwise."""
        if not self.enabled:
            return
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else 0.0
        line = (f"step {step}/{self.total_steps} {text} "
                f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        progress_line(line, final=final)

    def message(self, text):
        if self.enabled:
            progress_line(text)


# ---------------------------------------------------------------------------------------------------
# Time limit and sample clips


def out_of_time(max_minutes, started, world, device) -> bool:
    """--max-minutes passed on any rank (so that every rank stops at the same step)."""
    if not max_minutes:
        return False
    late = torch.tensor(float(time.monotonic() - started > 60 * max_minutes), device=device)
    if world > 1:
        dist.all_reduce(late, op=dist.ReduceOp.MAX)
    return bool(late.item())


def black_latent(vae, size, device, dtype):
    """Latent of an all-black (-1) frame: the unconditional local condition (posterior mean)."""
    with torch.no_grad():
        return vae.encode_latents(-torch.ones(1, 3, size, size, device=device, dtype=dtype))[0].float()  # (4, h, w)


@torch.no_grad()
def write_sample(path, unet, vae, item, args, device):
    """Outpaint one fixed clip with the live UNet (PNDM, --sample-steps, guidance 2 / 4, guides none) and write
    [masked input | output | ground truth] side by side as an mp4 (temporary name, then rename)."""
    from .masks import latent_mask
    from .sampler import assemble_conditioning, clip_noise, denoise_clip, encode_global_context
    from .schedulers import PNDMScheduler
    from .video import VideoWriter
    was_training = unet.training
    unet.eval()
    dtype = next(vae.parameters()).dtype
    f = args.frames
    cond_px = item["clip"] * (1 - item["mask"][0][None, None]) - item["mask"][0][None, None]  # one mask, no guides
    z = vae.encode_latents(torch.cat([cond_px, item["global"]]).to(device, dtype), batch=args.vae_batch).float()
    masked = z[:f].transpose(0, 1)[None]  # (1, 4, F, h, w)
    black = black_latent(vae, args.size, device, dtype)[None]  # (1, 4, h, w)
    conditioning = assemble_conditioning(masked, black, latent_mask(item["mask"][0]).to(device), [None] * f)
    context = encode_global_context(unet, z[f:])
    noise = clip_noise(args.seed, masked.shape, device)
    latents = denoise_clip(unet, PNDMScheduler(args.sample_steps), masked, noise, conditioning, context,
                           item["fps"], guidance_local=2.0, guidance_global=4.0 if args.global_frames else 1.0)
    out = vae.decode_latents(latents[0].transpose(0, 1).to(dtype), batch=args.vae_batch).float().cpu()
    panels = torch.cat([cond_px, out, item["clip"]], dim=3)  # (F, 3, S, 3S)
    frames = ((panels.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, frames.shape[2], frames.shape[1], 8) as writer:
        writer.write(frames)
    unet.train(was_training)
