"""The data2vec training step written the plain way on Hugging Face ``transformers``: the
``hf`` provider of the step benchmark (docs/performance.md), i.e. what a user writes in an afternoon,
the comparison the headline speed ratio is against.

- student: ``Data2VecTextModel`` (``attn_implementation="sdpa"``) plus the regression head,
  fed the ``<mask>``-ed input; the head on ``last_hidden_state[mask]``;
- teacher: a ``copy.deepcopy`` of that model in eval mode whose encoder layers are an EMA of
  the student's (a per-parameter ``mul_``/``add_`` loop) and whose embeddings are copied from
  the student before each teacher pass (the recipe shares them, as fairseq's
  ``ema_transformer_layers_only`` does);
- targets: forward hooks on every layer's ``output.dense`` (the FFN output before dropout,
  residual and LayerNorm), the top K of them normalised with ``F.instance_norm`` /
  ``F.layer_norm`` as ``--recipe.layer_norm`` / ``--recipe.final_norm`` say, averaged;
- loss: ``F.smooth_l1_loss`` (``F.mse_loss`` when beta is 0) summed over features, times the
  recipe's scale, divided by the masked count;
- AdamW (``fused=True`` where the device has it), weight decay on the recipe's groups,
  the recipe's warmup + cosine schedule, gradient clipping, bf16 autocast on GPU.

Not plain-HF concerns left out on purpose: the instance norm here includes padded
positions (the benchmark's batches have none), there is no non-finite-update skip, and
data2vec 2.0 is not offered (its student encodes only the kept tokens of 8 clones, which
``Data2VecTextModel`` cannot express without rewriting its forward).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F


def hf_config(enc, attn: str = "sdpa"):
    """``Data2VecTextConfig`` of an ``EncoderConfig`` (the engine's encoder has HF's names)."""
    import transformers

    cfg = transformers.Data2VecTextConfig(
        vocab_size=enc.vocab_size, hidden_size=enc.hidden_size, num_hidden_layers=enc.num_layers,
        num_attention_heads=enc.num_heads, intermediate_size=enc.ffn_size, max_position_embeddings=enc.max_positions,
        type_vocab_size=1, layer_norm_eps=enc.layer_norm_eps, pad_token_id=enc.pad_id, hidden_act="gelu",
        hidden_dropout_prob=enc.dropout, attention_probs_dropout_prob=enc.attention_dropout,
        initializer_range=enc.init_std)
    cfg._attn_implementation = attn
    return cfg


def _norm(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "instance":  # over time, per sample and channel
        return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:])
    return x


class HFData2VecStep:
    """One optimizer update per call on a batch dict of the MaskCollator's keys."""

    def __init__(self, cfg, device: torch.device, vocab: int, pad_id: int = 1):
        import dataclasses

        import transformers

        from ..recipes.common import regression_head
        from ..schedule import lr_factor

        if cfg.recipe.name != "data2vec":
            from ..errors import UsageError

            raise UsageError(f"--providers hf: only --recipe data2vec has a plain Hugging Face version "
                             f"(got {cfg.recipe.name!r}); drop hf from --providers for this recipe")
        torch.manual_seed(cfg.train.seed)
        enc = dataclasses.replace(cfg.model, vocab_size=vocab, pad_id=pad_id)
        self.recipe, self.optim, self.device, self.pad_id = cfg.recipe, cfg.optim, device, pad_id
        self.model = transformers.Data2VecTextModel(hf_config(enc), add_pooling_layer=False).to(device).train()
        self.head = regression_head(enc.hidden_size, cfg.recipe.head_hidden_mult, enc.init_std).to(device)
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.captured: list[torch.Tensor] = []
        for layer in self.teacher.encoder.layer:
            layer.output.dense.register_forward_hook(lambda mod, inp, out: self.captured.append(out))
        params = [p for m in (self.model, self.head) for p in m.parameters()]
        every = cfg.optim.decay_biases_and_norms  # the recipe's groups (v1 decays every parameter)
        decay = [p for p in params if every or p.ndim >= 2]
        no_decay = [p for p in params if not (every or p.ndim >= 2)]
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        kw = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        try:
            self.opt = torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(groups, **kw)
        total = cfg.optim.total_steps or cfg.train.max_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.optim.warmup_steps, total))
        self.params, self.step_no = params, 0
        use_bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def load_engine_state(self, state: dict) -> None:
        """Take the weights of an engine ``Data2Vec`` state dict (same HF names under
        ``student.encoder.``; the head under ``student.head.``; teacher layers under ``teacher.``)."""
        enc = {k[len("student.encoder."):]: v for k, v in state.items() if k.startswith("student.encoder.")}
        self.model.load_state_dict(enc, strict=True)
        self.head.load_state_dict({k[len("student.head."):]: v for k, v in state.items()
                                   if k.startswith("student.head.")}, strict=True)
        self.teacher.encoder.layer.load_state_dict({k[len("teacher."):]: v for k, v in state.items()
                                                    if k.startswith("teacher.")}, strict=True)

    def targets(self, input_ids: torch.Tensor, attention_mask, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for t, s in zip(self.teacher.embeddings.parameters(), self.model.embeddings.parameters()):
                t.copy_(s)
            self.captured.clear()
            self.teacher(input_ids=input_ids, attention_mask=attention_mask)
            r = self.recipe
            layers = [_norm(x.float(), r.layer_norm) for x in self.captured[-r.top_k:]]
            y = _norm(sum(layers) / len(layers), r.final_norm)
            self.captured.clear()
            return y[mask]

    def loss_sum(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        if r.loss_beta == 0:
            per = F.mse_loss(pred.float(), target, reduction="none")
        else:
            per = F.smooth_l1_loss(pred.float(), target, reduction="none", beta=r.loss_beta)
        scale = r.loss_scale if r.loss_scale > 0 else pred.shape[-1] ** -0.5
        return per.sum() * scale

    def __call__(self, batch: dict) -> torch.Tensor:
        """Returns the update's loss (a device tensor: reading it is the caller's choice)."""
        b = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        am = (~b["padding_mask"]).long() if bool(batch["padding_mask"].any()) else None
        mask = b["mask"]
        with self.autocast:
            h = self.model(input_ids=b["masked_input_ids"], attention_mask=am).last_hidden_state
            pred = self.head(h[mask])
            target = self.targets(b["input_ids"], am, mask)
            loss = self.loss_sum(pred, target) / mask.sum().clamp_min(1)
        loss.backward()
        if self.optim.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.optim.clip_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        d = self.recipe.decay_at(self.step_no)
        with torch.no_grad():
            for t, s in zip(self.teacher.encoder.layer.parameters(), self.model.encoder.layer.parameters()):
                t.mul_(d).add_(s, alpha=1 - d)
        self.step_no += 1
        return loss.detach()
