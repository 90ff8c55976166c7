"""The trainer's automatic micro-batch size (``--train.micro_batch_size 0`` on a GPU): the
largest divisor of a rank's share of the batch whose trial forward and backward, on the run's
first real micro-batch, fits in the device's memory with the optimizer's state counted (the
smallest over ranks). A trial leaves no trace: RNG states forked, gradients dropped."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


def largest_fitting_divisor(local: int, fits) -> int:
    """The largest divisor ``m`` of ``local`` with ``fits(m)``, trying them from the largest
    down; 1 when none fits (the first step then reports the out-of-memory error itself)."""
    for m in sorted((d for d in range(1, local + 1) if local % d == 0), reverse=True):
        if fits(m):
            return m
    return 1


class MicroBatchSearch:
    """The trainer's micro-batch search (mixed into ``Trainer``)."""

    def trial_step(self, micro_batch_size: int) -> int | None:
        """Forward and backward of one real micro-batch of ``micro_batch_size`` (the run's first)
        that leaves no trace: RNG states forked, gradients dropped, no optimizer or EMA step.
        Returns the peak device memory in bytes it needed, counting the optimizer state the
        first update will allocate (None on the CPU, which has no such counter); raises
        ``torch.OutOfMemoryError`` when it does not fit."""
        cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, num_workers=0))
        loader = self.modality.loader(self.corpus, cfg, micro_batch_size=micro_batch_size, epoch=0, start=0,
                                      rank=self.rank, world_size=self.world_size)
        mb = self._to_device(next(iter(loader)))
        del loader
        student = self.model.student  # the bare module: no DDP hooks, no collectives
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            # eager even with --train.compile blocks: a compile per trial size would spend the
            # recompile budget before the run's own size (and eager memory is the safe bound)
            with torch.random.fork_rng(devices=[self.device] if cuda else []), \
                    torch.compiler.set_stance("force_eager"):
                with self.autocast(), self.attention():
                    pred, teacher_input = student(mb)
                    target = self.model.targets(mb, teacher_input)
                    loss = self.model.loss_sum(pred, target, mb)
                loss.backward()
                del pred, teacher_input, target, loss
            if not cuda:
                return None
            peak = torch.cuda.max_memory_allocated(self.device)
            if not self.optimizer.state:  # AdamW's two moments, allocated at the first update
                peak += 2 * sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
            return peak
        finally:
            for p in student.parameters():
                p.grad = None
            del mb
            if cuda:
                torch.cuda.empty_cache()

    def fit_micro_batch(self, local: int, budget: float = 0.9) -> int:
        """The largest divisor of this rank's share ``local`` whose ``trial_step`` fits in
        ``budget`` of the device's memory (the smallest on every rank when distributed)."""
        total = torch.cuda.get_device_properties(self.device).total_memory

        def fits(m: int) -> bool:
            try:
                return self.trial_step(m) <= budget * total
            except torch.OutOfMemoryError:
                return False

        chosen = largest_fitting_divisor(local, fits)
        if self.distributed:
            t = torch.tensor([chosen], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)  # a divisor of the same share on every rank
            chosen = int(t)
        return chosen
