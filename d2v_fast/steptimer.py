"""One full optimizer step of a provider, timed on synthetic batches: the providers (the
engine's step, the plain Hugging Face step, the eager reference, with and without
``torch.compile``), the batches, one measurement row, the ablation's configs and the
environment a result records. ``python -m d2v_fast.bench`` prints them, ``d2v_fast/cost.py``
counts what one such step dispatches, and ``benchmarks/test_step.py`` times them; see
docs/performance.md."""
from __future__ import annotations

import copy
import dataclasses
import datetime
import platform
import time
from pathlib import Path

import torch

from .config import Config
from .errors import UsageError


PROVIDERS = ("d2v_fast", "hf", "reference", "reference+compile")
RESERVED_IDS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
# The step's performance switches: --train.<name>, (value when on, value when off).
ABLATION = {"skip_on_device": (True, False), "host_counts": (True, False), "cast_once": (True, False),
            "compile": ("blocks", "none"), "fused_qkv": (True, False), "bf16_teacher": (True, False),
            "bf16_student": (True, False), "kernels": ("triton", "torch")}


@dataclasses.dataclass
class SyntheticCorpus:
    """Just what the trainer reads off a corpus, for benchmarking without data."""

    vocab_size: int = 50265
    special_ids: dict = dataclasses.field(default_factory=lambda: dict(RESERVED_IDS))
    path: Path = Path("<synthetic>")
    meta: dict = dataclasses.field(default_factory=lambda: {"tokenizer": {"sha256": ""}, "source": {}})


def synthetic_batch(cfg: Config, batch_size: int, vocab: int, seed: int = 0) -> dict:
    """Unpadded ``<s> … </s>`` blocks with span masks, as the MaskCollator makes them; for
    speech, unit-variance noise waveforms of ``data.max_samples`` with the recipe's frame masks."""
    from .data.text.dataset import MaskCollator

    g = torch.Generator().manual_seed(seed)
    if cfg.modality == "audio":
        from .models.audio import num_frames
        from .modalities.audio import FrameMasks

        wav = torch.randn(batch_size, cfg.data.max_samples, generator=g)
        T = num_frames(cfg.model, cfg.data.max_samples)
        return {"waveform": wav, "num_frames": T, "indices": torch.arange(batch_size), "epoch": 0,
                **FrameMasks(cfg.recipe, seed)(T, torch.arange(batch_size), 0)}
    if cfg.modality != "text":
        raise UsageError(f"--modality {cfg.modality}: the step benchmark has text and audio rows so far")
    T = cfg.data.seq_len
    items = []
    for i in range(batch_size):
        ids = torch.randint(len(RESERVED_IDS), vocab, (T,), generator=g)
        ids[0], ids[-1] = RESERVED_IDS["bos"], RESERVED_IDS["eos"]
        items.append({"input_ids": ids, "index": i, "epoch": 0})
    from .modalities.text import masking_for

    return MaskCollator(RESERVED_IDS, masking_for(cfg.recipe), seed)(items)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"CPU {model} ({os.cpu_count()} cores)"


class EngineStep:
    def __init__(self, cfg: Config, device: torch.device, vocab: int):
        from .trainer import Trainer

        if cfg.modality == "images":
            from .modalities.images import SyntheticImageCorpus

            corpus = SyntheticImageCorpus()
        else:
            corpus = SyntheticCorpus(vocab_size=vocab)
        self.trainer = Trainer(cfg, corpus, Path("/tmp/d2v_fast-bench"), device=device)

    def __call__(self, batch: dict) -> None:
        self.trainer.train_step([batch], stats=False)  # an update the loop does not log, as most are


class ReferenceStep:
    """The oracle's own optimizer update (``d2v_fast.reference.train.ReferenceStep``, the one
    the parity tests run), optionally ``torch.compile``d."""

    def __init__(self, cfg: Config, device: torch.device, vocab: int, compile: bool = False):
        if cfg.modality == "audio":
            from .reference.audio import ReferenceAudioStep

            if compile:
                raise UsageError("--providers reference+compile: text only; use reference for --modality audio")
            self.step = ReferenceAudioStep(cfg, device=device)
            return
        from .reference.train import ReferenceStep as Step

        self.step = Step(cfg, vocab, RESERVED_IDS["pad"], device=device, compile=compile)

    def __call__(self, batch: dict) -> None:
        self.step([batch])


class ReferenceImageStep:
    """The image oracle's optimizer update (``d2v_fast.reference.images``, the parity tests' one)."""

    def __init__(self, cfg: Config, device: torch.device):
        from .reference.images import ReferenceImageStep as Step

        self.step = Step(cfg, device=device)

    def __call__(self, batch: dict) -> None:
        self.step([batch])


def make_step(provider: str, cfg: Config, device: torch.device, vocab: int):
    if cfg.modality == "images" and provider not in ("d2v_fast", "reference"):
        raise UsageError(f"--providers: {provider!r} has no image step; choose from d2v_fast, reference")
    if provider == "d2v_fast":
        return EngineStep(cfg, device, vocab)
    if cfg.modality == "images":
        return ReferenceImageStep(cfg, device)
    if provider == "hf":
        if cfg.modality != "text":
            raise UsageError(f"--providers hf: text only; use d2v_fast,reference for --modality {cfg.modality}")
        from .reference.hf_step import HFData2VecStep

        return HFData2VecStep(cfg, device, vocab, RESERVED_IDS["pad"])
    if provider == "reference":
        return ReferenceStep(cfg, device, vocab)
    if provider == "reference+compile":
        return ReferenceStep(cfg, device, vocab, compile=True)
    raise UsageError(f"--providers: unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


def measure_batch(cfg: Config, device: torch.device, batch_size: int | None = None, vocab: int = 50265) -> dict:
    """The synthetic micro-batch a step benchmark feeds every provider."""
    batch_size = batch_size or cfg.train.batch_size
    if cfg.modality == "images":
        from .modalities.images import synthetic_batch as image_batch

        return image_batch(cfg, batch_size, augment_on_device=device.type == "cuda")
    return synthetic_batch(cfg, batch_size, vocab)


def result_row(provider: str, cfg: Config, batch: dict, batch_size: int, seconds: float, peak_mem: int | None,
               device: torch.device) -> dict:
    """A step benchmark's row from one step's seconds: throughput in the modality's input units
    (patches for images, frames for speech; the ``tokens_per_s`` column keeps its name), model
    TFLOP/s, MFU against the device's dense bf16 peak, peak memory."""
    from .modalities import get_modality
    from .schedule import peak_flops

    modality = get_modality(cfg.modality)
    if cfg.modality == "images":
        from .modalities.images import flops_per_patch

        tokens, flops_per_token = batch_size * cfg.model.num_patches, flops_per_patch(cfg)
    else:
        tokens, flops_per_token = modality.units(batch), modality.flops_per_unit(cfg)
    peak = peak_flops(device)
    return {"provider": provider, "modality": cfg.modality, "unit": modality.unit, "preset": cfg.preset,
            "batch_size": batch_size, "seq_len": tokens // batch_size,
            "attention": cfg.train.attention if provider == "d2v_fast" else None,
            "step_s": seconds, "tokens_per_s": tokens / seconds,
            "masked_targets_per_s": float(batch["mask"].sum()) / seconds,
            "model_tflops": tokens / seconds * flops_per_token / 1e12,
            "mfu": (tokens / seconds * flops_per_token / peak) if peak else None,
            "peak_memory_gib": peak_mem / 2 ** 30 if peak_mem is not None else None}


def measure(provider: str, cfg: Config, *, device: torch.device, batch_size: int, steps: int, warmup: int,
            vocab: int = 50265) -> dict:
    """Times ``steps`` steps after ``warmup`` (device events on CUDA). Returns one result row."""
    if cfg.modality not in ("text", "images", "audio"):
        raise UsageError(f"--modality {cfg.modality}: d2v_fast.bench times text, images and audio")
    batch = measure_batch(cfg, device, batch_size, vocab)
    step = make_step(provider, cfg, device, vocab)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for _ in range(warmup):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step(batch)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / steps
        peak_mem = torch.cuda.max_memory_allocated(device)
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(batch)
        seconds = (time.perf_counter() - t0) / steps
        peak_mem = None
    row = result_row(provider, cfg, batch, batch_size, seconds, peak_mem, device)
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def ablation_configs(cfg: Config, device: torch.device) -> list[tuple[str, Config]]:
    """(row label, config): all switches on, each off in turn, all at the config's values, and
    on a GPU those values with the encoder stacks as CUDA graphs (``--train.compile
    stack-cudagraphs``, not a switch of the ``all`` row: it replaces ``compile blocks``). On the
    CPU the Triton kernels would run in the interpreter, so ``kernels`` stays as set, and
    ``bf16_teacher``/``bf16_student`` are left out unless ``--train.dtype bfloat16``."""
    cuda = device.type == "cuda"
    switches = {k: v for k, v in ABLATION.items()
                if (k != "kernels" or cuda) and (k not in ("bf16_teacher", "bf16_student") or cuda
                                                 or cfg.train.dtype == "bfloat16")}
    on = {k: v[0] for k, v in switches.items()}
    rows = [("d2v_fast[all]", on)] + [(f"d2v_fast[-{k}]", {**on, k: switches[k][1]}) for k in switches]
    out = []
    for label, values in rows:
        c = copy.deepcopy(cfg)
        for k, v in values.items():
            setattr(c.train, k, v)
        out.append((label, c))
    out.append(("d2v_fast[defaults]", cfg))
    if cuda:
        c = copy.deepcopy(cfg)
        c.train.compile = "stack-cudagraphs"
        out.append(("d2v_fast[defaults+stack-cudagraphs]", c))
    return out


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def format_table(rows: list[dict]) -> str:
    head = f"{'provider':<28}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'step ms':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"{r['provider']:<28}{r['tokens_per_s']:>12,.0f}{r['model_tflops']:>10.2f}{mfu:>8}{mem:>10}"
                     f"{1e3 * r['step_s']:>10.1f}")
    return "\n".join(lines)
