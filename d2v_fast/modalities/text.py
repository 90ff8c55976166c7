"""Text: the RoBERTa-shaped encoder of ``Data2VecTextModel`` (``models/encoder.py``), BPE token
corpora (``data/``), span masks (data2vec) and random masks with clones (data2vec 2.0) made by
the C++ extension in the loader workers, and Hugging Face ``Data2VecTextModel`` interop."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import UsageError
from ..models.encoder import ENCODER_PRESETS, Encoder, EncoderConfig, run_layers
from ..recipes.data2vec import Student
from ..recipes.data2vec2 import Decoder, Student2, kept_layout
from . import Modality


class TextStudent(Student):
    """data2vec (v1) on text: the student reads ``<mask>`` tokens; the teacher (EMA of the
    transformer blocks) shares the student's embeddings, computed again for the unmasked
    sentence without dropout. Where we differ from the public code on purpose: there the
    teacher's input holds only the masked positions' original tokens, with padding
    elsewhere; we feed the full unmasked sentence, as the paper describes (arXiv 2202.03555 §3)."""

    def __init__(self, enc: EncoderConfig, cfg):
        super().__init__(Encoder(enc), cfg, enc.hidden_size, enc.init_std)

    def blocks(self):
        return self.encoder.encoder.layer

    def ema_source(self):
        return self.encoder.encoder.layer

    def masked_hidden(self, batch: dict) -> torch.Tensor:
        return self.encoder.encode(batch["masked_input_ids"], batch.get("padding_mask"))[0]

    @torch.no_grad()
    def teacher_layers(self, teacher, batch, teacher_input):
        h = self.encoder.embeddings(batch["input_ids"])
        return run_layers(teacher, h, batch.get("padding_mask"), collect_ffn=True)[1]


class TextStudent2(Student2):
    """data2vec 2.0 on text (fairseq ``config/v2/base_text_only_task.yaml``): embeddings
    (positions included, then dropout) are computed once for the whole sequence and only
    the kept tokens of every clone are gathered into the encoder (``[B*clones, T_kept, C]``;
    exact mask counts make every unpadded row the same length, so no padding mask is needed
    and the flash backend applies). The teacher (EMA of the encoder blocks) runs once per
    sample on that same embedding tensor, detached (the published ``ema_encoder_only`` path
    feeds the student's ``local_features``): no second embedding pass."""

    def __init__(self, enc: EncoderConfig, cfg):
        super().__init__(Encoder(enc), cfg)
        self.decoder = Decoder(enc.hidden_size, cfg.decoder_layers, cfg.decoder_kernel, cfg.head_hidden_mult,
                               enc.layer_norm_eps, enc.init_std, cfg.decoder_dim)

    def blocks(self):
        return self.encoder.encoder.layer

    def ema_source(self):
        return self.encoder.encoder.layer

    def encode_visible(self, batch: dict):
        input_ids, padding_mask, mask = batch["input_ids"], batch.get("padding_mask"), batch["mask"]
        B = input_ids.shape[0]
        R = mask.shape[0]
        clones = R // B
        x = F.dropout(self.encoder.embeddings(input_ids), self.encoder.config.dropout, self.training)
        C = x.shape[-1]
        keep = ~mask
        if padding_mask is None:  # every row keeps the same count: one fused gather
            k = batch["kept"] if "kept" in batch else int(keep[0].sum())
            h, _ = run_layers(self.blocks(), ops.masked_gather(x, keep, R * k).view(R, k, C), None)
            return h, None, keep, x.detach()
        keep = keep & ~padding_mask.repeat_interleave(clones, 0)
        order, kpad, k = kept_layout(keep)
        src = x.repeat_interleave(clones, 0)
        h, _ = run_layers(self.blocks(), torch.gather(src, 1, order[..., None].expand(R, k, C)), kpad)
        return h, kpad, keep, x.detach()

    @torch.no_grad()
    def teacher_layers(self, teacher, batch, teacher_input):
        return run_layers(teacher, teacher_input, batch.get("padding_mask"), collect_ffn=True)[1]


def masking_for(recipe):
    from ..data.dataset import MaskingConfig

    if recipe.name == "data2vec2":
        return MaskingConfig("random", recipe.mask_prob, clones=recipe.clones)
    return MaskingConfig("span", recipe.mask_prob, recipe.mask_span)


def model_flops_per_token(cfg) -> float:
    """Model FLOPs of one training step per input token (docs/design.md#flops), N = non-embedding
    encoder parameters. data2vec: student fwd+bwd 6N, teacher fwd 2N, attention
    12·L·T·C (student) + 4·L·T·C (teacher). data2vec2: the teacher as above, the student
    on clones·(1-p) of the tokens at length (1-p)·T, the conv decoder on every position of
    every clone and its projection on the masked ones."""
    m, r = cfg.model, cfg.recipe
    C, L, F_, T = m.hidden_size, m.num_layers, m.ffn_size, cfg.data.seq_len
    n = L * (4 * C * C + 2 * C * F_ + 9 * C + F_)
    if r.name != "data2vec2":
        return 8 * n + 16 * L * T * C
    D = r.decoder_dim or C
    head = r.head_hidden_mult * D * (D + C) if r.head_hidden_mult > 0 else D * C
    convs = r.decoder_kernel * (C * D + (r.decoder_layers - 1) * D * D)
    keep = 1 - r.mask_prob
    student = r.clones * keep * (6 * n + 12 * L * keep * T * C)
    decoder = r.clones * (6 * convs + r.mask_prob * 6 * head)
    return 2 * n + 4 * L * T * C + student + decoder


class TextModality(Modality):
    name = "text"
    unit = "tokens"
    model_config_class = EncoderConfig
    encoder_presets = ENCODER_PRESETS
    from_corpus = frozenset({"vocab_size", "pad_id"})
    has_probe = True

    @property
    def size_presets(self):
        from ..config import PRESETS

        return PRESETS

    @property
    def recipe_presets(self):
        from ..config import RECIPE_PRESETS

        return RECIPE_PRESETS

    # ---------------------------------------------------------------- config
    def validate(self, cfg) -> None:
        m, d = cfg.model, cfg.data

        def need(ok: bool, flag: str, value, fix: str):
            if not ok:
                raise UsageError(f"{flag} {value!r}: {fix}")

        need(3 <= d.seq_len, "--seq-len", d.seq_len, "must be at least 3")
        need(d.seq_len <= m.max_seq_len, "--seq-len", d.seq_len,
             f"longer than the position table (--model.max_seq_len {m.max_seq_len}); lower --seq-len "
             f"or raise --model.max_seq_len")
        need(d.block_mode in ("pack", "document"), "--data.block_mode", d.block_mode, "expected pack or document")

    def encoder_config(self, cfg, corpus) -> EncoderConfig:
        return dataclasses.replace(cfg.model, vocab_size=corpus.vocab_size, pad_id=corpus.special_ids["pad"])

    # ---------------------------------------------------------------- models
    def build_encoder(self, enc_cfg: EncoderConfig) -> Encoder:
        return Encoder(enc_cfg)

    def build_student(self, enc_cfg: EncoderConfig, recipe_cfg):
        return (TextStudent2 if recipe_cfg.name == "data2vec2" else TextStudent)(enc_cfg, recipe_cfg)

    def teacher_encoder_weights(self, student_encoder, teacher):
        """The teacher shares the student's embeddings and averages the blocks."""
        out = {k: v for k, v in student_encoder.items() if k.startswith("embeddings.")}
        out.update({f"encoder.layer.{k}": v for k, v in teacher.items()})
        return out

    # ---------------------------------------------------------------- data
    def open_corpus(self, cfg, *, rank: int = 0):
        from ..data.builtin import builtin_corpus
        from ..data.corpus import open_corpus

        return open_corpus(cfg.data.path) if cfg.data.path else open_corpus(builtin_corpus(progress=rank == 0))

    def corpus_fingerprint(self, corpus) -> str:
        """A corpus's content: its preparation fingerprint and tokenizer checksum."""
        return f"{corpus.meta.get('source', {}).get('fingerprint', '')}:{corpus.meta['tokenizer']['sha256']}"

    def verify_corpus(self, corpus) -> None:
        from ..data.corpus import verify_corpus

        verify_corpus(corpus)

    def prepare_run_dir(self, corpus, out: Path) -> None:
        import shutil

        tok = Path(out) / "tokenizer"  # beside the checkpoints, so export needs no corpus
        if not tok.is_dir():
            shutil.copytree(corpus.tokenizer_dir, tok)

    def resolved_config(self, cfg, corpus) -> dict:
        resolved = cfg.to_dict()
        resolved["model"]["vocab_size"] = corpus.vocab_size
        return resolved

    def describe(self, cfg, corpus) -> str:
        return (f"vocabulary {corpus.vocab_size:,}; global batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens; "
                f"corpus {corpus.path}")

    def loader(self, corpus, cfg, *, micro_batch_size, epoch, start, rank, world_size):
        from ..data.dataset import build_dataloader

        t, d = cfg.train, cfg.data
        return build_dataloader(
            corpus, seq_len=d.seq_len, micro_batch_size=micro_batch_size, global_batch_size=t.batch_size,
            masking=masking_for(cfg.recipe), block_mode=d.block_mode, seed=t.seed, epoch=epoch, start=start,
            rank=rank, world_size=world_size, num_workers=d.num_workers)

    def units(self, mb: dict) -> int:
        return mb["input_ids"].numel()

    def flops_per_unit(self, cfg) -> float:
        return model_flops_per_token(cfg)

    # ---------------------------------------------------------------- Hugging Face
    def read_hf(self, path, *, flag: str = "--init-from"):
        from ..export import read_hf_model

        return read_hf_model(path, flag=flag)

    def check_hf_fits(self, hf_config, enc_cfg, path, *, flag: str = "--init-from") -> None:
        from ..export import check_hf_fits

        check_hf_fits(hf_config, enc_cfg, path, flag=flag)

    def export_hf(self, weights, enc_cfg_dict, out_dir, *, dtype, run_dir, state) -> str:
        from ..export import write_text_hf_dir

        write_text_hf_dir(weights, enc_cfg_dict, out_dir, dtype=dtype, run_dir=run_dir, state=state)
        return "Data2VecTextModel"
