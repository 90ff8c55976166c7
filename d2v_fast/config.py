"""Typed configuration: sections of dataclasses, presets, and ``--section.field value``
command-line overrides.

Presets, per recipe: ``tiny`` (the CPU default: the default job finishes in a few minutes
on 2 cores), ``base`` and ``large``. ``base`` carries the published text recipe value by
value (data2vec: fairseq ``examples/data2vec/config/text/pretraining/base.yaml``; data2vec
2.0: ``config/v2/base_text_only_task.yaml``), ``large`` the published large text recipe of
data2vec 2.0 (``config/v2/large_text_only_task.yaml``); data2vec (v1) published no large
text model, so its ``large`` is RoBERTa-large sizes on the base recipe. tests/test_presets.py
pins every field of every preset to its source.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field

from .errors import UsageError
from .models.encoder import EncoderConfig
from .recipes.common import RecipeConfig


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    decay_biases_and_norms: bool = True  # weight decay on 1-D parameters too (data2vec v1); 2.0 exempts them
    warmup_steps: int = 10_000
    total_steps: int = 1_000_000  # cosine reaches 0 here; 0 = train.max_steps
    clip_norm: float = 5.0  # 0 = no clipping
    fused: bool = True  # fused AdamW where the device supports it
    schedule: str = "cosine"  # cosine (warmup_steps, then cosine to 0) | tri_stage (data2vec v1 speech)
    tri_stage_phases: tuple[float, float, float] = (0.03, 0.9, 0.07)  # tri_stage: warmup/hold/decay shares of total_steps


@dataclass
class DataConfig:
    path: str = ""  # prepared corpus directory; "" = the built-in corpus
    seq_len: int = 512
    block_mode: str = "document"  # pack | document (base.yaml: sample_break_mode complete_doc)
    num_workers: int = 2
    verify: str = "background"  # full shard check (sha256, token ids): background | start | off
    max_samples: int = 320_000  # audio: crop cap per utterance (20 s at 16 kHz; fairseq max_sample_size)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # images: RandomResizedCrop area fractions
    color_jitter: float = 0.4  # images: brightness/contrast/saturation jitter (0 = none)


@dataclass
class TrainConfig:
    batch_size: int = 256  # global sequences per optimizer update
    # sequences per forward/backward on one rank; 0 = automatic: the rank's whole share on the CPU
    # (and with FSDP), on a GPU the largest divisor of it whose trial step fits in 90% of the memory
    micro_batch_size: int = 0
    max_steps: int = 1_000_000
    seed: int = 0
    out: str = ""  # run directory; "" = runs/<timestamp>
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bfloat16 | float32
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per encoder block), with several processes
    kernels: str = "auto"  # auto (Triton on CUDA, eager twins elsewhere) | triton | torch; D2V_KERNELS overrides auto
    collapse_warmup: int = 1000  # steps before the collapse guard acts
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    max_skipped_steps: int = 10  # stop after this many updates in a row with non-finite loss/gradients
    # Performance switches, each computing the same update; on by default wherever the run can use
    # them (Trainer.effective_switches; the start-up line lists those on), measured on the CPU by
    # python -m d2v_fast.bench --cost (docs/performance.md).
    skip_on_device: bool = True  # non-finite skip decided on the device (fused AdamW found_inf, EMA store mask)
    host_counts: bool = True  # masked-row counts taken from the CPU batch: gathers and targets allocate without a sync
    # none | blocks (torch.compile of every student and teacher encoder block) | blocks-cudagraphs
    # (the same, mode "reduce-overhead": each block's kernels replayed as one CUDA graph on a GPU)
    # | stack-cudagraphs (eager blocks; on a GPU the teacher's stack and the student's stack,
    # forward and backward, each replayed as CUDA graphs, one set per shape bucket; d2v_fast.graphs)
    compile: str = "none"
    graph_bucket: int = 64  # stack-cudagraphs: lengths that vary padded up to a multiple of this (0 = exact lengths)
    fused_qkv: bool = True  # text, bf16: one Linear(C, 3C) for query/key/value; state dicts keep HF's separate names
    bf16_teacher: bool = True  # bf16, DDP: the EMA also writes a bf16 copy of the teacher's Linears, read by its forward
    bf16_student: bool = True  # bf16, DDP: the student's block Linears read a bf16 copy refreshed once per update
    cast_once: bool = True  # bf16, DDP: one autocast region per update, so weights are cast once, not per micro-batch
    attention: str = "auto"  # SDPA backend: auto (PyTorch's pick) | flash | cudnn | efficient | math (flash: no padding mask)
    progress: bool = True
    probe_task: str = "builtin"  # linear probe at the end (d2v_fast.probe): builtin | FILE.jsonl | none
    probe_every: int = 0  # also probe every N steps into metrics.jsonl; 0 = only at the end


@dataclass
class Config:
    model: EncoderConfig = field(default_factory=EncoderConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "base"
    modality: str = "text"  # text | audio | images (d2v_fast.modalities); ``model`` is that modality's config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        from .modalities import get_modality

        modality = d.get("modality", "text")
        cfg = cls(model=get_modality(modality, flag="config modality").model_config_class(), modality=modality)
        for section in SECTIONS:
            sub = getattr(cfg, section)
            for k, v in d.get(section, {}).items():
                if hasattr(sub, k):
                    setattr(sub, k, tuple(v) if isinstance(getattr(sub, k), tuple) else v)
        cfg.preset = d.get("preset", cfg.preset)
        return cfg


SECTIONS = ("model", "recipe", "optim", "data", "train")


RECIPES = ("data2vec", "data2vec2")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
COMPILE_CHOICES = ("none", "blocks", "blocks-cudagraphs", "stack-cudagraphs")


def preset(name: str, recipe: str = "data2vec", modality: str = "text") -> Config:
    """The dataclass defaults (data2vec text base), then the modality's encoder at that size,
    then what the size sets for every recipe of the modality, then the recipe's own values,
    then the recipe's values at that size (each modality keeps its tables in its module;
    text's are below)."""
    from .modalities import get_modality

    mod = get_modality(modality)
    if name not in mod.encoder_presets:
        raise UsageError(f"--config {name!r}: unknown preset; choose one of {', '.join(mod.encoder_presets)}")
    if recipe not in RECIPES or recipe not in mod.recipe_presets:
        known = [r for r in RECIPES if r in mod.recipe_presets]
        raise UsageError(f"--recipe {recipe!r}: unknown recipe for {modality}; choose one of {', '.join(known)}")
    cfg = Config(model=mod.model_config_class(), preset=name, modality=modality)
    for k, v in mod.encoder_presets[name].items():
        setattr(cfg.model, k, v)
    table = mod.recipe_presets[recipe]
    for layer in (mod.size_presets.get(name, {}), table.get("*", {}), table.get(name, {})):
        for section, values in layer.items():
            for k, v in values.items():
                setattr(getattr(cfg, section), k, v)
    return cfg


# What a size sets whatever the recipe.
PRESETS: dict[str, dict[str, dict]] = {
    "base": {},
    "large": {},
    # Small enough for two CPU cores; a short, quickly annealed EMA so the loss moves in
    # a few hundred steps.
    "tiny": {
        "model": {"max_seq_len": 128},
        "recipe": {"ema_decay": 0.998, "ema_end_decay": 0.9995, "ema_anneal_end_step": 300},
        "optim": {"lr": 1e-3, "warmup_steps": 30, "total_steps": 0},
        "data": {"seq_len": 128, "block_mode": "pack"},  # the built-in corpus's docstrings are short
        "train": {"batch_size": 16, "max_steps": 300, "log_every": 10, "ckpt_every": 100,
                  "collapse_warmup": 100},
    },
}

# Each recipe's published values ("*": the base recipe) and what differs at a size.
RECIPE_PRESETS: dict[str, dict[str, dict[str, dict]]] = {
    # data2vec: the dataclass defaults are base.yaml's values.
    "data2vec": {
        "*": {},
        # No published v1 large text model: base.yaml's recipe, and the lr of the published
        # 2.0 large text recipe (RoBERTa-large's 4e-4 was tuned for MLM at batch 8k).
        "large": {"optim": {"lr": 1e-4}},
        # The default job's probe (benchmarks/results/probe-default-job-cpu.json): in
        # 300 steps a teacher that tracks the student (0.99 -> 0.999) pulls the last layer
        # below its random-init floor; a teacher held near its random init (0.9999, so its
        # targets stay a contextual projection of the tokens) and a higher lr put it above.
        # lr 3e-3 after 30 warmup steps diverged on one seed of three; 100 steps hold it.
        "tiny": {"recipe": {"top_k": 3, "ema_decay": 0.9999, "ema_end_decay": 0.9999},
                 "optim": {"lr": 3e-3, "warmup_steps": 100}},
    },
    # data2vec 2.0, base_text_only_task.yaml.
    "data2vec2": {
        "*": {
            "recipe": {"name": "data2vec2", "top_k": 12, "layer_norm": "instance", "final_norm": "none",
                       "loss_beta": 0.0, "loss_scale": 1.0, "ema_decay": 0.9999, "ema_end_decay": 0.99999,
                       "ema_anneal_end_step": 100_000, "mask_prob": 0.48, "mask_span": 1, "clones": 8,
                       "decoder_layers": 5, "decoder_kernel": 9, "decoder_dim": 768, "decoder_dropout": 0.1,
                       "mask_noise_std": 0.01, "head_hidden_mult": 2},
            "optim": {"lr": 2e-4, "warmup_steps": 4000, "clip_norm": 1.0, "decay_biases_and_norms": False},
            "data": {"block_mode": "pack"},
            "train": {"batch_size": 64},
        },
        # large_text_only_task.yaml
        "large": {
            "recipe": {"top_k": 24, "layer_norm": "layer", "final_norm": "instance", "mask_prob": 0.5},
            "optim": {"lr": 1e-4, "total_steps": 600_000},
            "train": {"max_steps": 600_000},
        },
        "tiny": {
            "recipe": {"top_k": 4, "clones": 4, "decoder_layers": 3, "decoder_dim": 0, "final_norm": "instance",
                       "ema_decay": 0.998, "ema_end_decay": 0.9995, "ema_anneal_end_step": 300},
            "optim": {"lr": 1e-3, "warmup_steps": 30},
            "train": {"batch_size": 16},
        },
    },
}

# Top-level flags that name a config field.
SHORT_FLAGS = {
    "--data": "data.path", "--out": "train.out", "--max-steps": "train.max_steps",
    "--batch-size": "train.batch_size", "--seq-len": "data.seq_len", "--seed": "train.seed",
    "--parallel": "train.parallel", "--recipe": "recipe.name",
}
TOP_LEVEL = ("preset", "modality")
# Flags of the multi-process launch (``python -m d2v_fast.pretrain --nproc-per-node N``);
# torchrun's spellings with underscores are accepted too. Workers never see them.
LAUNCH_FLAGS = (
    ("--nproc-per-node", "N", "start N worker processes on this node (one per GPU) and wait for them"),
    ("--nnodes", "N|MIN:MAX", "nodes taking part (default 1); more than one needs --rdzv-endpoint"),
    ("--rdzv-endpoint", "HOST:PORT", "rendezvous endpoint every node reaches (c10d backend)"),
    ("--rdzv-id", "ID", "the job's rendezvous id, the same on every node"),
    ("--max-restarts", "N", "restart the workers up to N times after a failure (default 0)"),
    ("--stop-timeout", "SECONDS", "after SIGTERM/SIGINT, how long the workers get to finish their step and "
                                  "write a checkpoint before they are killed (default 300)"),
)


def _launch_dest(flag: str) -> str:
    return "launch_" + flag[2:].replace("-", "_")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (through cli_entry), not usage + message
        raise UsageError(f"{message} (see --help)")


def _parse_value(flag: str, typ, text: str):
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typing.get_origin(typ) is tuple:
            args = typing.get_args(typ)
            if args[-1] is Ellipsis:  # a variable-length tuple of one type (audio conv_dim, ...)
                return tuple(args[0](x) for x in text.replace(" ", "").split(","))
            parts = [float(x) for x in text.replace(" ", "").split(",")]
            if len(parts) != len(args):
                raise ValueError
            return tuple(parts)
        return typ(text)
    except ValueError:
        want = {int: "an integer", float: "a number", bool: "true or false"}.get(typ, str(typ))
        if typing.get_origin(typ) is tuple:
            n = typing.get_args(typ)
            want = "comma-separated integers" if n[-1] is Ellipsis else f"{len(n)} comma-separated numbers"
        raise UsageError(f"{flag} {text!r}: expected {want}") from None


def _fields(cfg: Config | None = None):
    """(section, field, type) of every flag-settable field; the model section is the
    modality's encoder config, less what the corpus sets."""
    from .modalities import get_modality

    cfg = cfg or Config()
    from_corpus = get_modality(cfg.modality).from_corpus
    for section in SECTIONS:
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            if not (section == "model" and f.name in from_corpus):
                yield section, f.name, hints[f.name]


def build_parser(defaults: Config, description: str = "") -> argparse.ArgumentParser:
    p = _Parser(prog="python -m d2v_fast.pretrain", description=description,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    from .modalities import MODALITIES, get_modality

    launch = p.add_argument_group("launcher (checked first, then workers are started through "
                                  "torch.distributed.run's elastic agent)")
    for flag, metavar, text in LAUNCH_FLAGS:
        torchrun_spelling = "--" + flag[2:].replace("-", "_")
        launch.add_argument(*dict.fromkeys((flag, torchrun_spelling)), dest=_launch_dest(flag), metavar=metavar,
                            help=text)

    p.add_argument("--modality", default=defaults.modality, choices=tuple(MODALITIES),
                   help="what to pretrain on (default: %(default)s)")
    p.add_argument("--config", default=defaults.preset, metavar="PRESET",
                   help=f"preset: {' | '.join(get_modality(defaults.modality).encoder_presets)} "
                        f"(default: %(default)s)")
    p.add_argument("--resume", nargs="?", const="auto", default="auto", choices=("auto", "no"),
                   help="auto (default): continue from the newest complete checkpoint in --out when its "
                        "config matches (a different config there is an error); no: refuse a --out with checkpoints")
    p.add_argument("--verify-data", action="store_const", const="start", dest="data.verify",
                   help="check every shard's checksum and token ids before training (= --data.verify start)")
    p.add_argument("--init-from", metavar="HF_DIR",
                   help="start from a local Hugging Face Data2VecTextModel or RobertaModel directory")
    for flag, dotted in SHORT_FLAGS.items():
        section, name = dotted.split(".")
        p.add_argument(flag, dest=dotted, metavar="V",
                       help=f"= --{dotted} (default: {getattr(getattr(defaults, section), name)!r})")
    for section, name, typ in _fields(defaults):
        value = getattr(getattr(defaults, section), name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        p.add_argument(f"--{section}.{name}", dest=f"{section}.{name}", metavar="V",
                       help=f"default: {shown!r}")
    return p


def parse_args(argv=None, description: str = "") -> tuple[Config, argparse.Namespace]:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="tiny")
    pre.add_argument("--recipe", "--recipe.name", dest="recipe", default="data2vec")
    pre.add_argument("--modality", default="text")
    known, _ = pre.parse_known_args(argv)
    cfg = preset(known.config, known.recipe, known.modality)
    args = build_parser(cfg, description).parse_args(argv)
    hints = {f"{s}.{n}": t for s, n, t in _fields(cfg)}
    for dotted, text in vars(args).items():
        if "." not in dotted or text is None:
            continue
        section, name = dotted.split(".")
        flag = next((f for f, d in SHORT_FLAGS.items() if d == dotted), f"--{dotted}")
        setattr(getattr(cfg, section), name, _parse_value(flag, hints[dotted], text))
    validate(cfg)
    return cfg, args


def validate(cfg: Config) -> None:
    """Start-up checks that need no corpus and no process group."""
    m, r, o, d, t = cfg.model, cfg.recipe, cfg.optim, cfg.data, cfg.train

    def need(ok: bool, flag: str, value, fix: str):
        if not ok:
            raise UsageError(f"{flag} {value!r}: {fix}")

    need(r.name in RECIPES, "--recipe", r.name, f"expected one of {', '.join(RECIPES)}")
    need(r.clones >= 1, "--recipe.clones", r.clones, "must be >= 1")
    need(r.name == "data2vec2" or r.clones == 1, "--recipe.clones", r.clones, "only data2vec2 clones samples")
    need(r.decoder_layers >= 1, "--recipe.decoder_layers", r.decoder_layers, "must be >= 1")
    need(r.decoder_kernel >= 1 and r.decoder_kernel % 2 == 1, "--recipe.decoder_kernel", r.decoder_kernel,
         "must be a positive odd number (same padding)")
    need(r.mask_noise_std >= 0, "--recipe.mask_noise_std", r.mask_noise_std, "must be >= 0")
    need(r.decoder_dim >= 0, "--recipe.decoder_dim", r.decoder_dim, "must be >= 0 (0 = the encoder width)")
    need(0 <= r.decoder_dropout < 1, "--recipe.decoder_dropout", r.decoder_dropout, "must be in [0, 1)")
    need(o.lr > 0, "--optim.lr", o.lr, "must be > 0")
    need(all(0 <= b < 1 for b in o.betas), "--optim.betas", o.betas, "each must be in [0, 1)")
    need(o.eps > 0, "--optim.eps", o.eps, "must be > 0")
    need(o.weight_decay >= 0, "--optim.weight_decay", o.weight_decay, "must be >= 0")
    need(o.warmup_steps >= 0, "--optim.warmup_steps", o.warmup_steps, "must be >= 0")
    need(o.total_steps >= 0, "--optim.total_steps", o.total_steps, "must be >= 0 (0 = --max-steps)")
    need(o.clip_norm >= 0, "--optim.clip_norm", o.clip_norm, "must be >= 0 (0 = off)")
    need(m.hidden_size > 0 and m.num_heads > 0 and m.hidden_size % m.num_heads == 0, "--model.hidden_size",
         m.hidden_size, f"must be a positive multiple of --model.num_heads ({m.num_heads})")
    need(m.num_layers >= 1, "--model.num_layers", m.num_layers, "must be >= 1")
    need(m.ffn_size >= 1, "--model.ffn_size", m.ffn_size, "must be >= 1")
    need(0 <= m.dropout < 1, "--model.dropout", m.dropout, "must be in [0, 1)")
    need(0 <= m.attention_dropout < 1, "--model.attention_dropout", m.attention_dropout, "must be in [0, 1)")
    need(d.num_workers >= 0, "--data.num_workers", d.num_workers, "must be >= 0")
    need(o.schedule in ("cosine", "tri_stage"), "--optim.schedule", o.schedule, "expected cosine or tri_stage")
    need(len(o.tri_stage_phases) == 3 and all(x >= 0 for x in o.tri_stage_phases)
         and abs(sum(o.tri_stage_phases) - 1) < 1e-6, "--optim.tri_stage_phases", o.tri_stage_phases,
         "expected 3 non-negative shares (warmup, hold, decay) summing to 1")
    need(d.verify in ("background", "start", "off"), "--data.verify", d.verify, "expected background, start or off")
    need(1 <= r.top_k <= m.num_layers, "--recipe.top_k", r.top_k, f"must be in [1, {m.num_layers}] (the layer count)")
    for flag, v in (("--recipe.layer_norm", r.layer_norm), ("--recipe.final_norm", r.final_norm)):
        need(v in ("instance", "layer", "none"), flag, v, "expected instance, layer or none")
    need(r.loss_beta >= 0, "--recipe.loss_beta", r.loss_beta, "must be >= 0 (0 = MSE)")
    need(r.loss_scale >= 0, "--recipe.loss_scale", r.loss_scale, "must be >= 0 (0 = 1/sqrt(dim))")
    for flag, v in (("--recipe.ema_decay", r.ema_decay), ("--recipe.ema_end_decay", r.ema_end_decay)):
        need(0 <= v <= 1, flag, v, "must be in [0, 1]")
    need(0 <= r.mask_prob <= 1, "--recipe.mask_prob", r.mask_prob, "must be in [0, 1]")
    need(r.mask_span >= 1, "--recipe.mask_span", r.mask_span, "must be >= 1")
    need(t.batch_size >= 1, "--batch-size", t.batch_size, "must be >= 1")
    need(t.micro_batch_size >= 0, "--train.micro_batch_size", t.micro_batch_size, "must be >= 0")
    need(t.max_steps >= 0, "--max-steps", t.max_steps, "must be >= 0 (0 = only initialise and save)")
    need(t.log_every >= 1, "--train.log_every", t.log_every, "must be >= 1")
    need(t.ckpt_every >= 0, "--train.ckpt_every", t.ckpt_every, "must be >= 0 (0 = only at the end)")
    need(t.keep_last >= 1, "--train.keep_last", t.keep_last, "must be >= 1")
    need(t.max_skipped_steps >= 1, "--train.max_skipped_steps", t.max_skipped_steps, "must be >= 1")
    need(t.dtype in ("auto", "bfloat16", "float32"), "--train.dtype", t.dtype, "expected auto, bfloat16 or float32")
    need(t.device in ("auto", "cpu", "cuda"), "--train.device", t.device, "expected auto, cpu or cuda")
    need(t.parallel in ("ddp", "fsdp"), "--parallel", t.parallel, "expected ddp or fsdp")
    need(t.kernels in ("auto", "triton", "torch"), "--train.kernels", t.kernels, "expected auto, triton or torch")
    need(t.compile in COMPILE_CHOICES, "--train.compile", t.compile, "expected " + ", ".join(COMPILE_CHOICES))
    need(t.graph_bucket >= 0, "--train.graph_bucket", t.graph_bucket,
         "must be >= 0 (0 = graphs at each batch's exact length)")
    need(t.attention in ATTENTION_BACKENDS, "--train.attention", t.attention,
         f"expected one of {', '.join(ATTENTION_BACKENDS)}")
    need(t.probe_every >= 0, "--train.probe_every", t.probe_every, "must be >= 0 (0 = only at the end)")
    need(t.probe_every == 0 or t.probe_task != "none", "--train.probe_every", t.probe_every,
         "needs a probe task; drop --train.probe_task none or set --train.probe_every 0")
    from .modalities import get_modality

    get_modality(cfg.modality).validate(cfg)
