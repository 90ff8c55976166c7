"""The trainer's warm start (``--init-from``): a local Hugging Face model directory of the
run's modality read into the student's encoder, the teacher starting as the same weights."""
from __future__ import annotations

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


class WarmStart:
    """The trainer's warm start (mixed into ``Trainer``)."""

    def init_from(self, path) -> None:
        """Warm start: a local Hugging Face model directory of this modality (e.g.
        Data2VecTextModel/RobertaModel) into the student's encoder; the teacher starts as the
        same weights."""
        from .errors import UsageError

        config, weights = self.modality.read_hf(path)
        self.modality.check_hf_fits(config, self.enc_cfg, path)
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        prefix = "student.encoder."
        mine = [k for k in full if k.startswith(prefix)]
        missing = sorted(k[len(prefix):] for k in mine if k[len(prefix):] not in weights)
        if missing:
            raise UsageError(f"--init-from {path}: lacks {len(missing)} encoder weight(s), e.g. {missing[0]}")
        for k in mine:
            full[k] = weights[k[len(prefix):]]
        for k in [k for k in full if k.startswith("teacher.")]:
            full[k] = weights[self._encoder_name_of_teacher_key(k[len("teacher."):])]
        self._set_model_state(full, f"--init-from {path}")

    def _encoder_name_of_teacher_key(self, key: str) -> str:
        """The student-encoder state-dict name that teacher key ``key`` averages: the teacher is a
        copy of ``ema_source()``, which is a module of the encoder or a container of several."""
        paths = {id(m): n for n, m in self.model.student.encoder.named_modules()}
        source = self.model.student.ema_source()
        join = lambda prefix, rest: f"{prefix}.{rest}" if prefix else rest
        if id(source) in paths:
            return join(paths[id(source)], key)
        child, rest = key.split(".", 1)
        return join(paths[id(getattr(source, child))], rest)
