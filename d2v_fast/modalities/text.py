"""Text: the RoBERTa-shaped encoder of ``Data2VecTextModel`` (``models/encoder.py``), BPE token
corpora (``data/``), span masks (data2vec) and random masks with clones (data2vec 2.0) made by
the C++ extension in the loader workers, and Hugging Face ``Data2VecTextModel`` interop."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import UsageError
from ..linear_probe import FLOOR_INITS, probe_with_floor
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
    from ..data.text.dataset import MaskingConfig

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
        from ..models.blocks import flash_attn_varlen_func

        t = cfg.train
        # every text batch carries its padding mask (all false where nothing is padded), which
        # SDPA's flash kernel refuses at the first attention; flash-attn's varlen kernel takes it
        need(t.attention != "flash" or (flash_attn_varlen_func is not None and t.dtype != "float32"),
             "--train.attention", t.attention,
             "text batches carry a padding mask, which PyTorch's flash kernel does not take; use auto "
             "(PyTorch's pick), cudnn, efficient or math, or install flash-attn (its varlen kernel runs "
             "padded bf16 batches on a GPU)")

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
        from ..data.text.builtin import builtin_corpus
        from ..data.text.corpus import open_corpus

        return open_corpus(cfg.data.path) if cfg.data.path else open_corpus(builtin_corpus(progress=rank == 0))

    def corpus_fingerprint(self, corpus) -> str:
        """A corpus's content: its preparation fingerprint and tokenizer checksum."""
        return f"{corpus.meta.get('source', {}).get('fingerprint', '')}:{corpus.meta['tokenizer']['sha256']}"

    def verify_corpus(self, corpus) -> None:
        from ..data.text.corpus import verify_corpus

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
        from ..data.text.dataset import build_dataloader

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
        from ..hf_text import read_hf_model

        return read_hf_model(path, flag=flag)

    def check_hf_fits(self, hf_config, enc_cfg, path, *, flag: str = "--init-from") -> None:
        from ..hf_text import check_hf_fits

        check_hf_fits(hf_config, enc_cfg, path, flag=flag)

    def export_hf(self, weights, enc_cfg_dict, out_dir, *, dtype, run_dir, state) -> str:
        from ..hf_text import write_text_hf_dir

        write_text_hf_dir(weights, enc_cfg_dict, out_dir, dtype=dtype, run_dir=run_dir, state=state)
        return "Data2VecTextModel"


# ----------------------------------------------------------------------------- the linear probe: text features
DEFAULT_MAX_LEN = 128  # tokens per document: the tiny preset's length; the same for every encoder
DEFAULT_BATCH = 64


@dataclass
class Probed:
    encoder: Encoder
    tokenizer: object  # tokenizers.Tokenizer
    kind: str  # "run" or "hf"
    path: Path
    corpus: Path | None  # the pretraining corpus, when known


def _hf_encoder(path: Path) -> Encoder:
    from ..hf_text import read_hf_model

    config, weights = read_hf_model(path, flag="probe")
    for key, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if config.get(key, want) != want:
            raise UsageError(f"{path / 'config.json'}: {key} is {config.get(key)!r}; the probe's encoder "
                             f"has {want!r} only")
    try:
        pad = int(config.get("pad_token_id", 1))
        cfg = EncoderConfig(vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
                            num_layers=int(config["num_hidden_layers"]), num_heads=int(config["num_attention_heads"]),
                            ffn_size=int(config["intermediate_size"]),
                            max_seq_len=int(config["max_position_embeddings"]) - pad - 1, pad_id=pad,
                            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
                            init_std=float(config.get("initializer_range", 0.02)))
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{path / 'config.json'}: missing or bad field {err}; not a Data2VecTextModel config") from None
    enc = Encoder(cfg)
    missing, unexpected = enc.load_state_dict(weights, strict=False)
    if missing:
        raise UsageError(f"{path}: lacks {len(missing)} encoder weight(s), e.g. {missing[0]}; "
                         f"not a complete Data2VecTextModel")
    return enc.eval()


def load_probed(path: str | os.PathLike) -> Probed:
    """The frozen encoder and tokenizer of a run directory or a Hugging Face model directory."""
    from .. import checkpoint as ckpt
    from ..data.text.tokenizer import load_tokenizer
    from ..pretrained import load_pretrained

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"RUN_DIR_OR_EXPORT_DIR {path}: no such directory; give a run directory or a "
                         f"Hugging Face export (python -m d2v_fast.export RUN_DIR OUT_DIR)")
    hf_config = path / "config.json"
    is_hf = False
    if hf_config.is_file():
        try:
            is_hf = json.loads(hf_config.read_text()).get("model_type") in ("data2vec-text", "roberta")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            is_hf = False
    if is_hf:
        return Probed(_hf_encoder(path), load_tokenizer(path, flag="probe"), "hf", path, None)
    if not (path / ckpt.ENCODER_META).is_file() and not (path / ckpt.LEGACY_ENCODER).is_file() \
            and ckpt.latest_checkpoint(path) is None:
        raise UsageError(f"RUN_DIR_OR_EXPORT_DIR {path}: neither a run directory (no {ckpt.ENCODER_FILE} or complete "
                         f"checkpoint) nor a Hugging Face model directory (no config.json with model_type "
                         f"data2vec-text); give one of those")
    encoder = load_pretrained(path)
    corpus = None
    try:
        corpus = Path(json.loads(hf_config.read_text())["data_dir"]) if hf_config.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        corpus = None
    tok_dir = path / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file() and corpus is not None:
        tok_dir = corpus / "tokenizer"
    return Probed(encoder, load_tokenizer(tok_dir, flag=f"{path}: tokenizer"), "run", path, corpus)


def tokenize(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """``<s> text </s>`` as in pretraining blocks, cut to ``max_len`` tokens."""
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    out = []
    for e in encode(texts, add_special_tokens=False):
        out.append([bos, *e.ids[:max_len - 2], eos])
    return out


@torch.no_grad()
def mean_pooled(encoder: Encoder, ids: list[list[int]], *, batch_size: int = DEFAULT_BATCH,
                device: torch.device | str = "cpu", tick=None) -> torch.Tensor:
    """[N, C] float32 on the CPU: each document's last hidden state averaged over its real
    tokens. Batches are formed from documents of similar length (less padding) and only
    the pooled vectors are kept, so memory is one batch of activations plus N x C.
    ``tick(n)`` (progress) is called after each batch of ``n`` documents."""
    device = torch.device(device)
    pad = encoder.config.pad_id
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out = torch.empty(len(ids), encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
        x = x.to(device)
        real = x.ne(pad)
        h = encoder(x, real.long()).float()
        pooled = (h * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True)
        out[torch.tensor(rows)] = pooled.cpu()
        if tick is not None:
            tick(len(rows))
    return out


def load_task(task: str | os.PathLike | None, *, progress: bool = False):
    """A task file, or the built-in task (None or "builtin")."""
    from ..data.text.probe_task import read_task

    if task is None or str(task) == "builtin":
        from ..data.text.builtin import builtin_probe_task

        return read_task(builtin_probe_task(progress=progress), flag="built-in task")
    return read_task(task)


def probe_encoder(encoder: Encoder, tokenizer, task, *, floor_inits: int = FLOOR_INITS, seed: int = 0,
                  max_len: int = DEFAULT_MAX_LEN, batch_size: int = DEFAULT_BATCH,
                  device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Probe ``encoder`` (left in the mode it came in) and, for the floor, the same
    architecture at ``floor_inits`` random initialisations (0: none). Returns the result as a
    JSON-ready dict."""
    max_len = max(3, min(max_len, encoder.config.max_seq_len))
    ids = tokenize(tokenizer, task.texts, max_len)

    def features(enc, tick):
        was_training = enc.training
        enc.eval()
        try:
            return mean_pooled(enc, ids, batch_size=batch_size, device=device, tick=tick)
        finally:
            enc.train(was_training)

    head = {"task": task.source, "classes": len(task.classes),
            "examples": {s: len(task.indices(s)) for s in ("train", "val", "test")}, "max_len": max_len}
    return probe_with_floor(encoder, task, features, lambda: Encoder(encoder.config).to(device), head,
                            floor_inits=floor_inits, seed=seed, progress=progress)


def held_out(probed: Probed, task) -> bool | None:
    """Whether the task's test documents were held out of the run's pretraining corpus:
    True when that corpus records this very task file as held out, None when unknown."""
    import hashlib

    from ..data.text.corpus import read_meta

    if probed.corpus is None or not Path(task.source).is_file():
        return None
    try:
        rec = read_meta(probed.corpus).get("probe") or {}
    except UsageError:
        return None
    if rec.get("sha256") == hashlib.sha256(Path(task.source).read_bytes()).hexdigest():
        return rec.get("held_out_of_pretraining") == "test"
    return None
