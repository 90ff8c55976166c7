"""Fine-tune a pretrained encoder on a labelled task with the Hugging Face Trainer, against
the same architecture trained from random initialisation with the same budget.

    python -m d2v_fast.finetune RUN_OR_EXPORT [--task builtin|FILE] [--out DIR]
                                [--max-steps N] [--lr LR] [--batch-size N] [--seed S] [--no-scratch]

RUN_OR_EXPORT is a run directory (its newest checkpoint is exported first) or a Hugging Face
model directory written by ``python -m d2v_fast.export``; its modality picks the task:

- text: sequence classification (``Data2VecTextForSequenceClassification``). Built-in: the
  probe's task (which standard-library module a docstring comes from; its test documents
  are held out of the built-in pretraining corpus). Yours: JSONL or CSV with ``text`` and
  ``label`` (and optionally ``split``: train, val or test).
- speech: speech recognition with CTC (``Data2VecAudioForCTC``; a character vocabulary saved
  as ``Wav2Vec2CTCTokenizer`` in a ``Wav2Vec2Processor``; the convolutional feature encoder
  frozen). Built-in: held-out eSpeak NG utterances (``d2v_fast/data/audio/asr_task.py``).
  Yours: JSONL of ``{"audio": PATH, "text": ...}``. Reports CER and WER.
- images: classification (``Data2VecVisionForImageClassification``). Built-in: Fashion-MNIST
  train, tested on its t10k photos. Yours: a prepared image corpus with classes, or a
  directory of class folders (prepared on the fly at the model's image size).

The output directory (default ``RUN/finetuned``, or ``EXPORT-finetuned``) is a Hugging Face
model directory with its tokenizer / processor / image processor, runnable by
``transformers.pipeline`` of its task, plus ``finetune.json`` (both runs' results, steps,
seconds, task sizes, seeds). Written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UsageError, cli_entry

RESULT_FILE = "finetune.json"
# per-modality defaults: each modality's tiny default run fine-tunes (and its control
# trains) within the 5-minute budget on a 2-core CPU (docs/finetune.md)
DEFAULTS = {"text": {"max_steps": 300, "lr": 1e-3, "batch_size": 16},
            "audio": {"max_steps": 300, "lr": 1e-3, "batch_size": 8},
            "images": {"max_steps": 300, "lr": 5e-4, "batch_size": 32}}
WARMUP = 0.1  # fraction of the steps with a linear warmup (then linear decay to 0)
WEIGHT_DECAY = 0.01


@dataclass
class Job:
    """One modality's fine-tuning task, as the common loop runs it."""

    modality: str
    pipeline_task: str                 # transformers.pipeline task name
    model_class: type                  # the transformers class with the task head
    config: object                     # its config (labels or vocabulary set)
    base: Path                         # the pretrained Hugging Face directory
    train: object                      # torch Dataset of examples the collator takes
    collator: Callable
    evaluate: Callable                 # evaluate(model, device) -> {metric: value, ...}
    metric: str                        # the headline metric's key in evaluate()'s result
    higher_is_better: bool
    save: Callable                     # save(directory): the tokenizer / processor beside the weights
    task: dict                         # description: source, sizes, classes or vocabulary
    prepare_model: Callable = lambda model: None  # e.g. freeze the feature encoder
    head: str | None = None            # parameter-name prefix of the task head (given head_lr_mult)
    head_lr_mult: float = 1.0          # the head's learning rate as a multiple of --lr
    held_out: bool | None = None       # whether the test examples were kept out of pretraining
    extra: dict = field(default_factory=dict)  # more of finetune.json
    handles: dict = field(default_factory=dict)  # objects for callers (tests), not written


# ----------------------------------------------------------------------------- the model
def model_kind(path: Path) -> tuple[str, str]:
    """(modality, "run" | "hf") of a run directory or Hugging Face model directory."""
    from .. import checkpoint as ckpt

    hf_types = {"data2vec-text": "text", "roberta": "text", "data2vec-audio": "audio",
                "data2vec-vision": "images", "beit": "images"}
    if not path.is_dir():
        raise UsageError(f"RUN_OR_EXPORT {path}: no such directory; give a run directory or a Hugging Face export "
                         f"(python -m d2v_fast.export RUN_DIR OUT_DIR)")
    config = {}
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        pass
    config = config if isinstance(config, dict) else {}
    is_run = (path / ckpt.CKPT_DIR).is_dir() or (path / ckpt.ENCODER_META).is_file()
    if not is_run and config.get("model_type") in hf_types:
        return hf_types[config["model_type"]], "hf"
    if is_run:
        if ckpt.latest_checkpoint(path) is None:
            raise UsageError(f"RUN_OR_EXPORT {path}: a run directory without a complete checkpoint; train until one is "
                             f"written (--train.ckpt_every and the end of a run write them) or give an export")
        modality = config.get("modality", "text")
        if modality not in ("text", "audio", "images"):
            raise UsageError(f"RUN_OR_EXPORT {path}: config.json modality {modality!r} is not one d2v_fast knows")
        return modality, "run"
    raise UsageError(f"RUN_OR_EXPORT {path}: neither a run directory (no checkpoints/) nor a Hugging Face model "
                     f"directory (no config.json with model_type data2vec-text, data2vec-audio or data2vec-vision); "
                     f"give one of those")


def build_job(modality: str, base: Path, task: str | None, *, run_config: dict | None, progress: bool,
              seed: int, work: Path) -> Job:
    if modality == "text":
        from .text import text_job as make
    elif modality == "audio":
        from .speech import speech_job as make
    else:
        from .images import images_job as make
    return make(base, task, run_config=run_config, progress=progress, seed=seed, work=work)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def fresh_model(job: Job, seed: int):
    """The control: ``job.model_class`` built from the same config, weights from random
    initialisation drawn under ``seed``."""
    from transformers import set_seed

    set_seed(seed)
    model = job.model_class(job.config)
    job.prepare_model(model)
    return model


def pretrained_model(job: Job, seed: int):
    """The pretrained encoder with a new task head (drawn under ``seed``)."""
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    set_seed(seed)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    try:
        model = job.model_class.from_pretrained(job.base, config=job.config)
    except (OSError, ValueError, RuntimeError) as err:
        raise UsageError(f"{job.base}: its weights do not load into {job.model_class.__name__} ("
                         f"{' '.join(str(err).split())[:200]}); export the run again "
                         f"(python -m d2v_fast.export RUN_DIR OUT_DIR)") from None
    finally:
        hf_logging.set_verbosity(level)
    job.prepare_model(model)
    return model


# ----------------------------------------------------------------------------- training
def _progress_bar(what: str):
    """A Trainer callback drawing one bar on stderr (steps, the latest logged loss); stdout
    is left to the result line."""
    from tqdm import tqdm
    from transformers import TrainerCallback

    class Bar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=f"finetune ({what})", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix_str(f"loss={float(logs['loss']):.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Bar()


def _trainer_class(job: Job):
    """The Hugging Face ``Trainer``, or, where the job gives its head its own learning rate,
    one whose optimizer (the Trainer's own, same class and weight-decay groups) has the
    head's parameters in groups of their own at ``head_lr_mult`` times the rate (the
    schedule scales every group alike)."""
    from transformers import Trainer

    if job.head_lr_mult == 1.0 or not job.head:
        return Trainer

    class HeadLrTrainer(Trainer):
        def create_optimizer(self, model=None):
            opt = super().create_optimizer(model)
            if getattr(opt, "head_lr_mult", None) is None:
                head = {id(p) for n, p in (model or self.model).named_parameters() if n.startswith(job.head)}
                groups = [{**g, "params": ps, "lr": g["lr"] * (job.head_lr_mult if in_head else 1.0)}
                          for g in opt.param_groups for in_head in (False, True)
                          if (ps := [p for p in g["params"] if (id(p) in head) == in_head])]
                opt.param_groups.clear()  # no steps taken yet: no state to move
                for g in groups:
                    opt.add_param_group(g)
                opt.head_lr_mult = job.head_lr_mult
            return opt

    return HeadLrTrainer


def train_and_evaluate(job: Job, model, *, max_steps: int, lr: float, batch_size: int, seed: int, scratch_dir: Path,
                       progress: bool, what: str) -> dict:
    """Train ``model`` with the Hugging Face Trainer, then score it on the task's test split."""
    import torch
    from transformers import PrinterCallback, ProgressCallback, TrainingArguments

    if progress:
        print(f"finetune: the {what} ({count_parameters(model):,} parameters), {max_steps} steps",
              file=sys.stderr, flush=True)
    args = TrainingArguments(
        output_dir=str(scratch_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, warmup_steps=int(WARMUP * max_steps), lr_scheduler_type="linear",
        weight_decay=WEIGHT_DECAY, seed=seed, data_seed=seed, save_strategy="no", report_to="none",
        logging_steps=max(1, max_steps // 20), disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available())
    trainer = _trainer_class(job)(model=model, args=args, train_dataset=job.train, data_collator=job.collator)
    for quiet in (PrinterCallback, ProgressCallback):  # they print every log to stdout
        trainer.remove_callback(quiet)
    if progress:
        trainer.add_callback(_progress_bar(what))
    t0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        metrics = job.evaluate(model, device)
    return {**metrics, "train_loss": float(out.training_loss), "train_seconds": round(train_seconds, 2),
            "train_cpu_seconds": round(train_cpu, 2),
            "eval_seconds": round(time.perf_counter() - t0, 2), "parameters": count_parameters(model),
            "architecture": type(model).__name__}


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished child processes (the
    task builders' workers): with the wall seconds and the load average, what a reader of a
    shared machine's timings can judge them by."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def host_record(load_start, cpu_start: float) -> dict:
    """What the timings ran on: CPUs, torch threads, the device, the load average (1 min)
    at the start and the end (a shared machine's timings say little without it), and the
    command's CPU seconds (from the start of ``finetune_path``)."""
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": device, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_1min": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
            "cpu_seconds": round(cpu_seconds() - cpu_start, 1)}


def default_out(path: Path, kind: str) -> Path:
    return path / "finetuned" if kind == "run" else path.with_name(path.name + "-finetuned")


def finetune_path(path, *, task: str | None = None, out=None, max_steps: int | None = None, lr: float | None = None,
                  batch_size: int | None = None, seed: int = 0, scratch: bool = True, progress: bool = False,
                  command: str | None = None) -> dict:
    """Fine-tune a run or export (see the module docstring); returns finetune.json's content."""
    from ..files import staged_directory
    from ..linear_probe import write_result

    path = Path(path)
    modality, kind = model_kind(path)
    out = Path(out) if out else default_out(path, kind)
    if out.resolve() == path.resolve():
        raise UsageError(f"--out {out}: the model's own directory; choose another output directory")
    d = DEFAULTS[modality]
    max_steps = d["max_steps"] if max_steps is None else max_steps
    lr = d["lr"] if lr is None else lr
    batch_size = d["batch_size"] if batch_size is None else batch_size
    t_start, load_start, cpu_start = time.perf_counter(), os.getloadavg(), cpu_seconds()
    work = Path(tempfile.mkdtemp(prefix=".finetune-", dir=out.parent if out.parent.is_dir() else None))
    try:
        run_config = None
        if kind == "run":
            from ..pretrained import export

            base = export(path, work / "base")
            try:
                run_config = json.loads((path / "config.json").read_text())
            except (OSError, ValueError):
                run_config = None
        else:
            base = path
        job = build_job(modality, base, task, run_config=run_config, progress=progress, seed=seed, work=work)
        runs = {}
        model = pretrained_model(job, seed)
        runs["pretrained"] = train_and_evaluate(job, model, max_steps=max_steps, lr=lr, batch_size=batch_size,
                                                seed=seed, scratch_dir=work / "trainer", progress=progress,
                                                what="pretrained encoder")
        if scratch:
            control = fresh_model(job, seed)
            runs["scratch"] = train_and_evaluate(job, control, max_steps=max_steps, lr=lr, batch_size=batch_size,
                                                 seed=seed, scratch_dir=work / "trainer", progress=progress,
                                                 what="same architecture from random initialisation")
            del control
        result = {
            "model": str(path), "kind": kind, "modality": modality, "out": str(out),
            "task": {**job.task, "pipeline": job.pipeline_task}, "test_held_out_of_pretraining": job.held_out,
            "metric": job.metric, "higher_is_better": job.higher_is_better,
            "value": runs["pretrained"][job.metric],
            "scratch_value": runs["scratch"][job.metric] if scratch else None,
            "pretrained": runs["pretrained"], "scratch": runs.get("scratch"),
            "steps": max_steps, "batch_size": batch_size, "lr": lr, "warmup_steps": int(WARMUP * max_steps),
            "weight_decay": WEIGHT_DECAY,
            "seeds": {"training": seed, "head_init": seed, "scratch_init": seed if scratch else None},
            **job.extra, "command": command, "seconds": None,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        with staged_directory(out) as staging:
            model.save_pretrained(staging)
            job.save(staging)
            result["seconds"] = round(time.perf_counter() - t_start, 1)
            result["host"] = host_record(load_start, cpu_start)
            write_result(result, staging / RESULT_FILE)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary(result: dict) -> str:
    """``finetune: 0.xx vs 0.yy from scratch (metric ...)``."""
    higher = result["higher_is_better"]
    notes = [(result["metric"].upper() if result["metric"] in ("cer", "wer") else result["metric"])
             + ("" if higher else ", lower is better")]
    line = f"finetune: {result['value']:.2f}"
    if result.get("scratch"):
        line += f" vs {result['scratch_value']:.2f} from scratch"
    if result["metric"] == "cer":
        notes.append(f"WER {result['pretrained']['wer']:.2f}"
                     + (f" vs {result['scratch']['wer']:.2f}" if result.get("scratch") else ""))
    return f"{line} ({'; '.join(notes)})"


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from ..config import _Parser

    p = _Parser(prog="python -m d2v_fast.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("path", metavar="RUN_OR_EXPORT", help="run directory or Hugging Face model directory")
    p.add_argument("--task", default="builtin", metavar="builtin|FILE",
                   help="builtin (default), or: text a .jsonl/.csv file (text, label[, split]); speech a .jsonl file "
                        "(audio, text[, split]); images a prepared corpus or a directory of class folders")
    p.add_argument("--out", metavar="DIR", help="output model directory (default RUN/finetuned or EXPORT-finetuned)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="optimizer steps of each run (default: text, speech, images "
                        + ", ".join(str(v["max_steps"]) for v in DEFAULTS.values()) + ")")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per modality, docs/finetune.md)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="examples per step")
    p.add_argument("--seed", type=int, default=0, help="seed of the head's and the control's init and of the data order")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch control run")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps {args.max_steps}: must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr {args.lr}: must be a positive number (e.g. 5e-5)")
    command = " ".join(["python", "-m", "d2v_fast.finetune", *(sys.argv[1:] if argv is None else argv)])
    result = finetune_path(args.path, task=args.task, out=args.out, max_steps=args.max_steps, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, scratch=not args.no_scratch, progress=True,
                           command=command)
    print(summary(result))
    print(f"finetune: wrote {result['out']} ({RESULT_FILE} beside the model; {result['seconds']:.0f}s); run it with "
          f"transformers.pipeline({result['task']['pipeline']!r}, model={result['out']!r})", file=sys.stderr)
    return 0
