"""Every command that a message of d2v_fast names is a command that runs: the hints are
collected from the source (string literals and f-strings, docstrings left out), each
``python -m d2v_fast...`` is run as a module that exists and its arguments, placeholders
filled in, are accepted by that module's own parser; the other tools' commands are run where
the tool is installed, and otherwise checked against what is known of them."""
import ast
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d2v_fast.errors import UsageError

from .helpers import ROOT

PACKAGE = ROOT / "d2v_fast"
# a placeholder in a hint: IN, OUT, DIR, HF_DIR, RUN_DIR, FILE.jsonl, OUT.flac, IN..., N, ..., {path}
PLACEHOLDER = re.compile(r"^(\.\.\.|\{[^}]*\}|[A-Z][A-Z_]*(\.[a-z]+)?(\.\.\.)?)$")
COMMAND_WORDS = ("python", "pip", "ffmpeg", "sox", "iconv", "sudo", "apt-get", "make", "torchrun")
# `python -m` target -> the module whose build_parser() reads its arguments
PARSER_OF = {"d2v_fast.data.audio": "d2v_fast.data.audio.prepare"}


def _strings(tree):
    """(line, text) of every string literal and f-string that is not a docstring or an
    argparse ``prog=`` (the usage line, not a hint); an f-string's fields become ``{expr}``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            skip.add(id(node.body[0].value))
        if isinstance(node, ast.keyword) and node.arg == "prog":
            skip.add(id(node.value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                                       for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def collect_hints() -> list[tuple[str, str]]:
    """(where, command) of every command named in a message."""
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        where = f.relative_to(ROOT)
        for line, text in _strings(ast.parse(f.read_text())):
            for cmd in re.findall(r"python -m d2v_fast[^`);\"']*", text):
                found.append((f"{where}:{line}", cmd.strip().rstrip(".,")))
            for cmd in re.findall(r"`([^`]+)`", text):
                if cmd.split()[0] in COMMAND_WORDS and not cmd.startswith("python -m d2v_fast"):
                    found.append((f"{where}:{line}", cmd.strip()))
    return sorted(set(found))


HINTS = collect_hints()


def _filled(args: list[str], tmp_path: Path) -> list[str]:
    out = []
    for a in args:
        if PLACEHOLDER.match(a):
            out.append("1" if a == "N" else str(tmp_path / re.sub(r"\W", "_", a).strip("_").lower()))
        else:
            out.append(a)
    return out


def test_the_hints_are_found():
    commands = {c for _, c in HINTS}
    assert len(HINTS) >= 15, HINTS
    # the commands that were wrong once are among those checked
    assert "python -m d2v_fast.data.audio --input IN... --out DIR" in commands
    assert "python -m d2v_fast.data.prepare --input ... --out DIR --force" in commands


@pytest.mark.parametrize("where, command", [h for h in HINTS if h[1].startswith("python -m d2v_fast")],
                         ids=lambda v: v if ":" in v else None)
def test_a_d2v_fast_command_in_a_message_runs(where, command, tmp_path):
    words = command.split()
    module, args = words[2], _filled(words[3:], tmp_path)
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{where}: `{command}`: no module {module}"
    if spec.submodule_search_locations:  # a package runs its __main__
        assert importlib.util.find_spec(module + ".__main__") is not None, f"{where}: {module} has no __main__"
    else:
        assert 'if __name__ == "__main__":' in Path(spec.origin).read_text(), f"{where}: {module} does not run"
    try:
        if module == "d2v_fast.pretrain":
            from d2v_fast.config import parse_args

            parse_args(args)
        else:
            importlib.import_module(PARSER_OF.get(module, module)).build_parser().parse_args(args)
    except (UsageError, SystemExit) as err:
        pytest.fail(f"{where}: `{command}` does not run: {err}")


def _run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("where, command", [h for h in HINTS if not h[1].startswith("python -m d2v_fast")],
                         ids=lambda v: v if ":" in v else None)
def test_another_tools_command_in_a_message_runs(where, command, tmp_path):
    words = command.split()
    tool = words[1] if words[0] == "sudo" else words[0]
    if tool == "pip":  # run against what it names: the checkout, or a package that exists on PyPI
        assert words[:2] == ["pip", "install"], f"{where}: {command}"
        names = [w for w in words[2:] if not w.startswith("-")]
        assert names in (["."], ["triton"], ["espeakng-loader"]), f"{where}: {command}: unknown package {names}"
        if names == ["."]:
            assert "--no-build-isolation" in words and "-e" in words  # the README's install command
        return
    if tool == "python":
        assert words[1:] == ["setup.py", "build_ext", "--inplace"], f"{where}: {command}"
        res = _run([sys.executable, "setup.py", "build_ext", "--help"], cwd=ROOT)
        assert res.returncode == 0 and "--inplace" in res.stdout, res.stderr[-2000:]
        return
    if tool == "apt-get":
        assert words[-3:-1] == ["apt-get", "install"] and words[-1] == "dataset-fashion-mnist", f"{where}: {command}"
        if shutil.which("apt-cache") is None:
            pytest.skip("no apt-cache on this machine")
        res = _run(["apt-cache", "show", words[-1]])
        if res.returncode != 0:
            pytest.skip(f"apt-cache does not know {words[-1]} here (no package lists): {res.stderr.strip()}")
        return
    assert tool in ("ffmpeg", "sox", "iconv"), f"{where}: `{command}`: a command this test does not know"
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed here")
    if tool == "iconv":  # `iconv -f latin1 -t utf-8 IN > OUT`
        (tmp_path / "in").write_bytes("caf\xe9\n".encode("latin1"))
        res = _run(["sh", "-c", command.replace("IN", "in").replace("OUT", "out")], cwd=tmp_path)
        assert res.returncode == 0 and (tmp_path / "out").read_text(encoding="utf-8") == "caf\xe9\n", res.stderr
        return
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "in.wav", np.zeros(8000, np.float32), 8000)
    res = _run(command.replace("IN", "in.wav").replace("OUT", "out").split() + (["-y"] if tool == "ffmpeg" else []),
               cwd=tmp_path)
    assert res.returncode == 0 and sf.info(str(tmp_path / "out.flac")).samplerate == 16000, res.stderr[-2000:]
