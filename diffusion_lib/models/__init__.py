from .unet import UNetCifar32

__all__ = ["UNetCifar32"]
