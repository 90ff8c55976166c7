"""Pretraining entry point: ``torchrun --standalone --nproc_per_node=N -m d2v_fast.pretrain``.

The trainer itself lands with the model (next milestone). Until then this entry point
runs the whole data path the trainer will use: it prepares the corpus (the built-in one
by default), builds this rank's DataLoader and prints a few masked batches with their
statistics and throughput.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import UsageError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun -m d2v_fast.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", metavar="DIR", help="prepared corpus (default: the built-in corpus)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample, <s> and </s> included")
    p.add_argument("--batch-size", type=int, default=16, help="global sequences per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=3, help="how many batches to show")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    p.add_argument("--block-mode", choices=("pack", "document"), default="pack")
    p.add_argument("--mask-prob", type=float, default=0.35)
    p.add_argument("--mask-span", type=int, default=4)
    return p


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"{flag} {value}: must be at least 1")


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("seq_len", "batch_size", "batches"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: must be 0 or more")
    if not 0.0 <= args.mask_prob <= 1.0:
        raise UsageError(f"--mask-prob {args.mask_prob}: must be within [0, 1]")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork later
    import torch

    from .data.builtin import builtin_corpus
    from .data.corpus import open_corpus
    from .data.dataset import MaskingConfig, build_dataloader

    data = args.data if args.data else builtin_corpus(progress=rank == 0)
    corpus = open_corpus(data)
    tok = corpus.tokenizer()
    masking = MaskingConfig("span", args.mask_prob, args.mask_span)
    loader = build_dataloader(corpus, seq_len=args.seq_len, micro_batch_size=args.batch_size // world,
                              global_batch_size=args.batch_size, masking=masking, seed=args.seed,
                              rank=rank, world_size=world, num_workers=args.workers,
                              block_mode=args.block_mode)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"corpus {corpus.path}: {corpus.num_documents:,} documents, {corpus.num_tokens:,} tokens, "
        f"vocabulary {corpus.vocab_size:,}; {len(loader.dataset):,} blocks of {args.seq_len} tokens "
        f"({args.block_mode}), {loader.sampler.steps_per_epoch:,} steps of {args.batch_size} per epoch; "
        f"rank {rank} of {world}")
    t0, tokens = time.perf_counter(), 0
    for i, batch in enumerate(loader):
        if i == args.batches:
            break
        mask, pad = batch["mask"], batch["padding_mask"]
        real = (~pad).sum().item()
        tokens += batch["input_ids"].numel()
        say(f"batch {i}: input {tuple(batch['input_ids'].shape)}, masked {mask.sum().item():,} of "
            f"{real:,} real tokens ({mask.sum().item() / max(real, 1):.3f}), padding "
            f"{pad.float().mean().item():.3f}, samples {batch['indices'][:4].tolist()}...")
        if i == 0:
            ids = batch["masked_input_ids"][0][~pad[0]].tolist()
            say("  sample 0 as the student sees it:\n  " + tok.decode(ids, skip_special_tokens=False)[:600]
                .replace("\n", "\n  "))
    dt = time.perf_counter() - t0
    say(f"data path: {tokens / dt:,.0f} tokens/s on rank {rank} (masking via "
        f"{'d2v_fast._C' if _extension_loaded() else 'the pure-Python fallback'}); the trainer comes "
        f"with the next milestone")
    del torch
    return 0


def _extension_loaded() -> bool:
    from .data import masking

    return getattr(masking, "_C", None) is not None


if __name__ == "__main__":
    sys.exit(main())
