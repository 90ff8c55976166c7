"""Text data: preparation of .txt/.jsonl inputs into a BPE tokenizer and token shards
(``prepare``, ``sources``, ``tokenizer``), the on-disk corpus (``corpus``), blocks, the
masking collator and the loader (``dataset``, ``masking``), the built-in corpus of standard
library docstrings and its probe task (``builtin``, ``probe_task``); see docs/data.md."""
