"""Pretrain a data2vec encoder (text by default; --modality audio | images).

    torchrun --standalone --nproc_per_node=N -m d2v_fast.pretrain [--modality M] [--config tiny|base|large]
        [--data DIR] [--out DIR] [--max-steps N] [--batch-size SEQS] [--seq-len T] [--seed S]
        [--resume auto|no] [--verify-data] [--init-from HF_DIR] [--section.field VALUE ...]

Plain ``python -m d2v_fast.pretrain`` runs a single process. With no --data the modality's
built-in corpus (text: Python standard-library docstrings) is prepared and used. Every config field can
be set as --section.field; --help lists them with the chosen preset's defaults.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

from .errors import UsageError, cli_entry


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _default_out(rank: int, world: int) -> Path:
    """runs/<timestamp>, the same on every rank and across torchrun's elastic restarts."""
    import torch.distributed as dist

    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    marker = Path("runs") / ".torchrun" / run_id if run_id else None
    name = [None]
    if rank == 0:
        if marker is not None and marker.is_file():
            name[0] = marker.read_text().strip()
        else:
            name[0] = str(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
            if marker is not None:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(name[0] + "\n")
    if world > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def run(argv=None) -> int:
    from .config import parse_args

    cfg, args = parse_args(argv, description=__doc__)
    rank, world, local_rank = _dist_env()
    if cfg.train.batch_size % world:
        raise UsageError(f"--batch-size {cfg.train.batch_size}: not divisible by the world size {world}; "
                         f"use a multiple of {world}")
    local = cfg.train.batch_size // world
    if cfg.train.micro_batch_size and local % cfg.train.micro_batch_size:
        raise UsageError(f"--train.micro_batch_size {cfg.train.micro_batch_size}: must divide the per-rank "
                         f"batch {local} (--batch-size {cfg.train.batch_size} over {world} rank(s))")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork
    import torch
    import torch.distributed as dist

    from . import checkpoint as ckpt
    from .modalities import get_modality
    from .trainer import CollapseError, NonFiniteError, Trainer

    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UsageError("--train.device cuda: no CUDA device is available; use --train.device cpu")
    device = torch.device("cuda", local_rank) if want == "cuda" or (want == "auto" and torch.cuda.is_available()) \
        else torch.device("cpu")

    modality = get_modality(cfg.modality)
    corpus = modality.open_corpus(cfg, rank=rank)
    probing = modality.has_probe and cfg.train.probe_task != "none"
    if probing and cfg.train.probe_task != "builtin":  # a bad task file stops now, not after training
        from .data.probe_task import read_task

        read_task(cfg.train.probe_task, flag="--train.probe_task")
    if cfg.data.verify == "start" and rank == 0:
        modality.verify_corpus(corpus)

    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        out = Path(cfg.train.out) if cfg.train.out else _default_out(rank, world)
        latest = ckpt.latest_checkpoint(out)
        if latest is not None:
            if args.resume == "no":
                raise UsageError(f"--out {out}: already holds checkpoints and --resume is no; choose another --out")
            saved = ckpt.read_checkpoint_meta(latest)
            diff = ckpt.config_difference(saved.get("config") or {}, cfg.to_dict())
            if diff:
                raise UsageError(f"--out {out}: holds a run with a different config ({diff}); use the same "
                                 f"settings to resume it, or choose another --out")
            theirs = (saved.get("corpus") or {}).get("fingerprint")
            if theirs and theirs != modality.corpus_fingerprint(corpus):
                raise UsageError(f"--out {out}: was trained on another corpus ({saved['corpus'].get('path')}); "
                                 f"give that corpus with --data, or choose another --out")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            resolved = modality.resolved_config(cfg, corpus)
            resolved.update(world_size=world, data_dir=str(modality.corpus_path(corpus)), device=str(device))
            (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
            modality.prepare_run_dir(corpus, out)
        trainer = Trainer(cfg, corpus, out, rank=rank, world_size=world, device=device)
        say = print if rank == 0 else (lambda *a, **k: None)
        if latest is not None:
            trainer.load(latest)
            say(f"resumed from {latest} (step {trainer.step})", file=sys.stderr)
        elif args.init_from:
            trainer.init_from(args.init_from)
            say(f"initialised student and teacher from {args.init_from}", file=sys.stderr)
        trainer.truncate_metrics()
        if cfg.data.verify == "background" and rank == 0:
            trainer.verify_in_background()
        n = trainer.model.student.encoder.num_params()
        say(f"d2v_fast: recipe {cfg.recipe.name} on {cfg.modality}, preset {cfg.preset}, {n / 1e6:.2f}M "
            f"non-embedding parameters; {world} process(es) on {device.type}; {modality.describe(cfg, corpus)} "
            f"({trainer.accum} micro-batch(es) of {trainer.micro_batch_size} per rank"
            f"{', the largest that fits' if trainer.micro_batch_auto else ''}); step switches on: "
            f"{', '.join(k for k, v in trainer.switches.items() if v) or 'none'}; run dir {out}",
            file=sys.stderr)
        try:
            history = trainer.fit()
        except (CollapseError, NonFiniteError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if trainer.stopped_early:
            say(f"stopped on request at step {trainer.step}; checkpoint written, run the same command to "
                f"continue", file=sys.stderr)
            return 0
        if history and rank == 0:
            first, last = history[0], history[-1]
            say(f"done: step {trainer.step}, loss {first['loss']:.4f} (step {first['step']}) -> "
                f"{last['loss']:.4f} (step {last['step']}), {last['tokens_per_s']:,.0f} {modality.unit}/s; "
                f"{trainer.skipped} update(s) skipped; encoder saved to {out / ckpt.ENCODER_FILE}", file=sys.stderr)
        if rank == 0 and probing:
            from .probe import details, probe_path, summary

            result = probe_path(out, task=cfg.train.probe_task, seed=cfg.train.seed, device=str(device))
            print(summary(result), flush=True)
            say(f"{details(result)}; written to {out / 'probe.json'}", file=sys.stderr)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


main = cli_entry(run)

if __name__ == "__main__":
    sys.exit(main())
