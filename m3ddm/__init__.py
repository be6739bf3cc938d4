"""m3ddm: M3DDM+ video outpainting in plain PyTorch.

    import m3ddm
    unet, vae = m3ddm.load_unet("unet.safetensors"), m3ddm.load_vae("vae.safetensors")
    record = m3ddm.outpaint_video("clip.mp4", "out", unet, vae, [(16, 9)], m3ddm.OutpaintOptions())
"""
from .errors import UserError
from .version import __version__
from .pipeline import OutpaintOptions, outpaint_frames, outpaint_video
from .weights import load_unet, load_vae

__all__ = ["UserError", "OutpaintOptions", "outpaint_frames", "outpaint_video", "load_unet", "load_vae",
           "__version__"]
