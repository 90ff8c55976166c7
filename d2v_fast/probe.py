"""Linear probe: is the pretrained encoder any good?

    python -m d2v_fast.probe RUN_DIR_OR_EXPORT_DIR [--task FILE.jsonl] [--seed S] [--device cpu|cuda]
                             [--max-len T] [--batch-size N] [--floor-inits K] [--out probe.json]

The encoder is frozen; each document becomes the mean of its last hidden state over its
real tokens (padding left out), and a linear classifier (multinomial logistic regression,
full-batch L-BFGS in float64, L2 strength chosen on the validation split) is fitted on the
train split and scored on the test split. The same architecture at random initialisation,
computed in the same run, is the floor: the margin above it is what pretraining learned
that a random projection of the tokens does not already give. The floor is the mean over
``--floor-inits`` random initialisations (seeds S, S+1, ...; default 3 for text): one
draw's accuracy varies by about 1.5 points from seed to seed on the built-in task, as much
as the tiny default job's whole margin, so one draw would make the margin mostly noise.
Speech and images default to 1 (their tiny jobs' margins are 5-12 points).

The built-in task asks which standard-library module a docstring comes from (23 modules
on Python 3.11); its test documents are held out of the built-in pretraining corpus. A
user task is a JSON-lines file with ``text`` and ``label`` fields (and optionally ``split``:
train, val or test; without it the documents are split 60/20/20 per label, seeded).

RUN_DIR_OR_EXPORT_DIR is a run directory (its ``encoder.safetensors``, else its newest checkpoint)
or a Hugging Face ``Data2VecTextModel``/``RobertaModel`` directory (``python -m
d2v_fast.export`` writes one). For a run directory the result is also written to
``RUN_DIR/probe.json``.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .errors import UsageError, cli_entry
from .linear_probe import FLOOR_INITS, PROBE_FILE, details, summary
from .modalities.text import DEFAULT_BATCH, DEFAULT_MAX_LEN
from .probing import probe_path





# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from .config import _Parser

    p = _Parser(prog="python -m d2v_fast.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("path", metavar="RUN_DIR_OR_EXPORT_DIR", help="run directory or Hugging Face model directory")
    p.add_argument("--task", metavar="FILE.jsonl", help="labelled task (text, label[, split]); default: built-in")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init floor's first initialisation")
    p.add_argument("--floor-inits", type=int, default=None, metavar="K",
                   help=f"random initialisations averaged for the floor (0: no floor; default {FLOOR_INITS} "
                        f"for text, 1 for speech and images)")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="tokens per document, <s> and </s> included")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="documents per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", metavar="FILE", help=f"write the result here (default: RUN_DIR/{PROBE_FILE} for a run)")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_len < 3:
        raise UsageError(f"--max-len {args.max_len}: must be at least 3 (<s>, one token, </s>)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.floor_inits is not None and args.floor_inits < 0:
        raise UsageError(f"--floor-inits {args.floor_inits}: must be at least 0 (0: no random-init floor)")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available; use --device cpu")
    result = probe_path(args.path, task=args.task, seed=args.seed, max_len=args.max_len,
                        batch_size=args.batch_size, device=args.device, out=args.out, progress=True,
                        floor_inits=args.floor_inits)
    print(summary(result))
    print(details(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
