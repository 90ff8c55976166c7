"""A plain single-process training loop for the reference recipe: the other half of the
engine-vs-reference parity test and the baseline of the step benchmark."""
from __future__ import annotations

import dataclasses

import torch

from ..config import Config
from ..data.corpus import Corpus
from ..data.dataset import build_dataloader
from .data2vec import ReferenceData2Vec
from .data2vec2 import ReferenceData2Vec2


def reference_losses(cfg: Config, corpus: Corpus, steps: int, engine_state: dict | None = None) -> list[float]:
    """Per-step losses of ``steps`` optimizer updates, on the batches the engine sees."""
    from ..trainer import lr_factor, masking_for  # the schedule and mask settings are shared, not under test

    t, o, r = cfg.train, cfg.optim, cfg.recipe
    torch.manual_seed(t.seed)
    enc = dataclasses.replace(cfg.model, vocab_size=corpus.vocab_size, pad_id=corpus.special_ids["pad"])
    v2 = r.name == "data2vec2"
    model = (ReferenceData2Vec2 if v2 else ReferenceData2Vec)(enc, r)
    if engine_state is not None:
        model.load_engine_state(engine_state)
    model.train()
    torch.manual_seed(t.seed + 1)  # the engine's rank-0 dropout seed
    decay, no_decay = [], []
    trained = [model.encoder, model.convs, model.proj] if v2 else [model.encoder, model.regression_head]
    for p in [p for m in trained for p in m.parameters()]:
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    total = o.total_steps or t.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o.warmup_steps, total))
    micro = t.micro_batch_size or t.batch_size
    loader = build_dataloader(corpus, seq_len=cfg.data.seq_len, micro_batch_size=micro,
                              global_batch_size=t.batch_size, masking=masking_for(r),
                              block_mode=cfg.data.block_mode, seed=t.seed, num_workers=0)
    it = iter(loader)
    losses = []
    for step in range(steps):
        mbs = [next(it) for _ in range(t.batch_size // micro)]
        n = sum(int(mb["mask"].sum()) for mb in mbs)
        total_loss = 0.0
        for mb in mbs:
            pad = mb["padding_mask"] if mb["padding_mask"].any() else None
            if v2:
                loss, _, _, _ = model(mb["input_ids"], pad, mb["mask"])
            else:
                loss, _, _, _ = model(mb["masked_input_ids"], mb["input_ids"], pad, mb["mask"])
            (loss / n).backward()
            total_loss += loss.item()
        params = [p for g in opt.param_groups for p in g["params"]]
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        model.ema_step(r.decay_at(step))
        losses.append(total_loss / n)
    return losses
