"""The training loop: micro-batching with gradient accumulation, DDP/FSDP2, bf16 autocast on
GPU, AdamW with warmup + cosine, clipping, one EMA step per optimizer update, metrics,
checkpoints and the collapse guard. It knows no modality: the corpus, loader, student,
FLOP count and Hugging Face interop come from ``d2v_fast.modalities``."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from . import ops
from .autobatch import MicroBatchSearch
from .config import Config
from .metrics import Metrics
from .modalities import get_modality
from .probe_hook import ProbeHook
from .recipes import build_model
from .schedule import build_optimizer, lr_schedule, peak_flops
from .sharding import Sharding
from .testing_hooks import crash_at_step, inject_nan_attempts
from .warmstart import WarmStart

@dataclasses.dataclass
class InFlight:
    """An update whose finite flag is on its way to the host: the event recorded after the
    flag's copy was queued (None off CUDA), and the update's attempt number."""

    event: object
    attempt: int


class CollapseError(RuntimeError):
    pass


class NonFiniteError(RuntimeError):
    pass


def attention_backend(name: str, device: torch.device, dtype: torch.dtype):
    """A factory of contexts that pin SDPA to one backend (``--train.attention``), or of null
    contexts for ``auto``. A backend this device cannot run is refused now, in one line,
    rather than at the first step."""
    if name == "auto":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .errors import UsageError

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    q = torch.zeros(1, 2, 8, 64, device=device, dtype=dtype)
    try:
        with sdpa_kernel(backend), torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--train.attention {name}: not available on {device.type} with {dtype} ({first}); "
                         f"use --train.attention auto") from None
    return lambda: sdpa_kernel(backend)


class Trainer(MicroBatchSearch, Sharding, WarmStart, Metrics, ProbeHook):
    """The loop and its state; its side jobs are the mixins (``autobatch.py``, ``sharding.py``,
    ``warmstart.py``, ``metrics.py``, ``probe_hook.py``)."""

    def __init__(self, cfg: Config, corpus, run_dir: Path, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.cfg, self.corpus, self.run_dir = cfg, corpus, Path(run_dir)
        self.modality = get_modality(cfg.modality)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.distributed = world_size > 1
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        t = cfg.train
        local = t.batch_size // world_size
        self.micro_batch_size = t.micro_batch_size or local
        self.accum = local // self.micro_batch_size

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.enc_cfg = self.modality.encoder_config(cfg, corpus)
        self.model = build_model(self.enc_cfg, cfg.recipe, cfg.modality).to(self.device)
        self._teacher_block_list = None
        self._teacher_blocks()
        self.model.train()
        use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and self.device.type == "cuda")
        self.fsdp = self.distributed and t.parallel == "fsdp"
        if self.fsdp:  # layer drop: every rank skips the same blocks (reseeded each update, below)
            self.model.student.layerdrop_generator = torch.Generator()
        ops.set_kernels(t.kernels)
        self.student = self.model.student
        self.switches = self.effective_switches(cfg, use_bf16, self.fsdp)
        if self.switches["fused_qkv"]:
            from .models.encoder import fuse_qkv_

            fuse_qkv_([*self.model.student.blocks(), *self._teacher_blocks()])
        self._teacher_shadow = self._student_shadow = None
        self._ema_flat = None  # (teacher, student) flat buffers: the EMA reads them, not 2 x P parameters
        if self.fsdp:
            self._shard(use_bf16)
        else:
            # Teacher blocks and student blocks each in one flat buffer: the EMA is one launch.
            teacher_flat = ops.flatten_params_(self.model.teacher)
            if self.switches["bf16_teacher"]:
                from .models.encoder import shadow_linears_

                self._teacher_shadow = shadow_linears_(self.model.teacher, teacher_flat, torch.bfloat16)
            self._ema_flat = (teacher_flat, ops.flatten_params_(self.model.student.ema_source()))
            if self.switches["bf16_student"]:  # bf16 copies of the student's block weights, kept by the update
                from .models.encoder import shadow_linears_

                self._student_shadow = shadow_linears_(self.model.student.ema_source(), self._ema_flat[1],
                                                       torch.bfloat16, buffers=False, dual_norms=False)
            if self.distributed:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.student = DDP(self.model.student, device_ids=ids)
        # blocks-cudagraphs: on a GPU each compiled block also runs as a CUDA graph (one launch
        # for its forward, one for its backward), for steps whose GPU waits on Python's launches
        self.cudagraphs = t.compile == "blocks-cudagraphs" and self.device.type == "cuda"
        if t.compile in ("blocks", "blocks-cudagraphs"):
            # Each block compiled in place (state_dict names unchanged): inductor fuses the
            # residual + dropout + LayerNorm and GELU chains that eager runs as separate kernels.
            mode = "reduce-overhead" if self.cudagraphs else None
            for layer in [*self.model.student.blocks(), *self._teacher_blocks()]:
                layer.compile(dynamic=False, mode=mode)
        self.optimizer = build_optimizer(self.model.student, cfg.optim)
        if self.switches["skip_on_device"] and not self.optimizer.defaults.get("fused"):
            self.switches["skip_on_device"] = False  # this device or dtype has no fused AdamW (found_inf)
        self._flag_host = torch.zeros(1, dtype=torch.bool, pin_memory=self.device.type == "cuda") \
            if self.switches["skip_on_device"] else None
        self._pending: InFlight | None = None  # the update whose finite flag the host has not read yet
        self.skip_notes: list[tuple[int, int]] = []  # (attempt, skips in a row) found, for the loop to report
        total = cfg.optim.total_steps or t.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg.optim, total))
        torch.manual_seed(t.seed + 1000 * rank + 1)  # dropout differs between ranks

        self.use_bf16 = use_bf16
        # a factory: nested uses (--train.cast_once) need their own context objects. Under stack
        # graphs autocast keeps no cache of cast weights (a cached copy recorded in a graph would
        # be freed when the region ends while the graph still writes it).
        cache = t.compile != "stack-cudagraphs"
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache)) \
            if use_bf16 else contextlib.nullcontext
        self.attention = attention_backend(t.attention, self.device, torch.bfloat16 if use_bf16 else torch.float32)
        self.step, self.epoch, self.position = 0, 0, 0
        self.attempts, self.skipped, self.consecutive_skips = 0, 0, 0
        self.resumed_from = None
        self.stop_requested = False
        self.data_problem: str | None = None  # set by the background corpus check
        self._inject_nan = inject_nan_attempts()
        self._crash_at = crash_at_step()
        self._control = None
        self.flops_per_token = self.modality.flops_per_unit(cfg)
        self.peak = peak_flops(self.device)
        self._tb = None
        # --train.micro_batch_size 0 on a GPU: the largest micro-batch whose step fits (not
        # under FSDP, where a trial step would need every rank's collectives in step)
        self.micro_batch_auto = t.micro_batch_size == 0 and self.device.type == "cuda" and not self.fsdp
        if self.micro_batch_auto:
            self.micro_batch_size = self.fit_micro_batch(local)
            self.accum = local // self.micro_batch_size
        # --train.compile stack-cudagraphs: the teacher's and the student's encoder stacks replayed
        # as CUDA graphs on a GPU (after the micro-batch search, whose trial shapes would each
        # record graphs); elsewhere the stacks run eager
        self.stack_graphs: list = []
        if t.compile == "stack-cudagraphs":
            from .graphs import CudaCapture, refuse_several_processes

            refuse_several_processes(world_size)
            if self.device.type == "cuda":
                self.attach_stack_graphs(CudaCapture)

    def attach_stack_graphs(self, capture) -> None:
        """Run the teacher's and the student's encoder stacks from graphs recorded by
        ``capture`` (``d2v_fast.graphs``: a class, instantiated once per stack, as
        ``CudaCapture`` on a GPU; or one object for both, as tests pass an ``EagerReplay``),
        one set per shape bucket of ``--train.graph_bucket``, during ``train_step`` only."""
        from .graphs import StackGraphs, attach
        from .models.blocks import run_blocks_eager

        self.stack_graphs = []
        # flash attention takes no mask: lengths are then recorded as they come, never padded
        granule = 0 if self.cfg.train.attention == "flash" else self.cfg.train.graph_bucket
        for name, blocks in (("student", list(self.model.student.blocks())), ("teacher", self._teacher_blocks())):
            graphs = StackGraphs(blocks, run_blocks_eager, granule=granule,
                                 capture=capture() if isinstance(capture, type) else capture, name=name)
            attach(blocks, graphs)
            self.stack_graphs.append(graphs)

    # ------------------------------------------------------------------ the teacher's blocks
    def _teacher_blocks(self) -> list[torch.nn.Module]:
        """The teacher's copies of the student's blocks (the same block class, in order),
        found once, before FSDP gives the sharded blocks classes of their own."""
        if getattr(self, "_teacher_block_list", None) is None:
            kinds = {type(b) for b in self.model.student.blocks()}
            self._teacher_block_list = [m for m in self.model.teacher.modules() if type(m) in kinds]
        return self._teacher_block_list

    # ------------------------------------------------------------------ data
    def loader(self):
        return self.modality.loader(self.corpus, self.cfg, micro_batch_size=self.micro_batch_size,
                                    epoch=self.epoch, start=self.position, rank=self.rank,
                                    world_size=self.world_size)

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

    def train_step(self, micro_batches: list[dict], stats: bool = True) -> dict:
        """One optimizer update over this rank's micro-batches. Returns global metrics as
        tensors (reading them is the caller's choice, so steps need not sync). ``stats``:
        also the loss and the collapse statistics (``target_var``, ``pred_var``), summed over
        ranks; the loop asks for them only on the updates it logs (some 20 ops and a
        collective fewer on the others)."""
        if self.switches["host_counts"]:  # each micro-batch's counts, summed once, used below and by its ops
            micro_batches = [self._with_host_counts(mb) for mb in micro_batches]
        count = torch.tensor([float(sum(mb["mask_rows"] if "mask_rows" in mb else int(mb["mask"].sum())
                                        for mb in micro_batches))])
        if self.switches["host_counts"] and self.device.type == "cuda":  # a pinned copy: no wait for the queue
            count = count.pin_memory()
        count = count.to(self.device, non_blocking=True)
        if self.distributed:
            dist.all_reduce(count)
        denom = count.clamp_min(1.0)
        loss_sum = tvar = pvar = torch.zeros((), device=self.device) if stats else None
        # --train.cast_once: one autocast region around every micro-batch of the update, so the
        # bf16 copies autocast makes of the student's fp32 weights (its cache lives until the
        # outermost region ends) are made once per update instead of once per micro-batch.
        # Backward runs with autocast off inside it, as it does outside.
        cast_once = self.switches["cast_once"]
        layerdrop_rng = self.model.student.layerdrop_generator
        if layerdrop_rng is not None:  # the same on every rank, and again after a resume
            layerdrop_rng.manual_seed(self.cfg.train.seed * 1_000_003 + self.attempts)
        for graphs in self.stack_graphs:  # the stacks' graphs replay inside an update only
            graphs.active = True
        try:
            with self.autocast() if cast_once else contextlib.nullcontext():
                for i, mb in enumerate(micro_batches):
                    loss, pred, target = self._micro_step(mb, i == len(micro_batches) - 1, denom, cast_once)
                    if stats:
                        tv, pv = self.model.stats(pred, target)
                        loss_sum, tvar, pvar = loss_sum + loss.detach(), tvar + tv, pvar + pv
        finally:
            for graphs in self.stack_graphs:
                graphs.active = False
        return self._finish_step(micro_batches, count, denom, loss_sum, tvar, pvar)

    def _micro_step(self, mb: dict, last: bool, denom: torch.Tensor, cast_once: bool):
        """Forward and backward of one micro-batch; returns (summed loss, predictions, targets)."""
        pad = mb.get("padding_mask")
        if pad is not None and not bool(pad.any()):  # checked on the CPU copy: no sync
            mb = dict(mb, padding_mask=None)
        if self.cudagraphs:  # a new iteration: the graphs' outputs of the last one are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        mb = self._to_device(mb)
        if self.fsdp:
            self.student.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext()
        else:
            sync = self.student.no_sync() if self.distributed and not last else contextlib.nullcontext()
        with sync, self.autocast(), self.attention():
            # student first: under FSDP its root forward unshards the embeddings the teacher shares
            pred, teacher_input = self.student(mb)
            target = self.model.targets(mb, teacher_input)
            if self.fsdp:  # each teacher block is its own FSDP root: free its gathered weights now
                for layer in self._teacher_blocks():
                    layer.reshard()
                for part in self._teacher_roots:
                    part.reshard()
            loss = self.model.loss_sum(pred, target, mb)
            if self.attempts + 1 in self._inject_nan:
                loss = loss * float("nan")
        # DDP averages gradients over ranks; the loss is already normalised globally
        with torch.autocast(self.device.type, enabled=False) if cast_once else contextlib.nullcontext():
            (loss * (self.world_size / denom)).backward()
        return loss, pred, target

    @staticmethod
    def _with_host_counts(mb: dict) -> dict:
        """``--train.host_counts``: the counts the step's masked gathers and target building
        would otherwise read back from the device to size their outputs (one sync each),
        taken from the micro-batch while it is still on the CPU: ``mask_rows``, the true
        entries of ``mask``, and ``kept``, the false entries of its first row (data2vec 2.0:
        every row of an unpadded batch keeps that many; a batch that sets it already wins)."""
        mask = mb["mask"]
        extra = {"mask_rows": int(mask.sum())}
        if "kept" not in mb and mask.dim() == 2 and len(mask):
            extra["kept"] = int((~mask[0]).sum())
        return {**mb, **extra}

    def _finish_step(self, micro_batches, count, denom, loss_sum, tvar, pvar) -> dict:
        """Clip, then the optimizer update and one EMA step (or the skip of a non-finite one)."""
        gnorm = self._clip()
        if hasattr(gnorm, "full_tensor"):  # a DTensor under FSDP
            gnorm = gnorm.full_tensor()
        deferred = self.switches["skip_on_device"]
        if deferred:
            # the last update's outcome, for this one's lr and EMA decay: its flag was copied before
            # this update's forward was queued, so reading it does not wait for this update's work
            self.settle()
        lr = self.scheduler.get_last_lr()[0]
        decay = self.cfg.recipe.decay_at(self.step)
        self.attempts += 1
        self.position += self.cfg.train.batch_size
        # Gradients are all-reduced, so every rank sees the same norm and takes the same branch.
        if deferred:
            self._update_on_device(gnorm, decay)
            finite = None  # known once settle() reads the flag: in the next update, or when the loop asks
        else:
            finite = bool(torch.isfinite(gnorm))
            if finite:
                self.optimizer.step()
                self._refresh_student_copy()
                self._ema(decay)  # exactly one EMA step per optimizer update
        if finite is not None:
            self._count(finite, self.attempts)
        self.optimizer.zero_grad(set_to_none=True)
        out = {"grad_norm": gnorm.detach(), "lr": lr, "ema_decay": decay, "masked": count[0],
               "skipped_steps": self.skipped, "finite": finite}
        if loss_sum is None:  # an update the loop does not log
            return out
        stats = torch.stack([loss_sum, tvar / len(micro_batches), pvar / len(micro_batches)])
        if self.distributed:
            stats = torch.cat([stats[:1], stats[1:] / self.world_size])
            dist.all_reduce(stats)
        return {"loss": stats[0] / denom[0], "target_var": stats[1], "pred_var": stats[2], **out}

    def _clip(self) -> torch.Tensor:
        """The gradients' global norm, and the clip to ``optim.clip_norm`` (when > 0). Outside
        FSDP, over the student's parameter list taken once (not a walk of its modules per update),
        with the ops ``clip_grad_norm_`` runs: one ``_foreach_norm``, the norm of the norms, one
        ``_foreach_mul_``; the same values bit for bit."""
        clip = self.cfg.optim.clip_norm
        params = getattr(self, "_clip_params", None)
        if params is None:
            params = [p for p in self.model.student.parameters() if p.requires_grad]
            plain = not self.fsdp and len({(p.device, p.dtype) for p in params}) == 1
            self._clip_params = params = params if plain else []
        if not params:  # FSDP's DTensors, or several devices or dtypes: torch groups them
            if clip > 0:
                return torch.nn.utils.clip_grad_norm_(self.model.student.parameters(), clip)
            return torch.nn.utils.get_total_norm([p.grad for p in self.model.student.parameters()
                                                  if p.grad is not None])
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        if clip > 0:
            torch._foreach_mul_(grads, torch.clamp(clip / (total + 1e-6), max=1.0))
        return total

    def _refresh_student_copy(self) -> None:
        """``--train.bf16_student``: the student blocks' bf16 copy follows their fp32 weights (one
        cast over the flat buffer per update, instead of two per Linear per forward)."""
        if self._student_shadow is not None:
            with torch.no_grad():
                self._student_shadow.copy_(self._ema_flat[1])

    def _ema(self, decay: float, skip: torch.Tensor | None = None) -> None:
        """One EMA step of the teacher: over the two flat buffers when the parameters live in
        them (one call, no per-parameter work on the host), else over the parameter pairs
        (FSDP's local shards); also writing the teacher's bf16 copy when it has one."""
        pairs = self._ema_flat if self._ema_flat is not None else self.model.ema_pairs()
        ops.ema_update_(*pairs, decay, skip=skip, shadow=self._teacher_shadow)

    @staticmethod
    def effective_switches(cfg: Config, use_bf16: bool, fsdp: bool) -> dict[str, bool]:
        """The step's performance switches as they apply to this run: each is on when asked
        for (the defaults ask for all) and the run can use it, off otherwise (the start-up line
        lists them). All compute the same update as with the switch off."""
        t = cfg.train
        return {"host_counts": t.host_counts,
                # fused AdamW's found_inf on sharded parameters is untried; the optimizer may
                # still turn it off (no fused AdamW on this device)
                "skip_on_device": t.skip_on_device and not fsdp,
                # FSDP casts the weights itself; stack graphs need autocast without its cast cache
                "cast_once": t.cast_once and use_bf16 and not fsdp and t.compile != "stack-cudagraphs",
                "bf16_teacher": t.bf16_teacher and use_bf16 and not fsdp,
                "bf16_student": t.bf16_student and use_bf16 and not fsdp,
                # bf16 only: in fp32 (the CPU's default) the one GEMM rounds differently from three,
                # and the CPU's recorded default jobs are kept bit for bit
                "fused_qkv": t.fused_qkv and use_bf16 and cfg.modality == "text"}

    def _count(self, finite: bool, attempt: int) -> None:
        """The host's side of an update's outcome: the schedule and the step count, or the skip
        (its attempt noted for the loop to report)."""
        if finite:
            self.scheduler.step()
            self.step += 1
            self.consecutive_skips = 0
        else:  # skip the update: weights, optimizer, schedule and teacher stay as they were
            self.skipped += 1
            self.consecutive_skips += 1
            self.skip_notes.append((attempt, self.consecutive_skips))

    def _update_on_device(self, gnorm: torch.Tensor, decay: float) -> None:
        """``--train.skip_on_device``: the skip of a non-finite update is decided on the device
        (fused AdamW's ``found_inf`` leaves weights, moments and its step count as they were;
        the EMA's store mask leaves the teacher), so the optimizer and the EMA are queued
        behind backward without waiting for it. The flag is copied to a pinned host buffer
        before they are queued; the host reads it later, in ``settle()``: by default in the
        next update, after that update's forward and backward are queued, when the copy has
        long landed. No wait inside an update, then; the schedule and the counters follow one
        update behind on the host, and the lr and EMA decay of the next update are still
        taken after the outcome is known (the same values as the host-side skip)."""
        finite_t = torch.isfinite(gnorm).reshape(())
        self._flag_host.copy_(finite_t.reshape(1), non_blocking=True)
        pending = self._flag_record()
        self.optimizer.found_inf = (~finite_t).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self._refresh_student_copy()  # a skipped update left the weights, so the copy stays right
        self._ema(decay, skip=~finite_t)
        self._pending = pending

    def _flag_record(self) -> "InFlight":
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return InFlight(event, self.attempts)

    def _flag_wait(self, pending: "InFlight") -> None:
        if pending.event is not None:
            pending.event.synchronize()

    @property
    def steps_ahead(self) -> int:
        """The step count with the update in flight (if any) counted as good."""
        return self.step + (self._pending is not None)

    def settle(self) -> bool | None:
        """Read the outcome of the update in flight (``--train.skip_on_device``) and count it:
        the step and schedule, or the skip (its attempt added to ``skip_notes``). Returns
        whether it was finite, or None when no update was in flight. The loop calls it when
        it acts on the step count (logging, probe, checkpoint, the end, a run of skips);
        checkpoints call it before taking the state."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        self._flag_wait(pending)
        finite = bool(self._flag_host[0])
        self._count(finite, pending.attempt)
        return finite

    # ------------------------------------------------------------------ checkpoints
    def _barrier(self):
        if self.distributed:
            dist.barrier()

    _FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def state(self) -> dict:
        """Full (unsharded) training state; collective under FSDP, complete on rank 0."""
        self.settle()
        return {"model": get_model_state_dict(self.model, options=self._FULL),
                "optimizer": get_optimizer_state_dict(self.model.student, self.optimizer, options=self._FULL),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                "position": self.position, "attempts": self.attempts, "skipped": self.skipped,
                "world_size": self.world_size, "parallel": self.cfg.train.parallel, "config": self.cfg.to_dict(),
                "corpus": {"path": str(self.modality.corpus_path(self.corpus)),
                           "fingerprint": self.modality.corpus_fingerprint(self.corpus)},
                "encoder_config": dataclasses.asdict(self.enc_cfg)}

    def save(self) -> Path:
        state = self.state()  # every rank takes part in gathering it
        return ckpt.save_checkpoint(self.run_dir, self.step, state if self.rank == 0 else None,
                                    rank=self.rank, barrier=self._barrier, keep_last=self.cfg.train.keep_last)

    def _set_model_state(self, full: dict, where) -> None:
        from .errors import UsageError

        try:
            set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError) as err:
            lines = [l.strip() for l in str(err).strip().splitlines() if l.strip()]
            raise UsageError(f"{where}: the weights do not fit this model ({lines[-1] if lines else err}); "
                             f"use the config they were trained with") from None
        self._refresh_student_copy()

    def load(self, path: Path) -> None:
        """Resume from a checkpoint directory. Its files are checked against this model (keys,
        shapes, dtypes, format version) and read as tensors and plain values: nothing in them runs."""
        from .errors import UsageError

        state = ckpt.load_checkpoint(
            path, model=ckpt.tensor_spec(self.model.state_dict()),
            # the optimizer's names: parameters (a fused qkv is one), not the state dict's HF names
            params={k: tuple(v.shape) for k, v in self.model.student.named_parameters()},
            scheduler=self.scheduler.state_dict())
        self._set_model_state(state["model"], path)
        try:
            set_optimizer_state_dict(self.model.student, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise UsageError(f"{Path(path) / ckpt.STATE_FILE}: the optimizer state does not fit this run "
                             f"({type(err).__name__}); use the config it was trained with") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.attempts, self.skipped = state["attempts"], state["skipped"]
        self.resumed_from = path
        rng = ckpt.load_rng(path, self.rank) if state.get("world_size") == self.world_size else None
        if rng is not None:
            ckpt.set_rng_state(rng)
        else:
            torch.manual_seed(self.cfg.train.seed + 1000 * self.rank + 1 + self.step)

    def export_encoder(self) -> Path:
        """The student encoder for ``d2v_fast.load_pretrained``: ``encoder.safetensors`` with
        ``encoder.json`` (config, step, checksum) beside it."""
        path = self.run_dir / ckpt.ENCODER_FILE
        self.settle()
        full = get_model_state_dict(self.model, options=self._FULL)
        if self.rank != 0:
            return path
        enc = {k[len("student.encoder."):]: v for k, v in full.items() if k.startswith("student.encoder.")}
        return ckpt.save_encoder(path, enc, dataclasses.asdict(self.enc_cfg), self.step, modality=self.cfg.modality)

    # ------------------------------------------------------------------ control
    # A signal repeated within this many seconds is the same request, reaching the worker
    # twice (a scheduler signalling every process of the job, and the launcher forwarding it).
    SAME_SIGNAL_S = 1.0

    def _signal(self, signum, frame) -> None:
        if self.stop_requested:  # a second signal: leave now
            if time.monotonic() - getattr(self, "_stop_signal_time", float("-inf")) < self.SAME_SIGNAL_S:
                return
            os._exit(128 + signum)
        self.stop_requested = True
        self._stop_signal_time = time.monotonic()
        if self.rank == 0:
            print(f"\n{signal.Signals(signum).name}: finishing this step, writing a checkpoint and stopping "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def verify_in_background(self) -> threading.Thread:
        """Full corpus check while training runs; a problem stops every rank at the next step."""
        from .errors import UsageError

        def work():
            try:
                self.modality.verify_corpus(self.corpus)
            except UsageError as err:
                self.data_problem = str(err)

        th = threading.Thread(target=work, name="d2v-verify-data", daemon=True)
        th.start()
        return th

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _agree(self) -> tuple[bool, str | None]:
        """All ranks agree on (stop requested anywhere, a data problem found anywhere) once
        per step, over a CPU (gloo) group so the GPU stream is not synchronised."""
        if not self.distributed:
            return self.stop_requested, self.data_problem
        if self._control is None:
            self._control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        flags = torch.tensor([float(self.stop_requested), float(self.data_problem is not None)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._control)
        problem = None
        if flags[1] > 0:
            msg = [self.data_problem]
            dist.broadcast_object_list(msg, src=0, group=self._control)
            problem = msg[0] or "a corpus check failed on another rank"
        return bool(flags[0]), problem

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict]:
        """Train until ``max_steps``; on SIGTERM/SIGINT finish the step, checkpoint, return."""
        from .errors import UsageError

        t = self.cfg.train
        unit = self.modality.unit  # what throughput counts: tokens, frames or patches
        bar = None
        if self.rank == 0 and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc="pretrain", unit="step",
                       file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        history = []
        window_t0, window_units = time.perf_counter(), 0
        last_saved = self.step if self.resumed_from is not None else None
        stream = self.batches()
        previous = self._install_signals()
        self.stopped_early = False
        try:
            while True:
                if self.steps_ahead >= t.max_steps:
                    self.settle()  # the last update's outcome: a skip means one more
                    self._report_skips(bar)
                    if self.step >= t.max_steps:
                        break
                micro_batches = next(stream)
                units = sum(self.modality.units(mb) for mb in micro_batches) * self.world_size
                # counting an update still in flight as good: were it skipped, this update lands
                # on a step that is not logged (the loop settles every update that could be)
                ahead = self.steps_ahead
                logs = (ahead + 1) % t.log_every == 0 or ahead + 1 >= t.max_steps  # if it is finite
                metrics = self.train_step(micro_batches, stats=logs)
                stop, problem = self._agree()
                if problem:
                    raise UsageError(problem)
                finite = metrics["finite"]
                if finite is None:  # in flight: settle it where the loop acts on the step count, and
                    # in a run of skips (or at a limit of 1) so that the limit stops the same attempt
                    ahead = self.steps_ahead
                    if (stop or self.consecutive_skips or t.max_skipped_steps <= 1 or ahead % t.log_every == 0
                            or ahead >= t.max_steps
                            or (t.probe_every and ahead % t.probe_every == 0)
                            or (t.ckpt_every and ahead % t.ckpt_every == 0) or ahead == self._crash_at):
                        finite = metrics["finite"] = self.settle()
                self._report_skips(bar)
                if self.consecutive_skips >= t.max_skipped_steps:
                    self.save()  # the weights are still those of the last good update
                    raise NonFiniteError(
                        f"{self.consecutive_skips} updates in a row had non-finite loss or gradients "
                        f"(--train.max_skipped_steps {t.max_skipped_steps}); the weights of step {self.step}, "
                        f"before the problem, are saved in {self.run_dir / 'checkpoints'}; lower --optim.lr "
                        f"or check the data, then resume")
                window_units += units
                if self._crash_at is not None and self.step == self._crash_at:
                    marker = self.run_dir / f".crashed-at-{self._crash_at}"
                    if not marker.exists():
                        marker.write_text("")
                        os._exit(17)
                if finite and (self.step % t.log_every == 0 or self.step == t.max_steps):
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - window_t0
                    tps = window_units / dt
                    metrics["skipped_steps"] = self.skipped
                    rec = {"step": self.step, **{k: float(v) for k, v in metrics.items() if k != "finite"},
                           f"{unit}_per_s": tps, f"{unit}_per_s_per_device": tps / self.world_size,
                           "epoch": self.epoch}
                    if unit != "tokens":  # the old name of those two, kept for one release
                        rec.update(tokens_per_s=tps, tokens_per_s_per_device=tps / self.world_size)
                    if self.peak:
                        rec["mfu"] = tps / self.world_size * self.flops_per_token / self.peak
                    history.append(rec)
                    if self.rank == 0:
                        self._log(rec)
                    if bar is not None:
                        bar.set_postfix({"loss": f"{rec['loss']:.4f}", f"{unit}/s": f"{tps:,.0f}"}, refresh=False)
                    self._guard(rec)
                    window_t0, window_units = time.perf_counter(), 0
                if finite and t.probe_every and self.step % t.probe_every == 0:
                    self.probe()
                if bar is not None:  # the updates in flight counted as good; a skip found later takes one back
                    bar.update(self.steps_ahead - bar.n)
                if stop:
                    self.save()
                    self.stopped_early = True
                    return history
                if finite and t.ckpt_every and self.step % t.ckpt_every == 0 and last_saved != self.step:
                    self.save()
                    last_saved = self.step
            if last_saved != self.step:
                self.save()
            self.export_encoder()  # collective under FSDP
        finally:
            # the loader's workers are shut down now, also when an exception leaves: at exit they
            # would ignore multiprocessing's SIGTERM (they inherit the stop handler) and hang it
            stream.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
            if self._tb:
                self._tb.close()
        return history

    def _report_skips(self, bar) -> None:
        """Say which attempts ``settle()`` found skipped since the last call."""
        for attempt, in_a_row in self.skip_notes:
            if self.rank == 0 and bar is not None:
                bar.write(f"attempt {attempt}: non-finite loss or gradients, update skipped ({in_a_row} in a row)")
        self.skip_notes.clear()

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
