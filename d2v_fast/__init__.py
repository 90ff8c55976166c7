"""d2v_fast: fast data2vec pretraining."""

__version__ = "0.1.0"


def load_pretrained(path, map_location="cpu"):
    """The pretrained student encoder (an ``nn.Module`` in eval mode) from a run directory
    (its ``encoder.safetensors``, else its newest complete checkpoint), a checkpoint directory, or
    an ``encoder.safetensors`` / ``encoder.json`` file; nothing in the files is run. ``forward(input_ids, attention_mask=None)`` returns the last hidden
    state ``[B, T, C]``."""
    from .pretrained import load_pretrained as _load

    return _load(path, map_location=map_location)
