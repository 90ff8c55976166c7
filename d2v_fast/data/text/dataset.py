"""Blocks of ``seq_len`` tokens over a prepared corpus, a resumable distributed sampler,
the masking collator and the DataLoader that ties them together.

A block is ``<s> content </s>`` padded to ``seq_len`` with ``<pad>``:
- ``pack`` (default): content is a slice of the shard's token stream, which crosses
  document ends (each document is followed by ``</s>`` in the stream, as in RoBERTa's
  full-sentence packing); only a shard's last block can be padded.
- ``document``: a block never crosses a document end; a document is cut into blocks and
  its last block is padded.

Order is a permutation of all blocks fixed by (seed, epoch). Every optimizer step takes
the next ``global_batch_size`` blocks of it; rank r gets the r-th contiguous slice of
those. The position in the epoch is therefore a global sample count that means the same
for every world size, which is what makes a resume at another world size exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ...errors import UsageError
from ..loader import BlockSampler, batch_epoch, rank_loader
from .corpus import Corpus
from .masking import random_mask, span_mask

BLOCK_MODES = ("pack", "document")


def block_table(corpus: Corpus, seq_len: int, mode: str = "pack") -> np.ndarray:
    """``[num_blocks, 3]`` int64 rows of (shard, start, length) of each block's content."""
    if mode not in BLOCK_MODES:
        raise UsageError(f"--data.block_mode {mode!r}: expected one of {', '.join(BLOCK_MODES)}")
    if seq_len < 3:
        raise UsageError(f"--seq-len {seq_len}: must be at least 3 (<s>, one token, </s>)")
    width = seq_len - 2
    tables = []
    for shard, (tokens, offsets) in enumerate(zip(corpus.tokens, corpus.doc_offsets)):
        if mode == "pack":
            starts = np.arange(0, len(tokens), width, dtype=np.int64)
            lengths = np.minimum(width, len(tokens) - starts)
        else:
            doc_start = offsets[:-1]
            doc_len = np.diff(offsets) - 1  # without the </s> that follows each document
            doc_start, doc_len = doc_start[doc_len > 0], doc_len[doc_len > 0]
            per_doc = (doc_len + width - 1) // width
            first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
            k = np.arange(int(per_doc.sum()), dtype=np.int64) - first  # block number within its doc
            starts = np.repeat(doc_start, per_doc) + k * width
            lengths = np.minimum(width, np.repeat(doc_start + doc_len, per_doc) - starts)
        tables.append(np.stack([np.full_like(starts, shard), starts, lengths], axis=1))
    return np.concatenate(tables) if tables else np.zeros((0, 3), dtype=np.int64)


class BlockDataset(Dataset):
    """Map-style dataset of blocks. Items are requested as ``(epoch, index)`` pairs so the
    collator knows which epoch's masks to draw, even inside worker processes."""

    def __init__(self, corpus: Corpus, seq_len: int, mode: str = "pack"):
        self.corpus, self.seq_len, self.mode = corpus, seq_len, mode
        self.table = block_table(corpus, seq_len, mode)
        ids = corpus.special_ids
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        shard, start, length = self.table[index].tolist()
        out = torch.full((self.seq_len,), self.pad, dtype=torch.long)
        out[0] = self.bos
        out[1:1 + length] = torch.from_numpy(self.corpus.tokens[shard][start:start + length].astype(np.int64))
        out[1 + length] = self.eos
        return {"input_ids": out, "index": index, "epoch": epoch}


@dataclass
class MaskingConfig:
    """``span`` = data2vec text masking (fairseq config/text/pretraining/base.yaml): special tokens and padding are never
    masked. ``random`` = data2vec 2.0 (config/v2/base_text_only_task.yaml): exactly ``int(L * mask_prob)`` of the ``L``
    non-padding positions per clone (so every unpadded row keeps the same number of tokens
    and the student's input needs no padding mask)."""

    kind: str = "span"
    mask_prob: float = 0.35
    span: int = 4
    clones: int = 1


class MaskCollator:
    """Stacks blocks and draws masks for the whole batch in one call into ``d2v_fast._C``.

    Returns ``input_ids`` (the unmasked tokens, the teacher's input), ``padding_mask``,
    ``mask`` (positions to predict; ``[B * clones, T]`` for ``random`` masking),
    ``masked_input_ids`` (span masking: ``<mask>`` at the masked positions, the student's
    input), ``indices`` and ``epoch``.
    """

    def __init__(self, special_ids: dict[str, int], masking: MaskingConfig, seed: int):
        if masking.kind not in ("span", "random"):
            raise UsageError(f"masking kind {masking.kind!r}: expected 'span' or 'random'")
        self.ids, self.masking, self.seed = special_ids, masking, seed
        self.unmaskable = torch.tensor(sorted({special_ids[k] for k in ("bos", "eos", "pad")}))

    def __call__(self, items: list[dict]) -> dict:
        input_ids = torch.stack([it["input_ids"] for it in items])
        indices = torch.tensor([it["index"] for it in items], dtype=torch.long)
        epoch = batch_epoch(items)
        m = self.masking
        maskable = ~torch.isin(input_ids, self.unmaskable) if m.kind == "span" else input_ids != self.ids["pad"]
        batch = {"input_ids": input_ids, "padding_mask": input_ids == self.ids["pad"],
                 "indices": indices, "epoch": epoch}
        if m.kind == "span":
            mask = span_mask(maskable, mask_prob=m.mask_prob, span=m.span, seed=self.seed,
                             epoch=epoch, indices=indices)
            batch["masked_input_ids"] = input_ids.masked_fill(mask, self.ids["mask"])
        else:
            mask = random_mask(maskable, mask_prob=m.mask_prob, seed=self.seed, epoch=epoch,
                               indices=indices, clones=m.clones)
        batch["mask"] = mask
        return batch


def build_dataloader(corpus: Corpus, *, seq_len: int, micro_batch_size: int, global_batch_size: int,
                     masking: MaskingConfig | None = None, block_mode: str = "pack", seed: int = 0,
                     epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1,
                     num_workers: int = 2, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader of masked micro-batches for this rank (see the module docstring)."""
    dataset = BlockDataset(corpus, seq_len, block_mode)
    sampler = BlockSampler(len(dataset), global_batch_size=global_batch_size, rank=rank,
                           world_size=world_size, seed=seed, epoch=epoch, start=start)
    collate = MaskCollator(corpus.special_ids, masking or MaskingConfig(), seed)
    return rank_loader(dataset, sampler, collate, micro_batch_size=micro_batch_size,
                       global_batch_size=global_batch_size, world_size=world_size, seed=seed,
                       num_workers=num_workers, pin_memory=pin_memory)


