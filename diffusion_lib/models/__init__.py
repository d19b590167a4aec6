from ..config import ModelConfig
from .unet import UNetCifar32


def build_model(config: ModelConfig) -> UNetCifar32:
    return UNetCifar32(config.base_channels, config.channel_mults, config.num_res_blocks, config.attention_resolutions, config.dropout)


__all__ = ["UNetCifar32", "build_model"]
