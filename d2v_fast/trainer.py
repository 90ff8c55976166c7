"""The training loop: micro-batching with gradient accumulation, DDP, bf16 autocast on GPU,
AdamW with warmup + cosine, clipping, one EMA step per optimizer update, metrics,
checkpoints and the collapse guard."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from .config import Config
from .data.corpus import Corpus
from .data.dataset import MaskingConfig, build_dataloader
from .recipes.data2vec import Data2Vec

# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class CollapseError(RuntimeError):
    pass


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup from 0, then cosine to 0 at ``total`` updates (then 0)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass  # this device or dtype has no fused AdamW
    return torch.optim.AdamW(groups, foreach=True, **kw)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Trainer:
    def __init__(self, cfg: Config, corpus: Corpus, run_dir: Path, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.cfg, self.corpus, self.run_dir = cfg, corpus, Path(run_dir)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.distributed = world_size > 1
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        t = cfg.train
        local = t.batch_size // world_size
        self.micro_batch_size = t.micro_batch_size or local
        self.accum = local // self.micro_batch_size

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.enc_cfg = dataclasses.replace(cfg.model, vocab_size=corpus.vocab_size,
                                           pad_id=corpus.special_ids["pad"])
        self.model = Data2Vec(self.enc_cfg, cfg.recipe).to(self.device)
        self.model.train()
        self.student = self.model.student
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = DDP(self.model.student, device_ids=ids)
        self.optimizer = build_optimizer(self.model.student, cfg.optim, self.device)
        total = cfg.optim.total_steps or t.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, total))
        torch.manual_seed(t.seed + 1000 * rank + 1)  # dropout differs between ranks

        use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        self.step, self.epoch, self.position = 0, 0, 0
        self.resumed_from = None
        n = self.model.student.encoder.num_params()
        T, C, L = cfg.data.seq_len, self.enc_cfg.hidden_size, self.enc_cfg.num_layers
        # student fwd+bwd 6N, teacher fwd 2N, attention 12·L·T·C (student) + 4·L·T·C (teacher)
        self.flops_per_token = 8 * n + 16 * L * T * C
        self.peak = peak_flops(self.device)
        self._tb = None

    # ------------------------------------------------------------------ data
    def loader(self):
        t, d, r = self.cfg.train, self.cfg.data, self.cfg.recipe
        return build_dataloader(
            self.corpus, seq_len=d.seq_len, micro_batch_size=self.micro_batch_size,
            global_batch_size=t.batch_size, masking=MaskingConfig("span", r.mask_prob, r.mask_span),
            block_mode=d.block_mode, seed=t.seed, epoch=self.epoch, start=self.position,
            rank=self.rank, world_size=self.world_size, num_workers=d.num_workers)

    def batches(self):
        """Endless stream of per-step lists of micro-batches, across epochs."""
        while True:
            loader = self.loader()
            steps = (len(loader.sampler) // (self.micro_batch_size * self.accum))
            it = iter(loader)
            for _ in range(steps):
                yield [next(it) for _ in range(self.accum)]
            del it, loader
            self.epoch, self.position = self.epoch + 1, 0

    # ------------------------------------------------------------------ one update
    def _to_device(self, mb: dict) -> dict:
        nb = self.device.type == "cuda"
        return {k: (v.to(self.device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in mb.items()}

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer update over this rank's micro-batches. Returns global metrics as
        tensors (reading them is the caller's choice, so steps need not sync)."""
        count = torch.tensor([float(sum(int(mb["mask"].sum()) for mb in micro_batches))], device=self.device)
        if self.distributed:
            dist.all_reduce(count)
        denom = count.clamp_min(1.0)
        loss_sum = torch.zeros((), device=self.device)
        tvar = torch.zeros((), device=self.device)
        pvar = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            pad = mb["padding_mask"] if bool(mb["padding_mask"].any()) else None  # checked on the CPU copy
            mb = self._to_device(mb)
            pad = mb["padding_mask"] if pad is not None else None
            last = i == len(micro_batches) - 1
            sync = self.student.no_sync() if self.distributed and not last else contextlib.nullcontext()
            with sync, self.autocast:
                target = self.model.targets(mb["input_ids"], pad, mb["mask"])
                pred = self.student(mb["masked_input_ids"], pad, mb["mask"])
                loss = self.model.loss_sum(pred, target)
            # DDP averages gradients over ranks; the loss is already normalised globally
            (loss * (self.world_size / denom)).backward()
            tv, pv = self.model.stats(pred, target)
            loss_sum += loss.detach()
            tvar += tv
            pvar += pv
        if self.cfg.optim.clip_norm > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.student.parameters(), self.cfg.optim.clip_norm)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in self.model.student.parameters() if p.grad is not None])
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        decay = self.cfg.recipe.decay_at(self.step)
        self.model.ema_step(decay)  # exactly one EMA step per optimizer update
        self.step += 1
        self.position += self.cfg.train.batch_size
        stats = torch.stack([loss_sum, tvar / len(micro_batches), pvar / len(micro_batches)])
        if self.distributed:
            stats = torch.cat([stats[:1], stats[1:] / self.world_size])
            dist.all_reduce(stats)
        return {"loss": stats[0] / denom[0], "target_var": stats[1], "pred_var": stats[2],
                "grad_norm": gnorm.detach(), "lr": lr, "ema_decay": decay, "masked": count[0]}

    # ------------------------------------------------------------------ checkpoints
    def _barrier(self):
        if self.distributed:
            dist.barrier()

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                "position": self.position, "world_size": self.world_size, "config": self.cfg.to_dict(),
                "encoder_config": dataclasses.asdict(self.enc_cfg)}

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.step, self.state() if self.rank == 0 else None,
                                    rank=self.rank, barrier=self._barrier, keep_last=self.cfg.train.keep_last)

    def load(self, path: Path) -> None:
        state = ckpt.load_state(path, self.device)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            from .errors import UsageError

            first = str(err).strip().splitlines()[1] if len(str(err).splitlines()) > 1 else str(err)
            raise UsageError(f"{path}: the checkpoint's model does not fit this config ({first.strip()}); "
                             f"resume with the config it was saved with ({path.parent.parent}/config.json)") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.resumed_from = path
        rng = ckpt.load_rng(path, self.rank) if state.get("world_size") == self.world_size else None
        if rng is not None:
            ckpt.set_rng_state(rng)
        else:
            torch.manual_seed(self.cfg.train.seed + 1000 * self.rank + 1 + self.step)

    def init_from(self, path) -> None:
        """Warm start: a local Hugging Face Data2VecTextModel/RobertaModel into student and teacher."""
        from .errors import UsageError
        from .export import check_hf_fits, read_hf_model

        config, weights = read_hf_model(path)
        check_hf_fits(config, self.enc_cfg, path)
        encoder = self.model.student.encoder
        missing = sorted(set(encoder.state_dict()) - set(weights))
        if missing:
            raise UsageError(f"--init-from {path}: lacks {len(missing)} encoder weight(s), e.g. {missing[0]}")
        try:
            encoder.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise UsageError(f"--init-from {path}: weights do not fit ({str(err).splitlines()[-1].strip()})") from None
        with torch.no_grad():
            for t, s in zip(self.model.teacher.parameters(), encoder.encoder.layer.parameters()):
                t.copy_(s)

    def export_encoder(self) -> Path:
        """Single-file export of the student encoder for ``d2v_fast.load_pretrained``."""
        path = self.run_dir / "encoder.pt"
        ckpt.atomic_torch_save({"format": "d2v_fast.encoder", "encoder_config": dataclasses.asdict(self.enc_cfg),
                                "state_dict": self.model.student.encoder.state_dict(), "step": self.step}, path)
        return path

    # ------------------------------------------------------------------ the loop
    def _log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed
                self._tb = False
        if self._tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def truncate_metrics(self) -> None:
        """After a resume, drop records of steps that will be run again."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank == 0 and path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a crash
            path.write_text("".join(l + "\n" for l in keep))

    def fit(self) -> list[dict]:
        t = self.cfg.train
        bar = None
        if self.rank == 0 and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc="pretrain", unit="step",
                       file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        history = []
        tokens_per_step = t.batch_size * self.cfg.data.seq_len
        window_t0, window_steps = time.perf_counter(), 0
        last_saved = self.step if self.resumed_from is not None else None
        stream = self.batches()
        try:
            while self.step < t.max_steps:
                metrics = self.train_step(next(stream))
                window_steps += 1
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - window_t0
                    tps = tokens_per_step * window_steps / dt
                    rec = {"step": self.step, **{k: float(v) for k, v in metrics.items()},
                           "tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world_size,
                           "epoch": self.epoch}
                    if self.peak:
                        rec["mfu"] = tps / self.world_size * self.flops_per_token / self.peak
                    history.append(rec)
                    if self.rank == 0:
                        self._log(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                    self._guard(rec)
                    window_t0, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.save()
                    last_saved = self.step
            if last_saved != self.step:
                self.save()
            if self.rank == 0:
                self.export_encoder()
        finally:
            if bar is not None:
                bar.close()
            if self._tb:
                self._tb.close()
        return history

    def _guard(self, rec: dict) -> None:
        t = self.cfg.train
        if self.step < t.collapse_warmup:
            return
        if rec["target_var"] < t.min_target_var:
            raise CollapseError(f"representation collapse at step {self.step}: target_var "
                                f"{rec['target_var']:.4g} < {t.min_target_var} (--train.min_target_var); "
                                f"lower --optim.lr or raise --recipe.ema_decay, then resume from an earlier checkpoint")
        if rec["pred_var"] < t.min_pred_var:
            raise CollapseError(f"representation collapse at step {self.step}: pred_var "
                                f"{rec['pred_var']:.4g} < {t.min_pred_var} (--train.min_pred_var); "
                                f"lower --optim.lr or raise --recipe.ema_decay, then resume from an earlier checkpoint")
