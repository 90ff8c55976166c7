"""The two algorithms (``data2vec``, ``data2vec2``) and what they share (``common``)."""
from .common import Data2Vec, RecipeConfig, StudentBase


def build_model(enc_cfg, recipe_cfg: RecipeConfig, modality: str = "text") -> Data2Vec:
    """Student of ``modality`` for ``recipe_cfg.name``, with its EMA teacher."""
    from ..modalities import get_modality

    return Data2Vec(get_modality(modality).build_student(enc_cfg, recipe_cfg), recipe_cfg)


__all__ = ["Data2Vec", "RecipeConfig", "StudentBase", "build_model"]
