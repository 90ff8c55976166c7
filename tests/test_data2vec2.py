"""Recipe data2vec2 (data2vec 2.0): presets, the unmasked-only student, parity with the
eager reference under both kernel settings, and the CLI."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from d2v_fast import ops, pretrain
from d2v_fast.config import parse_args
from d2v_fast.data.text.corpus import open_corpus
from d2v_fast.recipes import build_model
from d2v_fast.reference.train import reference_losses
from d2v_fast.trainer import Trainer

from .helpers import ROOT, losses, small_cfg, subprocess_env

SMALL = ["--train.probe_task", "none", "--config", "tiny", "--recipe", "data2vec2", "--seq-len", "32", "--batch-size", "4",
         "--data.num_workers", "0", "--train.progress", "false", "--train.log_every", "1"]


def test_base_preset_builds_the_published_decoder():
    """Every value of the preset is pinned in test_presets.py; here the decoder it builds."""
    cfg, _ = parse_args(["--config", "base", "--recipe", "data2vec2"])
    r = cfg.recipe
    with torch.device("meta"):
        model = build_model(cfg.model.__class__(**{**cfg.model.__dict__, "vocab_size": 50265}), r)
    dec = model.student.decoder
    assert len(dec.convs) == 5 and all(c.kernel_size == (9,) and c.padding == (4,) and c.in_channels == 768
                                       for c in dec.convs)
    assert [tuple(l.weight.shape) for l in dec.proj if isinstance(l, torch.nn.Linear)] == [(1536, 768), (768, 1536)]
    with torch.device("meta"):  # large: a 768-wide decoder on the 1024-wide encoder (decoder.decoder_dim)
        large, _ = parse_args(["--config", "large", "--recipe", "data2vec2"])
        dec = build_model(large.model.__class__(**{**large.model.__dict__, "vocab_size": 50265}), large.recipe).student.decoder
    assert [(c.in_channels, c.out_channels) for c in dec.convs] == [(1024, 768)] + [(768, 768)] * 4
    assert [tuple(l.weight.shape) for l in dec.proj if isinstance(l, torch.nn.Linear)] == [(1536, 768), (1024, 1536)]
    # the default recipe stays data2vec
    assert parse_args(["--config", "base"])[0].recipe.name == "data2vec"


def test_student_encoder_never_sees_a_masked_position(builtin_cache, tmp_path):
    cfg = small_cfg(builtin_cache, "data2vec2", 32, 4)
    cfg.model.dropout = cfg.model.attention_dropout = 0.0
    tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path)
    batch = next(tr.batches())[0]
    with torch.no_grad():  # the embeddings as the step's forward will see them (dropout is 0)
        emb = tr.model.student.encoder.embeddings(batch["input_ids"])
    seen = []
    layer0 = tr.model.student.encoder.encoder.layer[0]
    handle = layer0.register_forward_pre_hook(lambda m, args: seen.append((args[0].detach().clone(), *args[1:])))
    try:
        tr.train_step([batch])
    finally:
        handle.remove()
    (h, attn_mask, shape), = seen  # the student's first block ran once (the teacher has its own blocks)
    B, T = batch["input_ids"].shape
    clones = cfg.recipe.clones
    R, n_masked = B * clones, int(T * cfg.recipe.mask_prob)
    kept = T - n_masked
    mask = batch["mask"]
    assert mask.shape == (R, T) and (mask.sum(1) == n_masked).all()
    # the stack runs on rows [R·kept, C] with (R, kept) beside them; no mask tokens, no padding
    assert shape == (R, kept) and h.shape == (R * kept, cfg.model.hidden_size) and attn_mask is None
    h = h.view(R, kept, -1)
    for r in range(R):  # row r holds exactly its sample's embeddings at the kept positions, in order
        torch.testing.assert_close(h[r], emb[r // clones][~mask[r]], rtol=0, atol=0)
    assert not torch.equal(mask[0], mask[1])  # clones get different masks


def test_decoder_input_dropout_in_training_only_and_teacher_takes_the_students_embeddings(
        builtin_cache, tmp_path, monkeypatch):
    """decoder.input_dropout drops encoder rows before the noise scatter (training only), and
    the teacher encodes the very embedding tensor the student computed (after its dropout)."""
    from d2v_fast.recipes import data2vec2 as rec

    cfg = small_cfg(builtin_cache, "data2vec2", 32, 4)
    cfg.model.attention_dropout, cfg.recipe.decoder_dropout = 0.0, 0.5
    tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path)
    batch = next(tr.batches())[0]
    student, teacher = tr.model.student, tr.model.teacher
    seen = {}
    gathered = []
    real_gather = rec.ops.masked_gather
    monkeypatch.setattr(rec.ops, "masked_gather",
                        lambda x, m, count=None: (gathered.append(x), real_gather(x, m, count))[1])
    hooks = [student.encoder.encoder.layer[-1].register_forward_hook(lambda m, a, out: seen.update(enc=out[0])),
             student.decoder.register_forward_pre_hook(lambda m, a: seen.update(dec=a[0])),
             teacher[0].register_forward_pre_hook(lambda m, a: seen.update(teacher=a[0]))]
    keep = ~batch["mask"]
    R, k = keep.shape[0], int(keep[0].sum())
    try:
        with torch.no_grad():
            for training in (True, False):
                tr.model.train(training)
                gathered.clear()
                pred, teacher_input = student(dict(batch, padding_mask=None))
                tr.model.targets(dict(batch, padding_mask=None), teacher_input)
                enc = seen["enc"].reshape(R * k, -1)
                dec_in = seen["dec"][keep]  # the encoder rows as the decoder got them
                if training:
                    dropped = dec_in == 0
                    assert 0.3 < dropped.float().mean() < 0.7  # p = 0.5
                    torch.testing.assert_close(dec_in[~dropped], 2 * enc[~dropped])  # kept rows scaled by 1/(1-p)
                else:
                    torch.testing.assert_close(dec_in, enc, rtol=0, atol=0)
                # the teacher's input is the student's embedding tensor itself (same storage, dropout
                # included in training), not a second embedding pass
                (x,) = gathered[:1]
                assert seen["teacher"].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                t_in = seen["teacher"].view(x.shape)  # the blocks run on its rows [B·T, C]
                torch.testing.assert_close(t_in, x, rtol=0, atol=0)
                fresh = student.encoder.embeddings(batch["input_ids"])
                if training:  # embedding dropout (0.1) is in what the teacher saw
                    assert not torch.equal(t_in, fresh) and (t_in == 0).any()
                else:
                    torch.testing.assert_close(t_in, fresh, rtol=0, atol=0)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("block_mode", ["pack", "document"])
def test_engine_matches_reference_for_10_steps(builtin_cache, tmp_path, kernels, block_mode):
    cfg = small_cfg(builtin_cache, "data2vec2", 32, 4, max_steps=10, kernels=kernels)
    cfg.data.block_mode = block_mode  # 'document' gives padded samples
    corpus = open_corpus(builtin_cache)
    try:
        tr = Trainer(cfg, corpus, tmp_path)
        assert ops.kernels_backend(torch.zeros(1)) == kernels
        state = copy.deepcopy(tr.model.state_dict())
        engine = [r["loss"] for r in tr.fit()]
    finally:
        ops.set_kernels("auto")
    ref = reference_losses(cfg, corpus, 10, engine_state=state)
    assert len(engine) == len(ref) == 10
    for step, (a, b) in enumerate(zip(engine, ref), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: engine {a} reference {b}"


@pytest.mark.slow
def test_cli_loss_falls_resume_and_two_processes(builtin_cache, tmp_path, capsys):
    args = SMALL + ["--seq-len", "64", "--batch-size", "8", "--optim.total_steps", "60"]
    out = tmp_path / "run"
    assert pretrain.main(args + ["--out", str(out), "--max-steps", "60", "--train.log_every", "5"]) == 0
    l = losses(out)
    assert l[60] < 0.8 * l[5], l  # the loss falls
    enc = json.loads((out / "config.json").read_text())
    assert enc["recipe"]["name"] == "data2vec2"
    # stop-and-resume is exact
    part = tmp_path / "part"
    full = tmp_path / "full"
    assert pretrain.main(args + ["--out", str(full), "--max-steps", "6"]) == 0
    assert pretrain.main(args + ["--out", str(part), "--max-steps", "3", "--train.ckpt_every", "3"]) == 0
    assert pretrain.main(args + ["--out", str(part), "--max-steps", "6"]) == 0
    assert losses(part) == losses(full)
    # two processes, dropout 0, against one
    nodrop = args + ["--model.dropout", "0", "--model.attention_dropout", "0", "--recipe.decoder_dropout", "0",
                     "--max-steps", "3"]
    one = subprocess.run([sys.executable, "-m", "d2v_fast.pretrain", *nodrop, "--out", str(tmp_path / "one")],
                         env=subprocess_env(builtin_cache), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "d2v_fast.pretrain", *nodrop, "--out", str(tmp_path / "two")],
                         env=subprocess_env(builtin_cache), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-4 * abs(a[s]), (s, a[s], b[s])
