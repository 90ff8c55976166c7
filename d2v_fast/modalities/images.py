"""Images: data2vec (v1, the BEiT recipe of facebookresearch/data2vec_vision ``beit/``) and
data2vec 2.0 (fairseq ``config/v2/base_images_only_task.yaml``, ``models/data2vec2.py``,
``models/modalities/images.py``) on the modality-agnostic core, exported as Hugging Face
``Data2VecVisionModel`` (docs/images.md).

What this module supplies to the core: the presets of both recipes (``tiny`` for CPU,
``base`` = ViT-B/16 at 224 with the published values), the corpus (a prepared image
corpus, or the built-in Fashion-MNIST photos), a loader whose workers make the patch masks
(C++ extension) and the augmentation parameters (and, when training on the CPU, the
augmented pixels), the two students, the FLOP count per patch and the Hugging Face export.

Where our 2.0 image model differs from the published one (docs/images.md): it runs on
the Hugging Face pre-LN block (``Data2VecVisionLayer``: no post-LN blocks, layer scale off,
fixed sin-cos positions in ``embeddings.position_embeddings``), so that export stays an
exact save; the published model uses post-LN blocks that ``Data2VecVisionModel`` cannot
express.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..data.images.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, augment_batch, centre_params
from ..data.images.corpus import ImageCorpus, describe_sizes, open_images, verify_images
from ..data.images.dataset import ImageMaskingConfig, build_image_dataloader
from ..errors import UsageError
from ..files import staged_directory
from ..models.vision import (VISION_PRESETS, GridDecoder, VisionConfig, VisionEncoder, config_from_hf,
                             hf_config_dict, keep_visible)
from ..recipes.data2vec import Student
from ..recipes.data2vec2 import Student2
from . import Modality

# ---------------------------------------------------------------------------- presets
# Sizes of the encoder (the ``model`` section); the block flavour comes from the recipe.
ENCODER_PRESETS = {name: dict(values) for name, values in VISION_PRESETS.items()}

# ImageNet-1k: 1,281,167 training images; BEiT drops the last partial batch.
_IMAGENET = 1_281_167

RECIPE_PRESETS: dict[str, dict[str, dict[str, dict]]] = {
    # data2vec v1 images: data2vec_vision beit/README.md ViT-B command (run_cyclical.py,
    # 16 GPUs x batch 128); docs/images.md.
    "data2vec": {
        "*": {
            "model": {"position_encoding": "relative", "layer_scale_init": 1e-4, "use_mask_token": True,
                      "dropout": 0.0, "attention_dropout": 0.05, "drop_path": 0.25, "layer_norm_eps": 1e-6},
            "recipe": {"name": "data2vec", "top_k": 6,  # --target_layers [6..11], --layer_results end
                       "layer_norm": "layer", "final_norm": "layer",  # target_layer_norm_last, --post_target_layer_norm
                       "head_hidden_mult": 0,  # one Linear(768 -> 768)
                       "loss_beta": 2.0,  # --l1_beta 2; F.smooth_l1_loss averages over elements:
                       "loss_scale": 1 / 768,  # the engine sums over channels, so 1/C is that mean
                       # --ema_decay 0.9998 --ema_start_at 0: constant (fairseq's port anneals from 0.999;
                       # set --recipe.ema_decay 0.999 --recipe.ema_anneal_end_step N for that)
                       "ema_decay": 0.9998, "ema_end_decay": 0.9998, "ema_anneal_end_step": 0,
                       "mask_patches": 120, "mask_min_block": 16,  # --num_mask_patches, --min_mask_patches_per_block
                       "clones": 1},
            # AdamW (0.9, 0.999) eps 1e-8 (BEiT's defaults), wd 0.05 on matrices only, lr 2e-3,
            # cosine, 10 of 800 epochs warmup at batch 2048, clip 3
            "optim": {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                      "decay_biases_and_norms": False, "warmup_steps": 10 * (_IMAGENET // 2048),
                      "total_steps": 800 * (_IMAGENET // 2048), "clip_norm": 3.0},
            # RandomResizedCrop(224, 0.08-1, bicubic) + flip + ColorJitter(0.4, 0.4, 0.4)
            "data": {"crop_scale": (0.08, 1.0), "color_jitter": 0.4},
            # data2vec_vision's engine_for_cyclical.py has no collapse guard
            "train": {"batch_size": 2048, "max_steps": 800 * (_IMAGENET // 2048), "min_target_var": 0.0,
                      "min_pred_var": 0.0},
        },
        "tiny": {
            # 32 x 32 photos in 4 x 4 patches (8 x 8 = 64): BEiT's ~61% masked and minimum
            # block of 16/196 scaled to 64 patches; no stochastic depth at 4 layers
            "model": {"drop_path": 0.0, "attention_dropout": 0.0},
            "recipe": {"top_k": 3, "loss_scale": 1 / 128, "mask_patches": 39, "mask_min_block": 4,
                       "ema_decay": 0.998, "ema_end_decay": 0.9995, "ema_anneal_end_step": 300},
            "optim": {"lr": 1e-3, "warmup_steps": 30, "total_steps": 0},
            "data": {"crop_scale": (0.35, 1.0)},
            "train": {"batch_size": 32, "max_steps": 300, "log_every": 10, "ckpt_every": 100,
                      "collapse_warmup": 100},
        },
    },
    # data2vec 2.0 images: fairseq config/v2/base_images_only_task.yaml (16 GPUs x batch 16 x
    # 16 clones), prenet_depth 2 + depth 10 = 12 blocks.
    "data2vec2": {
        "*": {
            "model": {"position_encoding": "sincos", "layer_scale_init": 0.0, "use_mask_token": False,
                      "dropout": 0.0, "attention_dropout": 0.0, "drop_path": 0.0, "layer_norm_eps": 1e-6},
            "recipe": {"name": "data2vec2", "top_k": 10,  # average_top_k_layers; end_of_block_targets false
                       "layer_norm": "instance", "final_norm": "layer",  # instance_norm_target_layer, layer_norm_targets
                       "head_hidden_mult": 0,  # the decoder's projection: one Linear(768 -> 768)
                       "loss_beta": 0.0, "loss_scale": 0.0,  # MSE x 1/sqrt(768)
                       "ema_decay": 0.9998, "ema_end_decay": 0.99999, "ema_anneal_end_step": 100_000,
                       "mask_prob": 0.8, "mask_span": 3, "mask_prob_adjust": 0.07,  # inverse_mask, mask_length 3
                       "clones": 16, "decoder_layers": 6, "decoder_kernel": 3, "decoder_dim": 0,  # 768
                       "decoder_groups": 16,  # D2vDecoderConfig's default, not overridden by the yaml
                       "decoder_dropout": 0.0, "mask_noise_std": 0.01,
                       # cls_loss 0.01: fairseq multiplies each clone's CLS loss by 0.01 x the masked-patch
                       # count of the GPU's batch (16 images x 16 clones) before dividing by that count,
                       # so per clone row the CLS loss weighs 0.01 x 256 against the mean patch loss. We
                       # keep that weight without tying it to the split of the batch over GPUs.
                       "cls_loss_weight": 0.01 * 256},
            # Adam (0.9, 0.95) eps 1e-8, wd 0.05 (not on biases, norms), lr 1e-3 cosine, 50,040
            # warmup of 375,300 updates, clip 4
            "optim": {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.05,
                      "decay_biases_and_norms": False, "warmup_steps": 50_040, "total_steps": 375_300,
                      "clip_norm": 4.0},
            # mae_image_pretraining: RandomResizedCrop(224, 0.2-1, bicubic) + flip, no colour jitter
            "data": {"crop_scale": (0.2, 1.0), "color_jitter": 0.0},
            # min_target_var 0, min_pred_var 0: the collapse guard never fires
            "train": {"batch_size": 256, "max_steps": 375_300, "min_target_var": 0.0, "min_pred_var": 0.0},
        },
        "tiny": {
            "recipe": {"top_k": 3, "clones": 4, "decoder_layers": 3, "cls_loss_weight": 0.01 * 16,
                       "ema_decay": 0.998, "ema_end_decay": 0.9995, "ema_anneal_end_step": 300},
            "optim": {"lr": 1e-3, "warmup_steps": 30, "total_steps": 0},
            "data": {"crop_scale": (0.35, 1.0)},
            "train": {"batch_size": 16, "max_steps": 300, "log_every": 10, "ckpt_every": 100,
                      "collapse_warmup": 100},
        },
    },
}


# ---------------------------------------------------------------------------- students
def pixels_of(batch: dict) -> torch.Tensor:
    """The normalised float pixels of a micro-batch: as the loader workers made them (CPU
    training), or augmented here on the batch's device from the uint8 photos and the
    per-image parameters the workers drew (GPU training: one byte per value over PCIe)."""
    pixels = batch["pixels"]
    if pixels.dtype == torch.uint8:
        pixels = augment_batch(pixels, batch["augment"], batch["augment_cfg"])
    return pixels


def _with_cls(mask: torch.Tensor, value: bool) -> torch.Tensor:
    """A patch mask [R, N] widened to the encoder's [R, 1 + N] rows (CLS first)."""
    return torch.cat([mask.new_full((mask.shape[0], 1), value), mask], dim=1)


class _ImageStudentMixin:
    """What both image students share: the encoder is the whole ``VisionEncoder`` (exported
    as ``Data2VecVisionModel``) and the teacher is an EMA of all of it (patch embedding,
    CLS, position bias, blocks, final norm), run on the unmasked image
    (data2vec_vision ``model_ema``; fairseq ``ema_encoder_only: false, ema_local_encoder: true``)."""

    encoder: VisionEncoder

    def blocks(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    def ema_source(self) -> nn.Module:
        return self.encoder

    def target_padding(self, batch: dict):
        return None  # images are never padded


class ImageStudent(_ImageStudentMixin, Student):
    """data2vec v1 images (BEiT): the student encodes the image with the masked patches
    replaced by the mask token; a Linear head maps its final-layernorm output at the masked
    patches to the targets. The teacher's targets are its top-K block outputs (after the
    residual), CLS dropped."""

    no_weight_decay = ("encoder.embeddings.cls_token",)  # beit/modeling_cyclical.py no_weight_decay (no pos_embed here)

    def __init__(self, enc: VisionConfig, cfg):
        super().__init__(VisionEncoder(enc), cfg, enc.hidden_size, enc.init_std)
        self.cfg = cfg
        with torch.no_grad():  # BEiT's lm_head: trunc normal at ±1 std, zero bias
            for m in self.head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=enc.init_std, a=-enc.init_std, b=enc.init_std)
                    nn.init.zeros_(m.bias)

    def masked_hidden(self, batch: dict) -> torch.Tensor:
        """The final-layernorm output at the patches [B, N, C] (CLS left out)."""
        return self.encoder.encode(pixels_of(batch), batch["mask"])[0][:, 1:]

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions [M, C] at the masked patches, row-major; the augmented pixels, which
        the teacher encodes unmasked: augmented once for both). Overrides the generic
        forward to hand the pixels on and to gather with the CLS column skipped in place."""
        pixels = pixels_of(batch)
        mask = batch["mask"]
        h, _ = self.encoder.encode(pixels, mask)
        return self.head(ops.masked_gather(h, _with_cls(mask, False), batch.get("mask_rows"))), pixels.detach()

    @torch.no_grad()
    def teacher_layers(self, teacher: nn.Module, batch: dict, teacher_input: torch.Tensor) -> list[torch.Tensor]:
        _, blocks = teacher(teacher_input, collect="block")
        return [b[:, 1:] for b in blocks]


class ImageStudent2(_ImageStudentMixin, Student2):
    """data2vec 2.0 images: patch embeddings + fixed sin-cos positions for the whole image
    once; per clone only CLS and the visible patches enter the blocks; the final layernorm
    output's patches (mask noise at the masked ones) go through the grid decoder, which
    predicts the teacher's targets (mean of its top-K FFN outputs, each instance-normed over
    the patches, then layer-normed) at the masked patches. The CLS output of every clone
    regresses the patch mean of its sample's targets (``cls_loss_weight``)."""

    def __init__(self, enc: VisionConfig, cfg):
        super().__init__(VisionEncoder(enc), cfg)
        self.encoder.reset_parameters("bert")
        self.decoder = GridDecoder(enc.hidden_size, enc.grid, layers=cfg.decoder_layers, kernel=cfg.decoder_kernel,
                                   groups=cfg.decoder_groups, decoder_dim=cfg.decoder_dim)
        # the last forward's CLS outputs and the last teacher pass's CLS targets, for extra_loss
        self._cls_pred: torch.Tensor | None = None
        self._cls_target: torch.Tensor | None = None

    def encode_visible(self, batch: dict):
        """The generic hook (``Student2``): final-layernorm outputs of the visible patches [R, V, C],
        no padding, the kept mask, the augmented pixels for the teacher. Also keeps the CLS output."""
        pixels = pixels_of(batch)
        mask = batch["mask"]  # [clones * B, N], clones of a sample adjacent
        enc = self.encoder
        x = F.dropout(enc.embeddings(pixels), enc.config.dropout, self.training)
        h, _ = enc.run_layers(keep_visible(x, mask, batch.get("kept")))  # [R, 1 + V, C]
        h = enc.layernorm(h)
        self._cls_pred = h[:, 0]
        return h[:, 1:], None, ~mask, pixels.detach()

    @torch.no_grad()
    def teacher_layers(self, teacher: nn.Module, batch: dict, teacher_input: torch.Tensor) -> list[torch.Tensor]:
        _, ffn = teacher(teacher_input, collect="ffn")
        layers = [f[:, 1:] for f in ffn]
        cfg = self.cfg
        if cfg.cls_loss_weight > 0:  # the patch mean of every patch's target (fairseq: of orig_targets)
            full = ops.build_targets(layers[-cfg.top_k:], layer_norm=cfg.norm(cfg.layer_norm),
                                     final_norm=cfg.norm(cfg.final_norm))  # [B, N, C]
            self._cls_target = full.mean(1)
        return layers

    def extra_loss(self, batch: dict) -> torch.Tensor | None:
        """The CLS loss, summed like the patch loss (the trainer divides by the global count
        of masked patches): each clone row's MSE x 1/sqrt(C) times ``cls_loss_weight`` times
        the row's masked-patch count, so the normalised loss gets ``cls_loss_weight`` x the
        mean CLS loss over rows."""
        cfg, mask = self.cfg, batch["mask"]
        cls, target = self._cls_pred, self._cls_target
        self._cls_pred = self._cls_target = None  # one use per forward
        if cfg.cls_loss_weight <= 0:
            return None
        if cls is None or target is None:
            raise RuntimeError("extra_loss needs this micro-batch's forward and teacher pass first")
        target = target.repeat_interleave(mask.shape[0] // target.shape[0], 0)
        per_row = ops.regression_loss(cls.float(), target, beta=cfg.loss_beta,
                                      scale=cfg.loss_scale if cfg.loss_scale > 0 else None, reduction="none")
        return cfg.cls_loss_weight * (per_row * mask.sum(1).to(per_row.dtype)).sum()


# ---------------------------------------------------------------------------- FLOPs
def flops_per_patch(cfg) -> float:
    """Model FLOPs of one training step per input patch (docs/design.md#flops conventions: 2 per
    multiply-add forward, x3 with backward; N = block parameters). T = 1 + patches.

    data2vec: student fwd+bwd and teacher fwd over all T tokens (blocks 8N per token,
    attention 16·L·T·C), patch embedding likewise, the head at the masked patches.
    data2vec2: the teacher as above; per clone the student on 1 + visible tokens, the grid
    decoder's grouped convs at every patch and its projection at the masked ones."""
    m, r = cfg.model, cfg.recipe
    C, L, Fd, P = m.hidden_size, m.num_layers, m.ffn_size, m.patch_size
    N = (m.image_size // P) ** 2
    T = N + 1
    n = L * (4 * C * C + 2 * C * Fd + 9 * C + Fd)
    embed = 2 * m.num_channels * P * P * C  # forward FLOPs per patch
    if r.name != "data2vec2":
        masked = min(r.mask_patches, N) / N
        head = 6 * C * C * masked
        return (T * (8 * n + 16 * L * T * C)) / N + 4 * embed + head
    D = r.decoder_dim or C
    visible = int(N * (1 - r.mask_prob))
    Tv = visible + 1
    teacher = T * (2 * n + 4 * L * T * C) / N + embed
    student = r.clones * Tv * (6 * n + 12 * L * Tv * C) / N + 3 * embed
    k2 = r.decoder_kernel ** 2
    convs = 2 * k2 * (C * D + (r.decoder_layers - 1) * D * D) / r.decoder_groups
    decoder = r.clones * 3 * (convs + 2 * D * C * (N - visible) / N)
    return teacher + student + decoder


# ---------------------------------------------------------------------------- probe
PROBE_SIZES = {"train": 2000, "val": 1000, "test": 2000}  # photos per split, at most


@dataclasses.dataclass
class ImageProbeTask:
    """What ``d2v_fast.probe.linear_probe`` reads off a task: labels, class names and the
    indices of each split (into ``images``, corpus indices)."""

    images: list[int]
    labels: list[int]
    classes: list[str]
    splits: dict[str, list[int]]
    source: str

    def indices(self, split: str) -> list[int]:
        return self.splits[split]


def image_probe_task(corpus: ImageCorpus) -> ImageProbeTask:
    """Train and validation photos from the start of the corpus's train split, test photos
    from its held-out split (the built-in corpus's t10k photos, never seen in pretraining)."""
    splits = corpus.meta.get("splits") or {}
    if "train" not in splits or "t10k" not in splits or not corpus.classes:
        raise UsageError(f"{corpus.path}: the image probe needs a labelled corpus with train and t10k splits "
                         f"(the built-in Fashion-MNIST corpus has them)")
    (a, b), (c, d) = splits["train"], splits["t10k"]
    n_train = min(PROBE_SIZES["train"], (b - a) * 2 // 3)
    n_val = min(PROBE_SIZES["val"], b - a - n_train)
    n_test = min(PROBE_SIZES["test"], d - c)
    images = list(range(a, a + n_train + n_val)) + list(range(c, c + n_test))
    split_ix = {"train": list(range(n_train)), "val": list(range(n_train, n_train + n_val)),
                "test": list(range(n_train + n_val, len(images)))}
    return ImageProbeTask(images=images, labels=[int(corpus.labels[i]) for i in images],
                          classes=list(corpus.classes), splits=split_ix, source=str(corpus.path))


def whole_photos(corpus: ImageCorpus, images: list[int], image_size: int, device="cpu") -> torch.Tensor:
    """The model's input for corpus photos outside training (the probe's and fine-tuning's;
    what an exported image processor reproduces from the raw photo): the deterministic centre
    view, no random crop, flip or jitter: the stored photo's centre square (its shorter side
    was resized at preparation; the built-in photos are square already) resized to
    ``image_size`` (bicubic) and normalised as in training."""
    aug = AugmentConfig(size=image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, color_jitter=0.0)
    canvas, sizes = corpus.batch(images)
    pixels = torch.from_numpy(canvas).permute(0, 3, 1, 2)
    return augment_batch(pixels.to(device), centre_params(sizes), aug)


def image_processor_dict(enc: VisionConfig, corpus_meta: dict | None) -> dict:
    """``preprocessor_config.json`` for ``transformers``' ``BitImageProcessor`` (any
    ``AutoImageProcessor`` loads it) that takes a raw photo to what the model saw of its
    corpus's photos outside training (``whole_photos``): for the built-in Fashion-MNIST
    photos (28 x 28 greyscale) the centre crop pads them with black to the stored 32 x 32, as
    the corpus did; for photos prepared by ``d2v_fast.data.images.prepare`` the shorter side
    is resized (bicubic, the long side truncated as preparation does) and the centre cropped;
    then RGB, [0, 1] and the mean/std training normalised with. Exact when the stored shorter
    side is the model's image size (the built-in photos with the tiny preset; ``--size`` equal
    to ``--model.image_size``); otherwise the centre view was resized twice (to ``--size`` at
    preparation, then to the image size) and the processor resizes once, over the same crop."""
    from ..data.images.builtin import PAD, SIDE

    size = enc.image_size
    source = (corpus_meta or {}).get("source") or {}
    proc = {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,  # PIL bicubic
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [float(v) for v in IMAGENET_MEAN], "image_std": [float(v) for v in IMAGENET_STD]}
    if source.get("dataset") == "fashion-mnist":  # padding, not resizing: the crop pads with zeros
        raw = SIDE - 2 * PAD
        if size == SIDE:
            proc.update(do_resize=False)
        else:
            proc.update(size={"shortest_edge": int(raw * size / SIDE)})
    return proc


@torch.no_grad()
def pooled_features(encoder: VisionEncoder, corpus: ImageCorpus, images: list[int], *, batch_size: int = 256,
                    device="cpu", tick=None) -> torch.Tensor:
    """Mean over the patches of the final-layernorm output, for whole photos
    (``whole_photos``). ``tick(n)`` (progress) after each batch of ``n`` photos."""
    size = encoder.config.image_size
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = whole_photos(corpus, chunk, size, device)
            out.append(encoder(x)[:, 1:].mean(1).float().cpu())
            if tick is not None:
                tick(len(chunk))
    finally:
        encoder.train(was_training)
    return torch.cat(out)


# One random init for the floor by default (text averages 3): the tiny image jobs' margins
# were 8 and 22 points (benchmarks/results/default-job-images*.json), and each floor costs a
# pass over the photos (about half of the probe's ~30 s on 2 CPU cores).
IMAGE_FLOOR_INITS = 1


def probe_images(encoder: VisionEncoder, corpus: ImageCorpus, *, floor_inits: int | None = None, seed: int = 0,
                 device="cpu", task_name: str | None = None, progress: bool = False) -> dict:
    """Linear probe of the frozen encoder on the corpus's labels (``d2v_fast.linear_probe``'s
    classifier), and for the floor the same architecture at ``floor_inits`` random
    initialisations (default ``IMAGE_FLOOR_INITS``). ``task_name`` describes the task in
    the result (default: the corpus's path and its classes)."""
    from ..linear_probe import probe_with_floor

    task = image_probe_task(corpus)
    head = {"task": task_name or f"{task.source}: its {len(task.classes)} image classes",
            "classes": len(task.classes), "examples": {s: len(task.indices(s)) for s in ("train", "val", "test")},
            "unit": "images"}
    return probe_with_floor(encoder, task,
                            lambda enc, tick: pooled_features(enc, corpus, task.images, device=device, tick=tick),
                            lambda: VisionEncoder(encoder.config).to(device), head,
                            floor_inits=IMAGE_FLOOR_INITS if floor_inits is None else floor_inits, seed=seed,
                            progress=progress)


def is_image_model(path) -> bool:
    """Whether ``path`` is a run directory of an image run or a ``Data2VecVisionModel`` export."""
    from ..linear_probe import is_model_dir

    return is_model_dir(path, "images", "data2vec-vision")


def probe_images_path(path, *, seed: int = 0, device: str = "cpu", out=None, floor_inits: int | None = None,
                      progress: bool = False) -> dict:
    """``python -m d2v_fast.probe`` for an image run directory or export: the encoder on
    its run's corpus (an export, or a run whose corpus has no labelled held-out split: the
    built-in Fashion-MNIST photos, which the result and a line on stderr say)."""
    from ..pretrained import load_pretrained
    from ..linear_probe import PROBE_FILE, write_result

    path = Path(path)
    kind, corpus_dir = "run", None
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        hf = {}
    if hf.get("model_type") == "data2vec-vision":
        kind = "hf"
        config, weights = IMAGES.read_hf(path, flag="probe")
        try:
            enc_cfg = config_from_hf(config)
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"probe {path}: {err}") from None
        encoder = VisionEncoder(enc_cfg)
        missing = [k for k in encoder.state_dict() if k not in weights]
        if missing:
            raise UsageError(f"probe {path}: lacks {len(missing)} encoder weight(s), e.g. {missing[0]}")
        encoder.load_state_dict({k: weights[k] for k in encoder.state_dict()})
    else:
        encoder = load_pretrained(path)
        corpus_dir = hf.get("data_dir")
    from ..data.images.builtin import builtin_images_path

    corpus = open_images(corpus_dir) if corpus_dir else None
    builtin_task = "Fashion-MNIST's 10 classes (the built-in photos; test: its t10k photos)"
    if corpus is not None and "t10k" in (corpus.meta.get("splits") or {}) and corpus.classes:
        name = builtin_task if corpus.meta.get("source", {}).get("dataset") == "fashion-mnist" else None
        held_out = True if kind == "run" else None  # image jobs train on the train split only
    else:
        from ..data.images.builtin import builtin_images

        why = f"{corpus_dir} has no labelled held-out (t10k) split" if corpus_dir else "an export names no corpus"
        name = f"{builtin_task}, not the run's own images: {why}"
        print(f"probe: {why}; probing on the built-in Fashion-MNIST photos instead ({builtin_images_path()})",
              file=sys.stderr, flush=True)
        corpus = open_images(builtin_images(progress=progress))
        held_out = None  # those photos' relation to the run's corpus is unknown
    result = {"model": str(path), "kind": kind,
              **probe_images(encoder.to(device), corpus, seed=seed, device=device, floor_inits=floor_inits,
                             task_name=name, progress=progress),
              "test_held_out_of_pretraining": held_out}
    target = Path(out) if out else (path / PROBE_FILE if kind == "run" else None)
    if target is not None:
        write_result(result, target)
    return result


# ---------------------------------------------------------------------------- benchmark
def synthetic_batch(cfg, batch_size: int, *, augment_on_device: bool, seed: int = 0) -> dict:
    """A micro-batch as the loader makes it, from random uint8 photos of the model's image
    size (real masks and augmentation parameters): ``d2v_fast.bench --modality images``."""
    from ..data.images.dataset import ImageCollator

    g = torch.Generator().manual_seed(seed)
    S = cfg.model.image_size
    items = [{"pixels": torch.randint(0, 256, (3, S, S), generator=g, dtype=torch.uint8), "index": i, "epoch": 0,
              "label": -1} for i in range(batch_size)]
    collate = ImageCollator(cfg.model.grid, ImagesModality.masking_config(cfg), ImagesModality.augment_config(cfg),
                            seed, in_worker=not augment_on_device)
    return collate(items)


@dataclasses.dataclass
class SyntheticImageCorpus:
    """What the trainer reads off an image corpus, for benchmarking without data."""

    path: Path = Path("<synthetic images>")
    meta: dict = dataclasses.field(default_factory=lambda: {"source": {}, "shards": []})

    def __len__(self) -> int:
        return 0


# ---------------------------------------------------------------------------- the modality
def _flag_error(flag: str, value, fix: str) -> UsageError:
    return UsageError(f"{flag} {value!r}: {fix}")


class ImagesModality(Modality):
    """The image modality of the core (``d2v_fast.modalities``)."""

    name = "images"
    model_config_class = VisionConfig
    encoder_presets = ENCODER_PRESETS
    size_presets: dict = {}  # every size's values are per recipe (RECIPE_PRESETS)
    recipe_presets = RECIPE_PRESETS
    unit = "patches"
    has_probe = True  # at the end of a job, on the corpus's labels (probe_images); not every N steps

    # ---- corpus
    def open_corpus(self, cfg, *, rank: int = 0) -> ImageCorpus:
        path = cfg.data.path
        if not path:
            from ..data.images.builtin import builtin_images

            path = builtin_images(progress=rank == 0)  # a file lock makes concurrent builds safe
        return open_images(path)

    def corpus_fingerprint(self, corpus: ImageCorpus) -> str:
        shards = hashlib.sha256("".join(s["sha256"] for s in corpus.meta.get("shards", [])).encode()).hexdigest()
        return f"{corpus.meta.get('source', {}).get('fingerprint', '')}:{shards}"

    def corpus_path(self, corpus: ImageCorpus) -> str:
        return str(corpus.path)

    def verify_corpus(self, corpus: ImageCorpus) -> None:
        verify_images(corpus)

    @staticmethod
    def train_split(corpus: ImageCorpus) -> tuple[int, int]:
        """(first, count) of the images pretraining sees: a corpus with a ``train`` split
        (the built-in one) trains on it alone, so its held-out photos stay unseen."""
        split = (corpus.meta.get("splits") or {}).get("train")
        if split is None:
            return 0, len(corpus)
        return int(split[0]), int(split[1]) - int(split[0])

    def encoder_config(self, cfg, corpus: ImageCorpus) -> VisionConfig:
        return dataclasses.replace(cfg.model)

    # ---- model
    def build_encoder(self, enc_cfg: VisionConfig) -> VisionEncoder:
        return VisionEncoder(enc_cfg)

    def build_student(self, enc_cfg: VisionConfig, recipe_cfg) -> nn.Module:
        return (ImageStudent2 if recipe_cfg.name == "data2vec2" else ImageStudent)(enc_cfg, recipe_cfg)

    def teacher_encoder_weights(self, student_encoder, teacher):
        """The teacher is an EMA of the whole encoder: its state dict has the encoder's names."""
        return dict(teacher)

    def describe(self, cfg, corpus: ImageCorpus) -> str:
        if not isinstance(corpus, ImageCorpus):
            return f"global batch {cfg.train.batch_size}; {corpus.path}"
        first, count = self.train_split(corpus)
        sizes = describe_sizes(corpus.shapes[first:first + count])
        return (f"{count:,} photos of {sizes} as {cfg.model.image_size}px crops in {cfg.model.num_patches} patches; "
                f"global batch {cfg.train.batch_size}; {self.attention_note(cfg)}corpus {corpus.path}")

    @staticmethod
    def attention_note(cfg) -> str:
        """With the relative position bias (v1), which SDPA kernel the student's attention
        runs, measured once at start-up on the training device (PyTorch falls back to its
        math kernel silently where a fused one rejects a bias that needs a gradient)."""
        m = cfg.model
        if m.position_encoding != "relative":
            return ""
        from ..models.vision import RelativePositionBias, attention_backend

        cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
        device = torch.device("cuda") if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if cuda and cfg.train.dtype in ("auto", "bfloat16") else torch.float32

        class _Bias(nn.Module):  # just what attention_backend reads off an encoder
            def __init__(self):
                super().__init__()
                self.config, self.bias = m, RelativePositionBias(m)

            def attention_bias(self):
                return self.bias()

        kernel = attention_backend(_Bias(), device, dtype, batch=1)
        return f"attention with the relative bias: SDPA {kernel} kernel ({device.type}, {str(dtype)[6:]}); "

    # ---- data
    @staticmethod
    def masking_config(cfg) -> ImageMaskingConfig:
        r = cfg.recipe
        if r.name == "data2vec2":
            return ImageMaskingConfig(kind="inverse_block", mask_prob=r.mask_prob, block=r.mask_span,
                                      mask_prob_adjust=r.mask_prob_adjust, clones=r.clones)
        return ImageMaskingConfig(kind="block", num_masked=r.mask_patches, min_block=r.mask_min_block)

    @staticmethod
    def augment_config(cfg) -> AugmentConfig:
        d = cfg.data
        return AugmentConfig(size=cfg.model.image_size, scale=tuple(d.crop_scale), color_jitter=d.color_jitter,
                             mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @staticmethod
    def augment_on_device(cfg) -> bool:
        """Augment on the training device (GPU) or in the loader workers (CPU training)."""
        device = cfg.train.device
        return device == "cuda" or (device == "auto" and torch.cuda.is_available())

    def loader(self, corpus: ImageCorpus, cfg, *, micro_batch_size: int, epoch: int, start: int, rank: int,
               world_size: int):
        t, d = cfg.train, cfg.data
        return build_image_dataloader(
            corpus, grid=cfg.model.grid, micro_batch_size=micro_batch_size, global_batch_size=t.batch_size,
            masking=self.masking_config(cfg), augment=self.augment_config(cfg), seed=t.seed, epoch=epoch,
            start=start, rank=rank, world_size=world_size, num_workers=d.num_workers,
            split=self.train_split(corpus), augment_in_worker=not self.augment_on_device(cfg))

    def units(self, mb: dict) -> int:
        p = mb["pixels"]
        return int(mb["mask"].shape[1]) * int(p.shape[0])

    def flops_per_unit(self, cfg) -> float:
        return flops_per_patch(cfg)

    def validate(self, cfg) -> None:
        m, r, d = cfg.model, cfg.recipe, cfg.data

        def need(ok, flag, value, fix):
            if not ok:
                raise _flag_error(flag, value, fix)

        need(m.position_encoding in ("relative", "sincos"), "--model.position_encoding", m.position_encoding,
             "expected relative (v1, BEiT) or sincos (2.0)")
        need(m.patch_size >= 1 and m.image_size >= m.patch_size and m.image_size % m.patch_size == 0,
             "--model.image_size", m.image_size, f"must be a multiple of --model.patch_size ({m.patch_size})")
        need(m.hidden_size > 0 and m.num_heads > 0 and m.hidden_size % m.num_heads == 0, "--model.hidden_size",
             m.hidden_size, f"must be a positive multiple of --model.num_heads ({m.num_heads})")
        need(m.position_encoding != "sincos" or m.hidden_size % 4 == 0, "--model.hidden_size", m.hidden_size,
             "2-D sin-cos positions need a multiple of 4")
        need(m.num_layers >= 1, "--model.num_layers", m.num_layers, "must be >= 1")
        need(m.ffn_size >= 1, "--model.ffn_size", m.ffn_size, "must be >= 1")
        need(m.num_channels == 3, "--model.num_channels", m.num_channels,
             "the loader feeds RGB (greyscale photos are repeated to 3 channels)")
        for flag, v in (("--model.dropout", m.dropout), ("--model.attention_dropout", m.attention_dropout),
                        ("--model.drop_path", m.drop_path)):
            need(0 <= v < 1, flag, v, "must be in [0, 1)")
        need(m.layer_scale_init >= 0, "--model.layer_scale_init", m.layer_scale_init, "must be >= 0 (0 = off)")
        need(1 <= r.top_k <= m.num_layers, "--recipe.top_k", r.top_k, f"must be in [1, {m.num_layers}] (the layer count)")
        N = (m.image_size // m.patch_size) ** 2
        if r.name == "data2vec2":
            need(m.position_encoding == "sincos", "--model.position_encoding", m.position_encoding,
                 "data2vec2 drops masked patches, which the relative position bias cannot; use sincos")
            need(0 < r.mask_prob < 1 and int(N * (1 - r.mask_prob)) >= 1, "--recipe.mask_prob", r.mask_prob,
                 f"must leave at least one of the {N} patches visible")
            need(1 <= r.mask_span <= min(m.image_size // m.patch_size, 16), "--recipe.mask_span", r.mask_span,
                 "the side of the visible blocks: 1 to the grid side")
            need(r.mask_prob_adjust >= 0, "--recipe.mask_prob_adjust", r.mask_prob_adjust, "must be >= 0")
            D = r.decoder_dim or m.hidden_size
            g = r.decoder_groups
            need(g >= 1 and m.hidden_size % g == 0 and D % g == 0, "--recipe.decoder_groups", g,
                 f"the decoder's conv groups must divide the decoder width {D} and --model.hidden_size "
                 f"{m.hidden_size}")
            need(r.cls_loss_weight >= 0, "--recipe.cls_loss_weight", r.cls_loss_weight, "must be >= 0 (0 = off)")
        else:
            need(m.use_mask_token, "--model.use_mask_token", m.use_mask_token, "data2vec (v1) masks with the mask token")
            need(1 <= r.mask_patches < N, "--recipe.mask_patches", r.mask_patches, f"must be in [1, {N - 1}] "
                 f"({N} patches per image)")
            need(1 <= r.mask_min_block <= r.mask_patches, "--recipe.mask_min_block", r.mask_min_block,
                 f"must be in [1, --recipe.mask_patches {r.mask_patches}]")
            need(r.cls_loss_weight == 0, "--recipe.cls_loss_weight", r.cls_loss_weight, "only data2vec2 has a CLS loss")
        t = cfg.train
        need(m.position_encoding != "relative" or t.attention not in ("flash",), "--train.attention", t.attention,
             "the flash kernel takes no attention bias, and v1 images add the relative position bias; "
             "use auto, efficient, cudnn or math")
        need(t.probe_task in ("builtin", "none"), "--train.probe_task", t.probe_task,
             "images probe the corpus's own labels: builtin or none")
        need(t.probe_every == 0, "--train.probe_every", t.probe_every,
             "images probe at the end of the job only; set 0")
        lo, hi = d.crop_scale
        need(0 < lo <= hi <= 1, "--data.crop_scale", f"{lo},{hi}", "expected 0 < min <= max <= 1 (crop area fractions)")
        need(0 <= d.color_jitter < 1, "--data.color_jitter", d.color_jitter, "must be in [0, 1)")

    # ---- Hugging Face
    def read_hf(self, path, *, flag: str = "--init-from") -> tuple[dict, dict[str, torch.Tensor]]:
        """(config.json, weights under our encoder names) of a local Data2VecVisionModel
        (or BeitModel-layout) directory."""
        from .. import checkpoint as ckpt

        path = Path(path)
        if not path.is_dir():
            what = "not a directory" if path.exists() else "no such directory"
            raise UsageError(f"{flag} {path}: {what}; give a local Hugging Face model directory")
        if (path / ckpt.CKPT_DIR).is_dir() or (path / ckpt.ENCODER_META).is_file():
            raise UsageError(f"{flag} {path}: a d2v_fast run, not a Hugging Face model directory; export it first "
                             f"(python -m d2v_fast.export {path} HF_DIR) and give HF_DIR")
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {path}: no config.json; give a Hugging Face model directory")
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{flag} {path / 'config.json'}: not valid JSON ({type(err).__name__})") from None
        if not isinstance(config, dict) or config.get("model_type") not in ("data2vec-vision", "beit"):
            got = config.get("model_type") if isinstance(config, dict) else None
            raise UsageError(f"{flag} {path}: model_type {got!r}; expected data2vec-vision (an image model)")
        fix = "give a complete Hugging Face model directory"
        if (path / "model.safetensors").is_file():
            raw = ckpt.read_safetensors(path / "model.safetensors", fix)
        elif (path / "pytorch_model.bin").is_file():
            raw = ckpt.load_plain(path / "pytorch_model.bin", fix)
        else:
            raise UsageError(f"{flag} {path}: no model.safetensors or pytorch_model.bin")
        weights = {}
        for k, v in raw.items():
            for prefix in ("data2vec_vision.", "beit."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    break
            if k.startswith(("embeddings.", "encoder.", "layernorm.")) and isinstance(v, torch.Tensor):
                weights[k] = v
        return config, weights

    def check_hf_fits(self, hf_config: dict, enc_cfg: VisionConfig, path, *, flag: str = "--init-from") -> None:
        try:
            theirs = config_from_hf(hf_config)
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{flag} {path}: {err}") from None
        for field in ("image_size", "patch_size", "num_channels", "hidden_size", "num_layers", "num_heads",
                      "ffn_size", "position_encoding", "use_mask_token"):
            a, b = getattr(theirs, field), getattr(enc_cfg, field)
            if a != b:
                raise UsageError(f"{flag} {path}: {field} is {a!r} there, this run has {b!r} (--model.{field}); "
                                 f"they must match")
        if (theirs.layer_scale_init > 0) != (enc_cfg.layer_scale_init > 0):
            raise UsageError(f"{flag} {path}: layer scale is {'on' if theirs.layer_scale_init > 0 else 'off'} "
                             f"there, {'on' if enc_cfg.layer_scale_init > 0 else 'off'} here "
                             f"(--model.layer_scale_init); they must match")

    def export_hf(self, weights: dict[str, torch.Tensor], enc_cfg_dict: dict, out_dir, *, dtype: str = "float32",
                  run_dir=None, state: dict | None = None) -> str:
        """Writes ``config.json`` (``Data2VecVisionConfig``), ``model.safetensors`` and
        ``preprocessor_config.json`` (``image_processor_dict``: the run's corpus's preprocessing,
        read from its ``meta.json``) as ``out_dir``, atomically."""
        from safetensors.torch import save_file

        from ..data.images.corpus import read_meta

        enc = VisionConfig(**{k: v for k, v in enc_cfg_dict.items() if k in VisionConfig.__dataclass_fields__})
        corpus = ((state or {}).get("corpus") or {}).get("path")
        try:
            meta = read_meta(Path(corpus)) if corpus else None
        except UsageError:
            meta = None
        if meta is None and not ((state or {}).get("config") or {}).get("data", {}).get("path"):
            meta = {"source": {"dataset": "fashion-mnist"}}  # the built-in photos, whose cache was removed
        elif meta is None:
            print(f"warning: the run's corpus {corpus} cannot be read; the exported image processor assumes photos "
                  f"prepared at the model's image size (shorter side resized, centre crop)", file=sys.stderr)
        tensors = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in sorted(weights.items())}
        with staged_directory(Path(out_dir)) as staging:
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
            (staging / "config.json").write_text(json.dumps(hf_config_dict(enc, dtype=dtype), indent=2) + "\n")
            (staging / "preprocessor_config.json").write_text(
                json.dumps(image_processor_dict(enc, meta), indent=2) + "\n")
            if state is not None:
                (staging / "d2v_fast.json").write_text(json.dumps({"step": state.get("step")}, indent=2) + "\n")
        return "Data2VecVisionModel"


IMAGES = ImagesModality()

__all__ = ["ImagesModality", "IMAGES", "ImageStudent", "ImageStudent2", "RECIPE_PRESETS", "ENCODER_PRESETS",
           "flops_per_patch", "pixels_of"]
