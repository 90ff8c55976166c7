"""Hugging Face export: a checkpoint's encoder as a model directory of its modality's class
(``Data2VecTextModel``, ``Data2VecAudioModel`` or ``Data2VecVisionModel``).

    python -m d2v_fast.export CHECKPOINT OUT_DIR [--weights student|teacher] [--dtype float32|bfloat16]

``CHECKPOINT`` is a run directory (its newest complete checkpoint is used), a checkpoint
directory or a file in one. Only the checkpoint's ``model.safetensors`` and ``config.json``
are read, checked against the recorded checksum and the encoder config; nothing in them
runs. For text the output holds ``config.json``, ``model.safetensors`` with exactly the base-model
keys (pooler included, freshly initialised: pretraining has none) and the tokenizer files,
and loads offline with ``Data2VecTextModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``. Needs only safetensors and tokenizers.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import cli_entry
from .hf_text import DTYPES
from .pretrained import export  # noqa: F401  (d2v_fast.export.export, as before)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from .config import _Parser

    p = _Parser(prog="python -m d2v_fast.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory, checkpoint directory or state.pt")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the Hugging Face model into")
    p.add_argument("--weights", choices=("student", "teacher"), default="student")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = export(args.checkpoint, args.out_dir, weights=args.weights, dtype=args.dtype)
    cls = json.loads((out / "config.json").read_text()).get("architectures", ["Data2VecTextModel"])[0]
    print(f"exported {args.weights} weights ({args.dtype}) to {out}; load with "
          f"transformers.{cls}.from_pretrained({str(out)!r})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
