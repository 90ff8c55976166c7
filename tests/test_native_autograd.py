"""The step's C++ autograd nodes (``csrc/autograd.cpp``) against the Python Functions they
stand in for: the same values and gradients, bit for bit, over awkward shapes and every
combination of inputs that need a gradient."""
import importlib
import zlib

import pytest
import torch

from d2v_fast import ops
from d2v_fast.models import encoder

try:
    importlib.import_module("d2v_fast._C")
    BUILT = True
except ImportError:
    BUILT = False
C = ops.native()
pytestmark = pytest.mark.skipif(not BUILT, reason="d2v_fast._C not built (pip install --no-build-isolation -e .)")


def _seed(*key) -> None:
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def test_the_built_extension_has_the_nodes():
    """An extension that imports but lacks the nodes (built from an older checkout) would make
    every other test here pass without running them: rebuild it."""
    assert C is not None, "d2v_fast._C has no autograd nodes: rebuild with pip install --no-build-isolation -e ."


def _grads(out, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    grads = [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]
    want = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(outs, want, grads, allow_unused=True)
    return [None if x is None else x.clone() for x in got]


def _same(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 13), (3, 1, 4, 13)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("low", ["none", "sole", "shared"])
@pytest.mark.parametrize("fp32_grads", [False, True])
def test_shadow_linear_matches_the_python_function(shape, bias, low, fp32_grads, monkeypatch):
    # fp32_grads: the parameter gradients in fp32 from the GEMM (a GPU's arithmetic), forced
    # on the Python side too (on the CPU both take the bf16 GEMM and a cast, one op here)
    monkeypatch.setattr(encoder, "_fp32_grads", lambda t: fp32_grads)
    monkeypatch.setattr(encoder, "_MM_OUT_DTYPE", [])  # the Python side's probe of torch.mm(out_dtype=)
    _seed(shape, bias, low, fp32_grads)
    out_features = 11
    for x_grad, w_grad in [(True, True), (True, False), (False, True)]:
        x = torch.randn(shape)
        weight = torch.randn(out_features, shape[-1])
        b32 = torch.randn(out_features) if bias else None
        w, bb = weight.to(torch.bfloat16), (b32.to(torch.bfloat16) if bias else None)
        x_low = x.to(torch.bfloat16) if low != "none" else None
        if low == "sole":  # a LayerNorm's rounded output read by this Linear alone: x is the copy
            x, x_low = x_low, None
        x.requires_grad_(x_grad)
        weight.requires_grad_(w_grad)
        if b32 is not None:
            b32.requires_grad_(w_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = C.shadow_linear(x, weight, b32, w, w.t(), bb, x_low, fp32_grads)
            theirs = encoder._ShadowLinearFn.apply(x, weight, b32, w, w.t(), bb, x_low)
        _same(ours, theirs)
        seed = int(torch.randint(0, 2**31, ()))
        for a, b_ in zip(_grads(ours, (x, weight, b32), seed), _grads(theirs, (x, weight, b32), seed)):
            _same(a, b_)


@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24), (1, 1, 7)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("used", ["y", "low", "both"])
def test_layer_norm_dual_node_matches_the_python_function(shape, affine, used):
    _seed(shape, affine, used)
    c = shape[-1]
    x = (3 * torch.randn(shape) + 1).requires_grad_()
    weight = torch.randn(c).requires_grad_() if affine != "none" else None
    bias = torch.randn(c).requires_grad_() if affine == "both" else None
    ours = ops.layer_norm_dual(x, weight, bias, 1e-5)
    saved = ops._NATIVE[:]
    ops._NATIVE[:] = [None]  # the Python Function
    try:
        theirs = ops.layer_norm_dual(x, weight, bias, 1e-5)
    finally:
        ops._NATIVE[:] = saved
    assert isinstance(ours, tuple) and isinstance(theirs, tuple)
    assert type(ours[0].grad_fn).__name__ != type(theirs[0].grad_fn).__name__  # two different nodes compared
    for a, b in zip(ours, theirs):
        _same(a.detach(), b.detach())
    pick = {"y": lambda o: o[:1], "low": lambda o: o[1:], "both": lambda o: o}[used]
    seed = int(torch.randint(0, 2**31, ()))
    for a, b in zip(_grads(pick(ours), (x, weight, bias), seed), _grads(pick(theirs), (x, weight, bias), seed)):
        _same(a, b)


def _shadowed_layer(dropout=0.0):
    """One text block with the bf16 copies a student gets (``--train.bf16_student``)."""
    from d2v_fast.kernels.ema import flatten_params_

    cfg = encoder.EncoderConfig(hidden_size=24, num_heads=4, ffn_size=48, dropout=dropout, attention_dropout=dropout)
    layer = encoder.Layer(cfg)
    encoder.fuse_qkv_([layer])
    encoder.shadow_linears_(layer, flatten_params_(layer), torch.bfloat16, buffers=False)
    return layer


def test_a_shadowed_block_runs_the_cpp_nodes():
    _seed("block")
    layer = _shadowed_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, _ = layer(torch.randn(2, 5, 24, requires_grad=True))
    names, seen, stack = [], set(), [h.grad_fn]
    while stack:  # every node of the block's graph
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.append(node.name())
            stack.extend(n for n, _ in node.next_functions)
    assert names.count("torch::autograd::CppNode<d2v::(anonymous namespace)::ShadowLinearFn>") == 4  # qkv, out, ffn x 2
    assert names.count("torch::autograd::CppNode<d2v::(anonymous namespace)::LayerNormDualFn>") == 2
    assert not {"_ShadowLinearFnBackward", "_LayerNormDualBackward"} & set(names)
    assert not any(n.startswith("ToCopyBackward") for n in names)  # no cast of a weight or a norm output


def test_a_compiled_shadowed_block_is_one_graph(monkeypatch):
    """While compiling, the Python Functions run (dynamo traces them) and the extension is not
    looked up: no graph break in a block, even when the first lookup would happen there."""
    monkeypatch.setattr(ops, "_NATIVE", [])  # not looked up yet
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    _seed("compiled")
    layer = _shadowed_layer()
    eager = _shadowed_layer()
    eager.load_state_dict(layer.state_dict())
    layer.compile(backend=backend, dynamic=False)
    x = torch.randn(2, 5, 24)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(2):
                out, _ = layer(x)
            ref, _ = eager(x)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    assert torch.equal(out, ref)


def test_fp32_weight_gradient_is_one_counted_op():
    """On the CPU the weight gradient's GEMM with an fp32 result is the GEMM and a cast inside
    one dispatcher op, ``d2v_fast::mm_out_dtype`` (one kernel on a GPU): the step-cost
    counter sees one op."""
    from d2v_fast.cost import CostCounter

    x = torch.randn(6, 8, dtype=torch.bfloat16)
    weight = torch.randn(5, 8, requires_grad=True)
    w = weight.detach().to(torch.bfloat16)
    out = C.shadow_linear(x, weight, None, w, w.t(), None, None, True)
    counter = CostCounter()
    with counter:
        (gw,) = torch.autograd.grad(out, [weight], torch.ones_like(out))
    assert counter.ops["d2v_fast::mm_out_dtype"] == 1
    assert "aten::mm" not in counter.ops  # the bf16 GEMM is inside the one op
    assert gw.dtype == torch.float32
    assert torch.equal(gw, torch.ones(6, 5, dtype=torch.bfloat16).t().mm(x).float())


def test_an_older_extension_falls_back_with_one_warning(monkeypatch):
    import types

    from d2v_fast import extension

    stale = types.ModuleType("d2v_fast._C")
    monkeypatch.setattr(ops, "_NATIVE", [])
    monkeypatch.setattr(extension, "C", stale)
    with pytest.warns(RuntimeWarning, match="no layer_norm_dual_grad.*Python Functions.*rebuild"):
        assert ops.native() is None
    assert ops.native() is None  # looked up once


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or C is None, reason="needs CUDA and d2v_fast._C")
def test_native_nodes_on_gpu_match_the_python_functions(monkeypatch):
    """On a GPU: the shadowed Linear's parameter gradients, and its fp32 input's, in fp32
    straight from the GEMM (``aten::mm.dtype`` where torch has it, both sides), and the dual
    LayerNorm (the Triton kernel when compiled, else its twin) with its C++ backward node, and
    with the residual added in its pass."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    monkeypatch.setattr(encoder, "_MM_OUT_DTYPE", [])
    for shape in [(4, 77, 96), (300, 96)]:
        x = torch.randn(shape, device=dev, requires_grad=True)
        weight = torch.randn(160, 96, device=dev, requires_grad=True)
        b32 = torch.randn(160, device=dev, requires_grad=True)
        w, bb = weight.detach().to(torch.bfloat16), b32.detach().to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours = C.shadow_linear(x, weight, b32, w, w.t(), bb, None, True)
            theirs = encoder._ShadowLinearFn.apply(x, weight, b32, w, w.t(), bb, None)
        _same(ours, theirs)
        seed = int(torch.randint(0, 2**31, ()))
        got = _grads(ours, (x, weight, b32), seed)
        assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32  # x's too, from the GEMM
        if encoder._MM_OUT_DTYPE == [True]:  # x's gradient is the GEMM's fp32 result itself, not a bf16 one cast
            g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(seed)).to(dev, ours.dtype)
            _same(got[0], torch.mm(g.reshape(-1, 160), w, out_dtype=torch.float32).view(shape))
        for a, b_ in zip(got, _grads(theirs, (x, weight, b32), seed)):
            _same(a, b_)
    x = torch.randn(8, 129, 768, device=dev, requires_grad=True)
    weight = torch.randn(768, device=dev, requires_grad=True)
    bias = torch.randn(768, device=dev, requires_grad=True)
    ours = ops.layer_norm_dual(x, weight, bias, 1e-5)
    monkeypatch.setattr(ops, "_NATIVE", [None])
    theirs = ops.layer_norm_dual(x, weight, bias, 1e-5)
    for a, b in zip(ours, theirs):
        _same(a.detach(), b.detach())
    seed = int(torch.randint(0, 2**31, ()))
    for a, b in zip(_grads(ours, (x, weight, bias), seed), _grads(theirs, (x, weight, bias), seed)):
        _same(a, b)
    with torch.no_grad():  # the teacher's: the residual added in the kernel's pass, the same sum
        r = torch.randn_like(x).to(torch.bfloat16)
        for a, b in zip(ops.layer_norm_dual(x, weight, bias, 1e-5, torch.bfloat16, r),
                        ops.layer_norm_dual(x + r, weight, bias, 1e-5, torch.bfloat16)):
            _same(a, b)
