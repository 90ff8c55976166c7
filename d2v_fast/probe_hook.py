"""The trainer's probe hook (``--train.probe_every N``): the linear probe of the student
encoder as it is, logged to the metrics, without a random-init floor; see docs/probe.md."""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict


class ProbeHook:
    """The trainer's probe during training (mixed into ``Trainer``)."""

    def probe(self) -> dict | None:
        """Linear probe (``d2v_fast.linear_probe``, no random-init floor) of the student encoder as
        it is now; rank 0 logs ``probe_accuracy``/``probe_macro_f1`` to metrics.jsonl and
        returns the result. Collective under FSDP (the weights are gathered). It draws no
        random numbers and leaves the encoder in training mode, so probing does not change
        the run."""
        from .modalities.text import load_task, probe_encoder

        if not self.modality.has_probe:
            return None
        if self.fsdp:
            full = get_model_state_dict(self.model, options=self._FULL)
            if self.rank != 0:
                return None
            encoder = self.modality.build_encoder(self.enc_cfg)
            encoder.load_state_dict({k[len("student.encoder."):]: v for k, v in full.items()
                                     if k.startswith("student.encoder.")})
            encoder.to(self.device)
        elif self.rank != 0:
            return None
        else:
            encoder = self.model.student.encoder
        if getattr(self, "_probe_inputs", None) is None:
            self._probe_inputs = (load_task(self.cfg.train.probe_task), self.corpus.tokenizer())
        task, tokenizer = self._probe_inputs
        # eager even with compiled blocks: eval-mode, variable-length batches would spend the
        # recompile budget, and CUDA graphs (blocks-cudagraphs) would replay outside a step
        with torch.compiler.set_stance("force_eager"):
            result = probe_encoder(encoder, tokenizer, task, floor_inits=0, device=self.device)
        self._log({"step": self.step, "probe_accuracy": result["accuracy"], "probe_macro_f1": result["macro_f1"],
                   "probe_s": result["seconds"]})
        return result
