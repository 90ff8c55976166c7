"""Registers of the Triton kernels on an H100/H200, checked without a GPU: every kernel the
launchers select at the base shapes of every recipe is compiled for sm_90
(``python -m d2v_fast.kernels.registers``, in a subprocess: the kernels must be imported
without TRITON_INTERPRET, which conftest.py sets for this process) and none spills.

Also the layer loops of build_targets' kernels, which run over K without unrolling (that
is what keeps their registers low): their values against the eager twin, in Triton's
interpreter, at awkward shapes and at every number of layer pointers.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2v_fast import kernels
from d2v_fast.kernels import eager as twin
from d2v_fast.kernels import gather as kgather
from d2v_fast.kernels import registers
from d2v_fast.kernels import targets as ktargets

ROOT = Path(__file__).resolve().parents[1]
TARGETS_SPLIT = {"_targets_time_kernel", "_instance_stats_kernel", "_instance_finalize_kernel",
                 "_instance_apply_kernel"}  # instance norms: the fused kernel and the split method's
STEP = {"_move_rows_kernel", "_regression_loss_kernel", "_scale_rows_kernel"}
# What each case must compile: a launcher change that stops selecting (or compiling) one fails here.
EXPECTED = {
    "text-data2vec": {"_targets_token_kernel", "_layer_norm_dual_kernel"} | STEP,
    "text-data2vec2": TARGETS_SPLIT | {"_layer_norm_dual_kernel"} | STEP,
    "speech-data2vec": TARGETS_SPLIT | STEP,
    "speech-data2vec2": TARGETS_SPLIT | STEP,
    "images-data2vec": {"_targets_token_kernel"} | STEP,
    "images-data2vec2": TARGETS_SPLIT | {"_targets_token_kernel"} | STEP,
    "ema": {"_ema_flat_kernel", "_ema_multi_kernel"},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    why = registers.missing_tools()
    if why:
        pytest.skip(f"cannot compile for sm_90 here: {why}")
    out = tmp_path_factory.mktemp("registers") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "d2v_fast.kernels.registers", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the report failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_no_kernel_spills_registers_at_base_shapes(report):
    unknown = [r for r in report["rows"] if r["spill_stores"] is None or r["regs"] is None]
    assert not unknown, f"no ptxas/cuobjdump numbers for: {[(r['case'], r['op'], r['kernel']) for r in unknown]}"
    spills = [f"{r['case']} / {r['op']} / {r['kernel']}: {r['regs']} registers, {r['spill_stores']} bytes "
              f"spill stores, {r['spill_loads']} loads ({r['num_warps']} warps, {r['constexprs']})"
              for r in report["rows"] if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "kernels spill registers on sm_90:\n" + "\n".join(spills)
    assert all(r["blocks_per_sm"] >= 1 for r in report["rows"])


def test_every_kernel_the_launchers_select_was_compiled(report):
    compiled: dict[str, set[str]] = {}
    ops: dict[str, set[str]] = {}
    for r in report["rows"]:
        compiled.setdefault(r["case"], set()).add(r["kernel"])
        ops.setdefault(r["case"], set()).add(r["op"])
    assert compiled == EXPECTED
    # every kernel defined in d2v_fast/kernels is in the report (a new one must be added there)
    defined = set()
    for path in (ROOT / "d2v_fast" / "kernels").glob("*.py"):
        defined |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    assert defined == set(registers.KERNELS) == set().union(*EXPECTED.values())
    for case in ("text-data2vec2", "speech-data2vec", "speech-data2vec2", "images-data2vec2"):
        assert {"build_targets [fused]", "build_targets [split]", "build_targets [split S=1]"} <= ops[case]
    stats = {r["constexprs"]["FINAL"] for r in report["rows"] if r["kernel"] == "_instance_stats_kernel"}
    assert stats == {True, False}  # one time split and several
    shapes = {c["case"]: (c["T"], c["C"], c["K"], c["clones"]) for c in report["cases"]}
    assert shapes == {"text-data2vec": (512, 768, 10, 1), "text-data2vec2": (512, 768, 12, 8),
                      "speech-data2vec": (999, 768, 8, 1), "speech-data2vec2": (999, 768, 8, 8),
                      "images-data2vec": (196, 768, 6, 1), "images-data2vec2": (196, 768, 10, 16)}
    assert report["ema"]["parameters"] == 85_054_464
    assert report["arch"] == "sm_90" and report["triton"] and report["torch"] and report["date"]


# ----------------------------------------------------------------------------- the layer loops
INTERPRETED = kernels.is_interpreted(kgather._move_rows_kernel)
cpu_triton = pytest.mark.skipif(not (kernels.AVAILABLE and INTERPRETED),
                                reason="the Triton side on CPU needs triton and TRITON_INTERPRET=1 before import")


def layers_case(K, B, T, C, clones, seed=0):
    """Layers that differ in scale and offset (a layer read twice or skipped changes the
    targets), a padding mask (sample 1 fully padded when B > 1) and a ``[B*clones, T]`` mask."""
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(K, dtype=torch.float32)[:, None, None, None]
    x = torch.randn(K, B, T, C, generator=g) * (1 + k) + 3 * k + torch.randn(K, 1, 1, C, generator=g)
    pad = torch.rand(B, T, generator=g) < 0.25
    pad[0] = False
    if B > 1:
        pad[1] = True
    mask = (torch.rand(B * clones, T, generator=g) < 0.5) & ~pad.repeat_interleave(clones, 0)
    mask[0, 0] = True
    return x, pad, mask


@cpu_triton
@pytest.mark.parametrize("K", [1, ktargets.MAX_LIST_LAYERS, ktargets.MAX_LIST_LAYERS + 1])
def test_layer_loops_match_the_eager_twin(poisoned, monkeypatch, K):
    """Every kernel that loops over the K layers at run time, for K = 1, every pointer
    argument (16) and more (one stacked tensor): the values of the twin."""
    x, pad, mask = layers_case(K, 2, 11, 40, clones=2)
    one = mask[::2]  # one mask row per sample
    runs = [  # (time method, layer_norm, final_norm, layers as a list?, mask): the kernels they reach
        ("fused", "layer", None, True, one),  # token kernel, one row per masked token
        ("fused", "layer", "layer", True, mask),  # token kernel over the tokens, stored per clone
        ("fused", "instance", None, True, mask),  # time kernel
        ("fused", "instance", "layer", False, None),  # time kernel, then the token kernel (K = 1)
        ("split", "instance", None, True, one),  # statistics, merge of the time splits, apply
        ("split", "instance", None, False, mask),
    ]
    monkeypatch.setattr(ktargets, "SPLIT_MIN_PROGRAMS", 64)  # two time splits at this size
    monkeypatch.setattr(ktargets, "SPLIT_BLOCK_T", 8)
    for method, layer_norm, final_norm, as_list, m in runs:
        monkeypatch.setattr(ktargets, "TIME_METHOD", method)
        kw = dict(padding_mask=pad, mask=m, layer_norm=layer_norm, final_norm=final_norm)
        got = ktargets.build_targets([*x] if as_list else x, **kw)
        want = twin.build_targets(x, **kw)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@cpu_triton
@pytest.mark.parametrize("T,C", [(1, 5), (37, 3), (5, 130)])
def test_layer_loops_at_awkward_shapes(poisoned, T, C):
    """One position, three channels, a row wider than one tile of the token kernel's channels."""
    x, pad, mask = layers_case(3, 2, T, C, clones=1, seed=1)
    for layer_norm, final_norm in [("layer", None), ("instance", None), ("instance", "layer")]:
        for m in (mask, None):
            kw = dict(padding_mask=pad, mask=m, layer_norm=layer_norm, final_norm=final_norm)
            torch.testing.assert_close(ktargets.build_targets([*x], **kw), twin.build_targets(x, **kw),
                                       atol=2e-5, rtol=1e-5)
