"""Corpus preparation for every modality: ``python -m d2v_fast.data.prepare [--modality
text|audio|images] ...`` hands its flags to that modality's own command (text by default:
``d2v_fast/data/text/prepare.py``; speech: ``data/audio/prepare.py``; images:
``data/images/prepare.py``); see docs/data.md.
"""
from __future__ import annotations

import importlib
import sys

from ..errors import UsageError, cli_entry
from .text.prepare import build_parser  # noqa: F401 (the flags it reads without --modality: text's)


# ``--modality text|audio|images`` (default text) hands the remaining flags to that modality's
# preparation CLI.
MODALITY_PREPARE = {"text": "d2v_fast.data.text.prepare", "audio": "d2v_fast.data.audio.prepare",
                    "images": "d2v_fast.data.images.prepare"}


def _pop_modality(argv: list[str]) -> tuple[str, list[str]]:
    rest, modality, i = [], "text", 0
    while i < len(argv):
        a = argv[i]
        if a == "--modality" and i + 1 < len(argv):
            modality, i = argv[i + 1], i + 2
            continue
        if a.startswith("--modality="):
            modality = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if modality not in MODALITY_PREPARE:
        raise UsageError(f"--modality {modality!r}: expected {', '.join(MODALITY_PREPARE)}")
    return modality, rest


@cli_entry
def main(argv=None) -> int:
    modality, argv = _pop_modality(list(sys.argv[1:] if argv is None else argv))
    return importlib.import_module(MODALITY_PREPARE[modality]).main(argv)


if __name__ == "__main__":
    sys.exit(main())
