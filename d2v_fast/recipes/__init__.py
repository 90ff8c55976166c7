from .data2vec import Data2Vec, RecipeConfig

__all__ = ["Data2Vec", "RecipeConfig"]
