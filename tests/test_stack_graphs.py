"""Whole-stack CUDA graphs (``--train.compile stack-cudagraphs``, ``d2v_fast.graphs``): the
shape buckets, the static buffers and the replayed autograd node, on the CPU through
``EagerReplay`` (the same buffers and code, each replay re-running the stack), and on a GPU
against eager."""
from __future__ import annotations

import copy

import pytest
import torch

from d2v_fast.config import validate
from d2v_fast.data.text.corpus import open_corpus
from d2v_fast.errors import UsageError
from d2v_fast.graphs import EagerReplay, StackGraphs, attach, attached, bucket, pad_attention_mask
from d2v_fast.models import Encoder, EncoderConfig
from d2v_fast.models.blocks import attention_mask, run_blocks, run_blocks_eager
from d2v_fast.trainer import Trainer

from .helpers import small_cfg
from .test_step_switches import needs_cuda

NO_SWITCHES = dict(skip_on_device=False, host_counts=False, cast_once=False, fused_qkv=False, bf16_teacher=False,
                   bf16_student=False)


# ----------------------------------------------------------------------------- buckets and masks
def test_bucket_pads_up_to_a_multiple():
    assert [bucket(n, 16) for n in (1, 15, 16, 17, 48, 49)] == [16, 16, 16, 32, 48, 64]
    assert bucket(37, 0) == bucket(37, 1) == 37


def test_padded_masks_mask_the_padded_keys_only():
    m = pad_attention_mask(None, 2, 5, 8, torch.device("cpu"))
    assert m.shape == (2, 1, 1, 8) and m.dtype == torch.bool
    assert m[..., :5].all() and not m[..., 5:].any()
    keep = torch.rand(3, 1, 1, 5) > 0.3
    m = pad_attention_mask(keep, 3, 5, 8, torch.device("cpu"))
    assert torch.equal(m[..., :5], keep) and not m[..., 5:].any()
    bias = torch.randn(3, 1, 1, 5)
    m = pad_attention_mask(bias, 3, 5, 8, torch.device("cpu"))
    assert torch.equal(m[..., :5], bias) and torch.isneginf(m[..., 5:]).all()
    assert pad_attention_mask(torch.randn(1, 4, 5, 5), 3, 5, 8, torch.device("cpu")) is None  # a bias per query


# ----------------------------------------------------------------------------- one stack
def _stack(layers=2, hidden=32, heads=4, seed=0):
    torch.manual_seed(seed)
    cfg = EncoderConfig(vocab_size=50, hidden_size=hidden, num_layers=layers, num_heads=heads, ffn_size=2 * hidden,
                        max_seq_len=128, dropout=0.0, attention_dropout=0.0)
    return Encoder(cfg).encoder.layer


def _grads(blocks, h, pad, *, graphs=None):
    """The stack's output and the gradients of a fixed function of it, to the input and the parameters."""
    x = h.clone().requires_grad_(True)
    if graphs is not None:
        graphs.active = True
    try:
        out, _ = run_blocks(blocks, x, attention_mask(pad, x))
    finally:
        if graphs is not None:
            graphs.active = False
    w = torch.linspace(-1, 1, out.shape[-1])
    (out * w).square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in blocks.parameters()]
    blocks.zero_grad(set_to_none=True)
    return out.detach().clone(), grads  # a replay overwrites its static output


def test_a_stack_at_a_bucket_length_replays_the_same_forward_and_backward():
    """T a multiple of the bucket: the recorded stack computes bit for bit what eager does,
    output, input gradient and every parameter gradient; the graphs are recorded once and
    replayed after, on the same static buffers."""
    blocks = _stack()
    capture = EagerReplay()
    graphs = StackGraphs(blocks, run_blocks_eager, granule=16, capture=capture)
    attach(blocks, graphs)
    inputs = (torch.randn(3, 16, 32), torch.randn(3, 16, 32))
    eager = [_grads(blocks, h, None) for h in inputs]  # not active: eager
    assert capture.records == 0
    got = [_grads(blocks, h, None, graphs=graphs) for h in inputs]
    for (eo, eg), (go, gg) in zip(eager, got):
        assert torch.equal(eo, go)
        assert all(torch.equal(a, b) for a, b in zip(eg, gg))
    assert capture.records == 1 and len(graphs.graphs) == 1
    (graph,) = graphs.graphs.values()
    assert graph.replays == 2 and graph.h.shape == (3, 16, 32)
    ptrs = (graph.h.data_ptr(), graph.outs[0].data_ptr(), graph.grads_in[0].data_ptr())
    _grads(blocks, torch.randn(3, 16, 32), None, graphs=graphs)
    assert (graph.h.data_ptr(), graph.outs[0].data_ptr(), graph.grads_in[0].data_ptr()) == ptrs
    assert attached(blocks) is graphs and attached(copy.deepcopy(blocks)) is None


def test_a_fixed_length_runs_unpadded_and_varying_lengths_share_buckets():
    """A stack records its first length as it is (50: no padding, no mask added); once the
    length has varied, a new length is padded to its bucket (37 and 45 into 48, with or
    without a padding mask of their own: one recording), the padded keys masked out, the real
    rows' outputs and gradients those of eager at their own length, the static input zero past
    the real rows; a length with a graph of its own replays that one."""
    blocks = _stack()
    capture = EagerReplay()
    graphs = StackGraphs(blocks, run_blocks_eager, granule=16, capture=capture)
    attach(blocks, graphs)
    for T, padded in ((50, False), (50, False), (37, False), (45, False), (45, True), (37, True), (50, False)):
        h = torch.randn(2, T, 32)
        pad = None
        if padded:
            pad = torch.zeros(2, T, dtype=torch.bool)
            pad[1, T - 6:] = True
        eo, eg = _grads(blocks, h, pad)
        go, gg = _grads(blocks, h, pad, graphs=graphs)
        assert go.shape == (2, T, 32)
        torch.testing.assert_close(go, eo, rtol=1e-5, atol=1e-5)
        for a, b in zip(eg, gg):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        if T != 50:
            (graph,) = [g for k, g in graphs.graphs.items() if k[1] == 48]
            assert graph.h.shape == (2, 48, 32) and not graph.h[:, T:].any() and graph.mask.dtype == torch.bool
    lengths = sorted((k[1], g.mask is None, g.replays) for k, g in graphs.graphs.items())
    assert lengths == [(48, False, 4), (50, True, 3)] and capture.records == 2


def test_beyond_max_graphs_a_shape_runs_eager():
    blocks = _stack(layers=1)
    capture = EagerReplay()
    graphs = StackGraphs(blocks, run_blocks_eager, granule=0, max_graphs=2, capture=capture)
    attach(blocks, graphs)
    for T in (5, 6, 7, 5):
        h = torch.randn(2, T, 32)
        eo, eg = _grads(blocks, h, None)
        go, gg = _grads(blocks, h, None, graphs=graphs)
        assert torch.equal(eo, go) and all(torch.equal(a, b) for a, b in zip(eg, gg))
    assert len(graphs.graphs) == 2 and capture.records == 2 and graphs.eager_calls == 1
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # not active: eager, no recording
        run_blocks(blocks, x, None)
    assert capture.records == 2


def test_a_failed_recording_leaves_the_stack_eager(capsys):
    class Refuses(EagerReplay):
        def train(self, fn, inputs, into):
            raise RuntimeError("operation not permitted when stream is capturing")

    blocks = _stack(layers=1)
    graphs = StackGraphs(blocks, run_blocks_eager, granule=0, capture=Refuses(), name="student")
    attach(blocks, graphs)
    h = torch.randn(2, 6, 32)
    eo, eg = _grads(blocks, h, None)
    for _ in range(2):
        go, gg = _grads(blocks, h, None, graphs=graphs)
        assert torch.equal(eo, go) and all(torch.equal(a, b) for a, b in zip(eg, gg))
    assert graphs.eager_calls == 2 and not graphs.graphs and "not permitted" in graphs.failed
    err = capsys.readouterr().err
    assert err.count("recording the student's stack failed") == 1 and "runs eager" in err


def test_the_teacher_stack_replays_into_its_static_outputs():
    """No gradient: one forward graph whose outputs (the stack's and the collected FFN
    outputs) are the same tensors at every replay, holding that replay's values."""
    blocks = _stack()
    blocks.eval()
    blocks.requires_grad_(False)
    capture = EagerReplay()
    graphs = StackGraphs(blocks, run_blocks_eager, granule=8, capture=capture)
    attach(blocks, graphs)
    seen = []
    for _ in range(3):
        h = torch.randn(2, 8, 32)
        with torch.no_grad():
            want_h, want = run_blocks(blocks, h, None, collect="ffn")
            graphs.active = True
            got_h, got = run_blocks(blocks, h, None, collect="ffn")
            graphs.active = False
        assert torch.equal(got_h, want_h) and all(torch.equal(a, b) for a, b in zip(got, want))
        seen.append([t.data_ptr() for t in (got_h, *got)])
    assert seen[0] == seen[1] == seen[2] and capture.records == 1 and len(seen[0]) == 3


# ----------------------------------------------------------------------------- the trainer
def _run(builtin_cache, tmp_path, graphs: bool, steps=3, recipe="data2vec", **train):
    cfg = small_cfg(builtin_cache, recipe, seq_len=32, batch_size=4, **{**NO_SWITCHES, **train})
    cfg.model.num_layers, cfg.recipe.top_k = 2, 2
    cfg.model.dropout = cfg.model.attention_dropout = 0.0
    if recipe == "data2vec2":
        cfg.recipe.clones = 2
    tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path / f"{graphs}{sorted(train.items())}")
    capture = None
    if graphs:
        capture = EagerReplay()
        tr.attach_stack_graphs(capture)
    stream = tr.batches()
    out = []
    for _ in range(steps):
        rec = tr.train_step(next(stream))
        tr.settle()
        out.append(float(rec["loss"]))
    return out, tr, capture


@pytest.mark.parametrize("recipe", ["data2vec", "data2vec2"])
def test_recorded_stacks_train_the_same_steps(builtin_cache, tmp_path, recipe):
    """The trainer with both stacks replayed from recorded graphs (two micro-batches an update:
    each graph replays twice a step): at lengths that are bucket multiples, the same losses and
    weights bit for bit; with a bucket that pads them, the same within float tolerance."""
    eager, tr0, _ = _run(builtin_cache, tmp_path, False, recipe=recipe, compile="stack-cudagraphs",
                         micro_batch_size=2)
    exact = 16 if recipe == "data2vec" else 0  # data2vec 2.0's student runs on the kept tokens: their own length
    same, tr1, capture = _run(builtin_cache, tmp_path, True, recipe=recipe, compile="stack-cudagraphs",
                              micro_batch_size=2, graph_bucket=exact)
    assert same == eager
    s0, s1 = tr0.model.state_dict(), tr1.model.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    student, teacher = tr1.stack_graphs
    assert student.graphs and teacher.graphs and capture.records == len(student.graphs) + len(teacher.graphs)
    assert all(g.replays >= 2 for g in student.graphs.values())
    assert not student.active and not teacher.active  # replayed inside updates only
    padded, _, _ = _run(builtin_cache, tmp_path, True, recipe=recipe, compile="stack-cudagraphs",
                        micro_batch_size=2, graph_bucket=48)
    for a, b in zip(eager, padded):
        assert abs(a - b) <= 1e-4 * abs(a), (eager, padded)


@pytest.mark.parametrize("modality,recipe", [("audio", "data2vec"), ("audio", "data2vec2"), ("images", "data2vec"),
                                             ("images", "data2vec2")])
def test_recorded_stacks_train_the_same_speech_and_image_steps(modality, recipe):
    """The tiny speech and image models on synthetic batches, 3 updates of 2 micro-batches,
    both stacks replayed from recordings: bit for bit eager's losses and weights; image
    data2vec's relative position bias, an attention mask with a gradient, trains as in eager."""
    import dataclasses

    from d2v_fast import cost

    def run(graphs: bool):
        cfg = cost.cost_config(modality, recipe, "tiny", dtype="float32")
        for f in dataclasses.fields(cfg.model):
            if "drop" in f.name:  # a recording draws dropout masks too: the replays' would differ from eager's
                setattr(cfg.model, f.name, 0.0)
        torch.manual_seed(0)
        step, batch = cost._make("d2v_fast", cfg, torch.device("cpu"), 1024)
        tr, capture = step.trainer, EagerReplay()
        if graphs:
            tr.attach_stack_graphs(capture)
        losses = []
        for _ in range(3):
            losses.append(float(tr.train_step([batch, batch])["loss"]))
            tr.settle()
        return losses, tr, capture

    la, a, _ = run(False)
    lb, b, capture = run(True)
    assert capture.records == 2 and all(g.replays == 6 for s in b.stack_graphs for g in s.graphs.values())
    assert la == lb
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    tables = [k for k in sb if k.endswith("relative_position_bias_table") and k.startswith("student.")]
    assert (modality, recipe) != ("images", "data2vec") or (tables and all(sb[k].abs().sum() > 0 for k in tables))


def test_recorded_stacks_under_bf16_with_the_text_switches(builtin_cache, tmp_path):
    """bf16 autocast with the default text switches (fused QKV, bf16 copies of the student's
    and teacher's Linears read by the recorded stacks): the same losses bit for bit."""
    on = dict(dtype="bfloat16", compile="stack-cudagraphs", fused_qkv=True, bf16_teacher=True, bf16_student=True,
              skip_on_device=True, host_counts=True, cast_once=True, graph_bucket=32)
    eager, tr0, _ = _run(builtin_cache, tmp_path, False, steps=2, **on)
    graphed, tr1, capture = _run(builtin_cache, tmp_path, True, steps=2, **on)
    assert graphed == eager and capture.records == 2
    assert tr1.switches["cast_once"] is False  # autocast's cache is off under stack graphs


def test_stack_cudagraphs_flags(builtin_cache, tmp_path):
    cfg = small_cfg(builtin_cache, compile="stack-cudagraphs", graph_bucket=-1)
    with pytest.raises(UsageError, match="--train.graph_bucket -1: must be >= 0"):
        validate(cfg)
    cfg.train.graph_bucket = 64
    validate(cfg)
    tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path)
    assert tr.stack_graphs == []  # no GPU: the stacks run eager
    from d2v_fast.pretrain import _check_world

    _check_world(cfg, 1)
    with pytest.raises(UsageError, match="stack-cudagraphs: one process only for now, not 2 .*blocks-cudagraphs or none"):
        _check_world(cfg, 2)  # what a launch with several processes is told before any starts


def test_the_gpu_ablation_times_the_stack_graphs_beside_the_defaults():
    from d2v_fast.config import preset
    from d2v_fast.steptimer import ablation_configs

    cfg = preset("tiny")
    gpu = dict(ablation_configs(cfg, torch.device("cuda")))
    assert list(gpu)[-2:] == ["d2v_fast[defaults]", "d2v_fast[defaults+stack-cudagraphs]"]
    assert gpu["d2v_fast[defaults+stack-cudagraphs]"].train.compile == "stack-cudagraphs" and cfg.train.compile == "none"
    assert "d2v_fast[defaults+stack-cudagraphs]" not in dict(ablation_configs(cfg, torch.device("cpu")))


@pytest.mark.gpu
@needs_cuda
def test_recorded_stacks_on_gpu_match_eager(builtin_cache, tmp_path):
    """On a GPU, through the loop with the loader's workers (its pin-memory thread running while
    the stacks record): four updates of two micro-batches with the stacks replayed as CUDA
    graphs, at bf16 with every default switch, against the same run eager (dropout off)."""
    def run(out, **train):
        cfg = small_cfg(builtin_cache, max_steps=4, device="cuda", micro_batch_size=4, **train)
        cfg.model.num_layers, cfg.recipe.top_k, cfg.data.num_workers = 2, 2, 2
        cfg.model.dropout = cfg.model.attention_dropout = 0.0
        tr = Trainer(cfg, open_corpus(builtin_cache), out, device="cuda")
        return [r["loss"] for r in tr.fit() if "loss" in r], tr

    eager, a = run(tmp_path / "eager")
    graphed, b = run(tmp_path / "graphs", compile="stack-cudagraphs")
    assert all(g.graphs and not g.failed for g in b.stack_graphs)
    for step, (x, y) in enumerate(zip(eager, graphed), 1):
        assert abs(x - y) <= 1e-2 * abs(x), f"step {step}: eager {x} graphs {y}"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=2e-2, atol=2e-3, msg=k)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("modality,recipe", [("text", "data2vec2"), ("audio", "data2vec"), ("audio", "data2vec2"),
                                             ("images", "data2vec"), ("images", "data2vec2")])
def test_recorded_stacks_on_gpu_match_eager_for_every_recipe(modality, recipe):
    """On a GPU, the tiny models on synthetic batches, bf16 with the default switches: three
    updates of two micro-batches (the second batch of each update shorter for speech, so its
    stacks record a second length) with the stacks as CUDA graphs against eager (dropout off)."""
    import dataclasses

    from d2v_fast import cost
    from d2v_fast.steptimer import make_step, measure_batch

    def run(compile):
        cfg = cost.cost_config(modality, recipe, "tiny", compile=compile)
        cfg.train.device = "cuda"
        for f in dataclasses.fields(cfg.model):
            if "drop" in f.name:
                setattr(cfg.model, f.name, 0.0)
        torch.manual_seed(0)
        step = make_step("d2v_fast", cfg, torch.device("cuda"), 1024)
        batch = measure_batch(cfg, torch.device("cuda"), vocab=1024)
        other = batch
        if modality == "audio":
            cfg.data.max_samples = cfg.data.max_samples * 3 // 4
            other = measure_batch(cfg, torch.device("cuda"), vocab=1024)
        tr = step.trainer
        losses = [float(tr.train_step([batch, other])["loss"]) for _ in range(3)]
        tr.settle()
        return losses, tr

    eager, a = run("none")
    graphed, b = run("stack-cudagraphs")
    assert all(g.graphs and not g.failed for g in b.stack_graphs)
    for step, (x, y) in enumerate(zip(eager, graphed), 1):
        assert abs(x - y) <= 1e-2 * abs(x) + 1e-3, f"{modality}/{recipe} step {step}: eager {x} graphs {y}"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=2e-2, atol=2e-3, msg=k)
