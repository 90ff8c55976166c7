from .encoder import Encoder, EncoderConfig, ENCODER_PRESETS

__all__ = ["Encoder", "EncoderConfig", "ENCODER_PRESETS"]
