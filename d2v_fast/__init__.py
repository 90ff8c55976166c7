"""d2v_fast: fast data2vec pretraining."""

__version__ = "0.1.0"
