"""Pretrain a data2vec encoder (text by default; --modality audio | images).

    python -m d2v_fast.pretrain [--nproc-per-node N] [--modality M] [--config tiny|base|large]
        [--data DIR] [--out DIR] [--max-steps N] [--batch-size SEQS] [--seq-len T] [--seed S]
        [--resume auto|no] [--verify-data] [--init-from HF_DIR] [--section.field VALUE ...]

Without --nproc-per-node it runs one process. With it, the command first checks the flags, the
corpus (building the built-in one if needed), --out and --init-from, so that a problem is one
line and exit status 2 before any worker starts; then it starts N workers through
torch.distributed.run's elastic agent (torchrun's, in this process) and waits for them.
SIGTERM or Ctrl-C makes every worker finish its step and write a checkpoint, and the command
exits 0; an error in a worker is one line and its exit status. ``torchrun -m d2v_fast.pretrain``
starts the same workers, but torchrun exits 1 with a traceback after a signal or an error.
With no --data the modality's built-in corpus (text: Python standard-library docstrings) is
prepared and used. Every config field can be set as --section.field; --help lists them with
the chosen preset's defaults.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from .config import LAUNCH_FLAGS, _launch_dest
from .errors import UsageError, cli_entry

# The directory where workers started by ``launch`` report how they ended (see _WorkerStatus).
STATUS_ENV = "D2V_FAST_LAUNCH_STATUS"
DEFAULT_STOP_TIMEOUT = 300  # seconds a worker gets to finish its step and checkpoint after a signal


class Failed(Exception):
    """A run that ends with one line and exit status 1 without being the user's input's fault
    (a representation collapse, non-finite updates)."""


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


def graphs_note(trainer) -> str:
    """The start-up line's word on ``--train.compile stack-cudagraphs``."""
    t = trainer.cfg.train
    if t.compile != "stack-cudagraphs":
        return ""
    if not trainer.stack_graphs:
        return "; encoder stacks eager (--train.compile stack-cudagraphs records CUDA graphs on a GPU only)"
    size = f"lengths that vary padded to multiples of {t.graph_bucket}" if t.graph_bucket > 1 \
        and t.attention != "flash" else "exact lengths"
    if getattr(trainer.enc_cfg, "layerdrop", 0.0) > 0:
        return f"; the teacher's encoder stack as CUDA graphs ({size}), the student's eager (layer drop)"
    return f"; encoder stacks as CUDA graphs ({size})"


def _check_world(cfg, world: int) -> None:
    if cfg.train.batch_size % world:
        raise UsageError(f"--batch-size {cfg.train.batch_size}: not divisible by the world size {world}; "
                         f"use a multiple of {world}")
    local = cfg.train.batch_size // world
    if cfg.train.micro_batch_size and local % cfg.train.micro_batch_size:
        raise UsageError(f"--train.micro_batch_size {cfg.train.micro_batch_size}: must divide the per-rank "
                         f"batch {local} (--batch-size {cfg.train.batch_size} over {world} rank(s))")
    if cfg.train.compile == "stack-cudagraphs":
        from .graphs import refuse_several_processes

        refuse_several_processes(world)


def _check_probe_task(cfg, modality) -> bool:
    """Whether the run ends with a probe; a bad task file stops now, not after training."""
    probing = modality.has_probe and cfg.train.probe_task != "none"
    if probing and cfg.train.probe_task != "builtin":
        from .data.text.probe_task import read_task

        read_task(cfg.train.probe_task, flag="--train.probe_task")
    return probing


def _check_out(out: Path, resume: str, cfg, modality, corpus):
    """The newest complete checkpoint in ``out`` when this run may resume it, else None;
    UsageError when ``out`` holds a run this command must not continue."""
    from . import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(out)
    if latest is not None:
        if resume == "no":
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
    return latest


def run(argv=None) -> int:
    from .config import parse_args

    cfg, args = parse_args(argv, description=__doc__)
    if args.launch_nproc_per_node is not None:
        return launch(cfg, args, list(sys.argv[1:] if argv is None else argv))
    ignored = [f for f, _, _ in LAUNCH_FLAGS if getattr(args, _launch_dest(f)) is not None]
    if ignored:
        raise UsageError(f"{ignored[0]}: only with --nproc-per-node (the multi-process launch); add "
                         f"--nproc-per-node N or drop {ignored[0]}")
    rank, world, local_rank = _dist_env()
    _check_world(cfg, world)
    worker = "LOCAL_RANK" in os.environ
    if worker:  # a signal before training starts is kept for its first step, on every rank alike
        _remember_stop_requests()

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
    probing = _check_probe_task(cfg, modality)
    if cfg.data.verify == "start" and rank == 0:
        modality.verify_corpus(corpus)

    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        out = Path(cfg.train.out) if cfg.train.out else _default_out(rank, world)
        latest = _check_out(out, args.resume, cfg, modality, corpus)
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
            f"{', '.join(k for k, v in trainer.switches.items() if v) or 'none'}{graphs_note(trainer)}; run dir {out}",
            file=sys.stderr)
        if _STOP_REQUESTS:  # a signal came before training: fit stops after its first step, with a checkpoint
            trainer.stop_requested = True
            say(f"{signal.Signals(_STOP_REQUESTS[0]).name}: stopping after the first step, with a checkpoint",
                file=sys.stderr)
        try:
            history = trainer.fit()
        except (CollapseError, NonFiniteError) as err:
            raise Failed(str(err)) from None
        if trainer.stopped_early:
            say(f"stopped on request at step {trainer.step}; checkpoint written, run the same command to "
                f"continue", file=sys.stderr)
            return 0
        if history and rank == 0:
            first, last = history[0], history[-1]
            unit = modality.unit
            speed = statistics.median(r[f"{unit}_per_s"] for r in history)
            say(f"done: step {trainer.step}, loss {first['loss']:.4f} (step {first['step']}) -> "
                f"{last['loss']:.4f} (step {last['step']}), {speed:,.0f} {unit}/s (the median over {len(history)} "
                f"logging interval(s), steps {first['step']}-{last['step']}); {trainer.skipped} update(s) skipped; "
                f"encoder saved to {out / ckpt.ENCODER_FILE}", file=sys.stderr)
        if rank == 0 and probing:
            from .linear_probe import details, summary
            from .probing import probe_path

            say("linear probe of the encoder against a random-init floor (--train.probe_task none skips it)",
                file=sys.stderr)
            try:
                with _stop_interrupts():  # training is complete: a signal now ends the probe only
                    result = probe_path(out, task=cfg.train.probe_task, seed=cfg.train.seed, device=str(device),
                                        progress=cfg.train.progress)
            except _Stop as stop:
                say(f"{stop}: probe stopped; training is complete and saved in {out}; probe it later with "
                    f"`python -m d2v_fast.probe {out}`", file=sys.stderr)
                return 0
            print(summary(result), flush=True)
            say(f"{details(result)}; written to {out / 'probe.json'}", file=sys.stderr)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- the multi-process launch
def _int_flag(flag: str, text, default: int, low: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise UsageError(f"{flag} {text!r}: expected an integer >= {low}")
    return value


def _nodes(text) -> tuple[int, int]:
    """``--nnodes N`` or ``MIN:MAX``."""
    parts = str(text or "1").split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise UsageError(f"--nnodes {text!r}: expected N or MIN:MAX with 1 <= MIN <= MAX")
    return lo, hi


def _worker_argv(argv: list[str]) -> list[str]:
    """``argv`` less the launcher's flags (either spelling, ``--flag V`` or ``--flag=V``)."""
    spellings = {s for flag, _, _ in LAUNCH_FLAGS for s in (flag, "--" + flag[2:].replace("-", "_"))}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in spellings:
            skip = True
        elif a.split("=", 1)[0] not in spellings:
            out.append(a)
    return out


def _check_checkpoint_files(latest: Path) -> None:
    """What the launcher can check of the checkpoint a run will resume without loading it:
    its files are there and the weights match their recorded sha256."""
    from . import checkpoint as ckpt

    meta = ckpt.read_checkpoint_meta(latest)
    for name in (ckpt.STATE_FILE, ckpt.MODEL_FILE):
        if not (latest / name).is_file():
            raise UsageError(f"{latest / name}: missing; use an earlier checkpoint than {latest.name} "
                             f"(delete this one) or start a new --out")
    if ckpt.sha256_file(latest / ckpt.MODEL_FILE) != meta["model_sha256"]:
        raise UsageError(f"{latest / ckpt.MODEL_FILE}: its sha256 differs from the one recorded in "
                         f"{ckpt.META_FILE} (cut short or altered); use an earlier checkpoint than {latest.name} "
                         f"(delete this one) or start a new --out")


def _quiet_elastic_logs() -> None:
    """torch's elastic agent logs each forwarded signal and failed worker as warnings; the
    launcher says what happened in its own words (set LOGLEVEL to see the agent's logs)."""
    import logging

    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401 (their loggers, now)
    import torch.distributed.elastic.rendezvous.dynamic_rendezvous  # noqa: F401

    if "LOGLEVEL" in os.environ:
        return
    prefixes = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")
    for name in [*prefixes, *(n for n in list(logging.Logger.manager.loggerDict) if n.startswith(prefixes))]:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _statuses(directory: Path, nproc: int) -> list[dict | None]:
    """Each local rank's ``_WorkerStatus`` of the newest worker group (None: it wrote none)."""
    found = {}
    for f in directory.glob("rank-*.json"):
        try:
            found[int(f.stem[5:])] = json.loads(f.read_text())
        except (OSError, ValueError):
            pass
    newest = max((r["restart"] for r in found.values()), default=0)
    return [found[r] if r in found and found[r]["restart"] == newest else None for r in range(nproc)]


def _first_error(statuses) -> dict | None:
    return next((s for s in statuses if s and s["code"] and s.get("error")), None)


def launch(cfg, args, argv: list[str]) -> int:
    """``--nproc-per-node N``: check what can be checked here, then start the workers through
    ``torch.distributed.run`` (torchrun's elastic agent, in this process) and wait for them.
    Returns 0 when they finished or stopped cleanly after SIGTERM/SIGINT (each wrote its
    checkpoint), a worker's error's status (its line printed once), or 1."""
    if "LOCAL_RANK" in os.environ:
        raise UsageError("--nproc-per-node: this process is already a worker of a launcher (torchrun); "
                         "drop --nproc-per-node, or run `python -m d2v_fast.pretrain --nproc-per-node N` "
                         "without torchrun")
    if threading.current_thread() is threading.main_thread():  # until the workers run: stop as Ctrl-C does
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    nproc = _int_flag("--nproc-per-node", args.launch_nproc_per_node, 1, 1)
    min_nodes, max_nodes = _nodes(args.launch_nnodes)
    max_restarts = _int_flag("--max-restarts", args.launch_max_restarts, 0, 0)
    stop_timeout = _int_flag("--stop-timeout", args.launch_stop_timeout, DEFAULT_STOP_TIMEOUT, 1)
    endpoint, rdzv_id = args.launch_rdzv_endpoint, args.launch_rdzv_id
    if max_nodes > 1 and not endpoint:
        raise UsageError(f"--nnodes {args.launch_nnodes}: several nodes need --rdzv-endpoint HOST:PORT (a node "
                         f"every node reaches) and the same --rdzv-id on every node")
    if min_nodes == max_nodes:
        _check_world(cfg, min_nodes * nproc)
    import torch

    cuda = torch.cuda.is_available()
    if cfg.train.device == "cuda" and not cuda:
        raise UsageError("--train.device cuda: no CUDA device is available; use --train.device cpu")
    if cfg.train.device != "cpu" and cuda and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc-per-node {nproc}: this node has {torch.cuda.device_count()} GPU(s); start at "
                         f"most that many workers (one per GPU), or use --train.device cpu")
    from .modalities import get_modality

    modality = get_modality(cfg.modality)
    corpus = modality.open_corpus(cfg, rank=0)  # the built-in corpus is built here, once
    _check_probe_task(cfg, modality)
    out = Path(cfg.train.out) if cfg.train.out else None
    if out is None and max_nodes == 1:  # every worker and restart gets it: no per-run-id marker needed
        out = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    latest = _check_out(out, args.resume, cfg, modality, corpus) if out is not None else None
    if latest is not None:
        _check_checkpoint_files(latest)
    elif args.init_from:
        config, _ = modality.read_hf(args.init_from)
        modality.check_hf_fits(config, modality.encoder_config(cfg, corpus), args.init_from)
    worker_argv = _worker_argv(argv) + (["--out", str(out)] if out is not None and not cfg.train.out else [])

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rdzv = ["--standalone"] if max_nodes == 1 and not endpoint else \
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id or "d2v_fast"]
    targs = torchrun.parse_args([*rdzv, "--nnodes", f"{min_nodes}:{max_nodes}", "--nproc-per-node", str(nproc),
                                 "--max-restarts", str(max_restarts), "-m", "d2v_fast.pretrain", *worker_argv])
    if hasattr(targs, "shutdown_timeout"):
        targs.shutdown_timeout = stop_timeout
    else:
        os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(stop_timeout)
    if nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its banner
    _quiet_elastic_logs()
    status_dir = Path(tempfile.mkdtemp(prefix="d2v_fast-launch-"))
    os.environ[STATUS_ENV] = str(status_dir)
    try:
        torchrun.run(targs)
        return 0
    except SignalException as err:
        statuses = _statuses(status_dir, nproc)
        if all(s is not None and s["code"] == 0 for s in statuses):
            return 0  # every worker finished its step, wrote its checkpoint and said so
        failed = _first_error(statuses)
        if failed:
            print(f"error: {failed['error']}", file=sys.stderr)
            return failed["code"]
        late = [s["rank"] if s else f"local {r}" for r, s in enumerate(statuses) if s is None or s["code"] != 0]
        print(f"error: {signal.Signals(err.sigval).name}: worker rank(s) {', '.join(map(str, late))} did not stop "
              f"cleanly within {stop_timeout} s (--stop-timeout); a rerun resumes from the newest complete "
              f"checkpoint{f' in {out}' if out else ''}", file=sys.stderr)
        return 1
    except ChildFailedError as err:
        failed = _first_error(_statuses(status_dir, nproc))
        if failed:
            print(f"error: {failed['error']}", file=sys.stderr)
            return failed["code"]
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        what = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        print(f"error: worker rank {rank} {what}; its output is above", file=sys.stderr)
        return 1
    finally:
        os.environ.pop(STATUS_ENV, None)
        shutil.rmtree(status_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- signals outside fit()
_STOP_REQUESTS: list[int] = []


class _Stop(Exception):
    pass


def _remember_stop_requests() -> None:
    """SIGTERM/SIGINT before ``Trainer.fit`` installs its own handlers: remembered, so that
    training stops after its first step with a checkpoint (every rank takes that step, so the
    ranks stay in step however the signal reached them)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: _STOP_REQUESTS.append(signum))


class _stop_interrupts:
    """Within the block, SIGTERM/SIGINT raise ``_Stop`` (its text is the signal's name)."""

    def __enter__(self):
        def stop(signum, frame):
            raise _Stop(signal.Signals(signum).name)

        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------- entry points
def _single(argv=None) -> int:
    try:
        return run(argv)
    except Failed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


_cli = cli_entry(_single)


class _WorkerStatus:
    """How a worker started by ``launch`` ended, written where the launcher reads it: one
    JSON file per local rank, ``code`` null while it runs. torch's elastic agent reports a
    worker's exit status only when it fails, and after a signal it reports none, so this is
    how the launcher tells a clean stop (every worker exited 0 after its checkpoint) from a
    worker killed at the stop timeout, and gets a worker's one-line error to print once."""

    def __init__(self, directory: str):
        self.path = Path(directory) / f"rank-{int(os.environ.get('LOCAL_RANK', 0))}.json"
        self.record = {"rank": int(os.environ.get("RANK", 0)),
                       "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), "pid": os.getpid()}

    def write(self, code: int | None, error: str | None = None) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**self.record, "code": code, "error": error}))
        os.replace(tmp, self.path)


def main(argv=None) -> int:
    directory = os.environ.get(STATUS_ENV)
    if not directory or "LOCAL_RANK" not in os.environ:
        return _cli(argv)
    status = _WorkerStatus(directory)  # a worker of launch(): its error line is the launcher's to print
    status.write(None)
    code, error = 1, None  # an unexpected exception: status 1, no line (Python prints the traceback)
    try:
        code = run(argv)
    except UsageError as err:
        code, error = 2, str(err)
    except Failed as err:
        code, error = 1, str(err)
    except KeyboardInterrupt:
        code, error = 130, "interrupted"
    finally:
        status.write(code, error)
    return code

if __name__ == "__main__":
    sys.exit(main())
