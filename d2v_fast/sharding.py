"""The trainer's FSDP2 sharding (``--parallel fsdp``): every encoder block its own unit,
student and teacher alike, the student the root, and the parts of a teacher that averages
more than the blocks units of their own; see docs/reliability.md."""
from __future__ import annotations

import torch


class Sharding:
    """The trainer's FSDP2 sharding (mixed into ``Trainer``)."""

    def _shard(self, use_bf16: bool) -> None:
        """FSDP2: every encoder block is its own unit (student and teacher alike) and the
        student the root, whose parameters (embeddings, head) stay gathered from its forward
        to its backward, which is when the teacher borrows the embeddings. Checkpoints hold
        full state dicts, the same files as with DDP: they resume at any world size and with
        either --parallel."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16 \
            else MixedPrecisionPolicy()
        student = self.model.student
        # found before the student is sharded: fully_shard changes its blocks' class (FSDPLayer)
        teacher_blocks = self._teacher_blocks()
        for layer in student.blocks():
            fully_shard(layer, mp_policy=mp)
        fully_shard(student, mp_policy=mp)
        in_blocks = {id(p) for b in teacher_blocks for p in b.parameters()}
        outside = any(id(p) not in in_blocks for p in self.model.teacher.parameters())
        # A teacher that averages more than the blocks is sharded too, so those parameters are
        # split as the student's (each on dim 0) for the EMA; a unit's forward (not its other
        # methods) gathers them. The whole encoder (images) is one unit; a container without a
        # forward of its own (speech: a ModuleDict of the encoder LayerNorm, the positional conv
        # and the blocks) gives one unit per part outside the blocks, each called as a module.
        # (found before the blocks are sharded: sharding replaces their parameters)
        self._teacher_roots = []
        if outside:
            teacher = self.model.teacher
            if type(teacher).forward is not torch.nn.Module.forward:
                self._teacher_roots = [teacher]
            else:
                self._teacher_roots = [m for m in teacher.children()
                                       if any(id(p) not in in_blocks for p in m.parameters())]
                for part in self._teacher_roots:
                    if type(part).forward is torch.nn.Module.forward:
                        raise NotImplementedError(f"--parallel fsdp: the teacher's {type(part).__name__} holds "
                                                  f"parameters outside the blocks but has no forward to gather them")
        for layer in teacher_blocks:
            fully_shard(layer, mp_policy=mp)
        for part in self._teacher_roots:
            fully_shard(part, mp_policy=mp)
