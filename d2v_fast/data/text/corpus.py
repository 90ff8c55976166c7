"""The prepared corpus on disk: token shards, document boundaries and ``meta.json``.

Layout of a corpus directory::

    meta.json               sizes, dtype, special ids, checksums (written last)
    tokenizer/              tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
    tokens-00000.bin        raw little-endian uint16/uint32 token ids; every document
                            is followed by </s>, so a shard is a ready-to-pack stream
    docs-00000.npy          int64 document start offsets into the shard, plus the end

Kept free of torch so corpus-preparation workers start fast.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..shards import META, OffsetShardWriter, open_offset_shards, read_corpus_meta

FORMAT = "d2v_fast.corpus"
FORMAT_VERSION = 1
PREPARE_HINT = "prepare one with `python -m d2v_fast.data.prepare --input ... --out DIR`"
REPREPARE = "python -m d2v_fast.data.prepare --input ... --out DIR --force"  # with the inputs it was made from


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class ShardWriter(OffsetShardWriter):
    """Appends tokenized documents to numbered shards in a staging directory."""

    def __init__(self, directory: Path, dtype: np.dtype, eos_id: int, shard_tokens: int):
        super().__init__(directory, dtype, shard_tokens, files=("tokens", "docs"),
                         keys=("tokens", "docs", "num_tokens", "num_documents"))
        self.eos_id = eos_id

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one concatenated array (each already ends in </s>)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        start = 0
        for n in lengths.tolist():
            self.append(tokens[start:start + n].tobytes(), n)
            start += n


@dataclass
class Corpus:
    """A prepared corpus, opened read-only with memory-mapped shards."""

    path: Path
    meta: dict
    tokens: list[np.ndarray]
    doc_offsets: list[np.ndarray]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def special_ids(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.meta["special_ids"].items()}

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.meta["tokenizer"]["dir"]

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.meta["num_documents"])

    def tokenizer(self):
        from .tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_dir, flag=f"corpus {self.path}: tokenizer")


def read_meta(path: Path, *, flag: str = "--data") -> dict:
    return read_corpus_meta(path, flag=flag, fmt=FORMAT, version=FORMAT_VERSION, kind="", hint=PREPARE_HINT)


def open_corpus(path: str | os.PathLike, *, flag: str = "--data") -> Corpus:
    """Open a prepared corpus, checking every shard's size against ``meta.json``."""
    path = Path(path)
    meta = read_meta(path, flag=flag)
    dtype = np.dtype(meta["dtype"])
    fix = f"the corpus is truncated or altered; prepare it again (`{REPREPARE}`)"
    tokens, offsets = open_offset_shards(path, meta, dtype, data="tokens", index="docs", count="num_tokens",
                                         items="num_documents", unit="tokens", fix=fix)
    tok = path / meta["tokenizer"]["dir"] / "tokenizer.json"
    if not tok.is_file():
        raise UsageError(f"{tok}: missing; {fix}")
    if hashlib.sha256(tok.read_bytes()).hexdigest() != meta["tokenizer"]["sha256"]:
        raise UsageError(f"{tok}: does not match the tokenizer checksum in {META} (the tokenizer changed after "
                         f"the corpus was tokenized); restore it or prepare the corpus again (`{REPREPARE}`)")
    return Corpus(path=path, meta=meta, tokens=tokens, doc_offsets=offsets)


def verify_corpus(corpus: Corpus, chunk_tokens: int = 1 << 24) -> None:
    """Full check of every shard against ``meta.json``: sha256 and token ids below the
    vocabulary size. Raises UsageError naming the shard."""
    vocab = corpus.vocab_size
    fix = f"the shard was altered after preparation; prepare the corpus again (`{REPREPARE}`)"
    for shard, tokens in zip(corpus.meta["shards"], corpus.tokens):
        path = corpus.path / shard["tokens"]
        h = hashlib.sha256()
        for start in range(0, len(tokens), chunk_tokens):
            block = np.asarray(tokens[start:start + chunk_tokens])
            h.update(block.tobytes())
            top = int(block.max()) if block.size else 0
            if top >= vocab:
                raise UsageError(f"{path}: token id {top} at or after position {start} is outside the vocabulary "
                                 f"({vocab} ids); {fix}")
        if h.hexdigest() != shard["sha256"]:
            raise UsageError(f"{path}: sha256 differs from {META}; {fix}")
