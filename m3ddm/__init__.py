"""m3ddm: M3DDM+ video outpainting in plain PyTorch."""
from .errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__"]
