"""The README as a user reads it: short, its links lead somewhere, the commands it shows with
their output (```console blocks) run and print what it says, and every `python -m d2v_fast`
command in its other blocks is accepted by that module's own parser."""
import importlib
import re
import shlex
import subprocess
import sys

import pytest

from d2v_fast.errors import UsageError

from .helpers import ROOT
from .test_hints import PARSER_OF

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)
# written by the fine-tuning work that lands beside this README; every other link must exist
LINKS_WRITTEN_ELSEWHERE = {"docs/finetune.md"}


def _console_examples():
    """(command, expected output lines) of every `$ ` line in a ```console block."""
    out = []
    for lang, body in BLOCKS:
        if lang != "console":
            continue
        for line in body.splitlines():
            if line.startswith("$ "):
                out.append([line[2:], []])
            elif out:
                out[-1][1].append(line)
    return [tuple(x) for x in out]


def _module_commands():
    """Every `python -m d2v_fast...` line of the README's ```bash blocks (comments cut)."""
    cmds = []
    for lang, body in BLOCKS:
        if lang == "bash":
            for line in body.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("python -m d2v_fast"):
                    cmds.append(line)
    return cmds


def test_the_readme_is_short_and_in_order():
    assert len(README.splitlines()) <= 250
    heads = re.findall(r"^## (.*)$", README, flags=re.M)
    assert heads == ["Two commands", "What the default job prints", "Your own corpus", "Into Hugging Face",
                     "Performance", "Links"], heads


def test_the_readme_links_lead_somewhere():
    links = set(re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", README))
    assert {"docs/design.md", "docs/data.md", "docs/finetune.md"} <= links
    missing = [p for p in sorted(links - LINKS_WRITTEN_ELSEWHERE) if not (ROOT / p).is_file()]
    assert not missing, missing


def test_the_docs_cite_nothing_outside_the_repository():
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = f.read_text()
        assert not re.search("|".join(("SP" "EC", r"issue [0-9]")), text), f


@pytest.mark.parametrize("command, expected", _console_examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_readme_example_runs_as_shown(command, expected):
    assert expected, f"`{command}`: the README shows no output for it"
    res = subprocess.run([sys.executable if w == "python" else w for w in shlex.split(command)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors = expected[0].startswith("error:")
    assert res.returncode == (2 if errors else 0), (res.returncode, res.stderr[-2000:])
    out = res.stderr if errors else res.stdout
    assert out.strip().splitlines() == expected, out
    assert "Traceback" not in res.stderr


def test_the_readme_examples_are_found():
    cmds = [c for c, _ in _console_examples()]
    assert len(cmds) >= 4 and "python -m d2v_fast.pretrain --config huge" in cmds
    assert len(_module_commands()) >= 10


@pytest.mark.parametrize("command", _module_commands())
def test_a_readme_command_is_accepted_by_its_parser(command):
    words = shlex.split(command)
    module, args = words[2], words[3:]
    try:
        if module == "d2v_fast.pretrain":
            from d2v_fast.config import parse_args

            parse_args(args)
        elif module == "d2v_fast.data.prepare":  # `--modality X` hands the rest to X's own parser
            from d2v_fast.data.prepare import MODALITY_PREPARE, _pop_modality

            modality, rest = _pop_modality(args)
            name = MODALITY_PREPARE.get(modality, module)
            importlib.import_module(name).build_parser().parse_args(rest)
        else:
            importlib.import_module(PARSER_OF.get(module, module)).build_parser().parse_args(args)
    except (UsageError, SystemExit) as err:
        pytest.fail(f"`{command}` does not parse: {err}")


def test_the_help_the_readme_names_runs():
    res = subprocess.run([sys.executable, "-m", "d2v_fast.pretrain", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0 and "--optim.lr" in res.stdout and "--modality" in res.stdout


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for a in parts[i:]:
                obj = getattr(obj, a)
            return True
        except AttributeError:
            return False
    return False


def test_the_docs_name_files_and_modules_that_exist():
    """A path or a ``d2v_fast.x.y`` the README or docs/ name is there (they moved with the code)."""
    bad = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = f.read_text()
        for path in re.findall(r"(?<![\w/])((?:d2v_fast|tests|benchmarks|csrc|examples)/[\w/.-]+\.(?:py|sh|cpp|h|jsonl|json))",
                               text):
            if not (ROOT / path).exists():
                bad.append((f.name, path))
        bad += [(f.name, m) for m in re.findall(r"(?<![\w.])(d2v_fast(?:\.\w+)+)", text) if not _resolves(m)]
    assert bad == []
