"""Both speech recipes on the core: presets, students, FLOP count, engine vs the eager
reference (10 steps), resume, two processes vs one, export to ``Data2VecAudioModel`` and back
(``--init-from``), and bad input through the trainer's CLI. Tiny sizes on a 24-utterance
built-in speech corpus (synthesised once per session)."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2v_fast import pretrain
from d2v_fast.config import preset, validate
from d2v_fast.modalities import get_modality
from d2v_fast.recipes import build_model

from .helpers import losses, subprocess_env

RECIPES = ["data2vec", "data2vec2"]
POCKETSPHINX = "/usr/share/pocketsphinx/test/data"


@pytest.fixture(scope="session")
def speech_corpus(tmp_path_factory):
    """24 built-in utterances (~2 min of speech), in a private cache."""
    pytest.importorskip("espeakng_loader", reason="espeakng-loader is a dependency (pip install -e .)")
    from d2v_fast.data.audio.builtin import builtin_speech_corpus

    cache = tmp_path_factory.mktemp("speech_cache_recipes")
    old = os.environ.get("D2V_FAST_CACHE")
    os.environ["D2V_FAST_CACHE"] = str(cache)
    try:
        yield builtin_speech_corpus(24, workers=1, progress=False)
    finally:
        if old is None:
            os.environ.pop("D2V_FAST_CACHE", None)
        else:
            os.environ["D2V_FAST_CACHE"] = old


def audio_cfg(corpus_path, recipe, **train):
    cfg = preset("tiny", recipe, "audio")
    cfg.data.path, cfg.data.num_workers = str(corpus_path), 0
    cfg.model.attention_dropout = 0.0  # the reference's attention has no dropout (see its docstring)
    cfg.train.log_every, cfg.train.progress, cfg.train.ckpt_every, cfg.train.probe_task = 1, False, 0, "none"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- presets and students
def test_presets_follow_the_published_recipes():
    v1, v2 = preset("base", "data2vec", "audio"), preset("base", "data2vec2", "audio")
    assert (v1.model.hidden_size, v1.model.num_layers, v1.model.conv_kernel) == (768, 12, (10, 3, 3, 3, 3, 2, 2))
    assert (v1.recipe.top_k, v1.recipe.layer_norm, v1.recipe.mask_prob, v1.recipe.mask_span) == (8, "instance", 0.65, 10)
    assert (v1.recipe.ema_decay, v1.recipe.ema_end_decay, v1.recipe.ema_anneal_end_step) == (0.999, 0.9999, 30_000)
    assert (v1.optim.lr, v1.optim.schedule, v1.optim.tri_stage_phases) == (5e-4, "tri_stage", (0.03, 0.9, 0.07))
    assert v1.recipe.head_hidden_mult == 0 and v1.optim.clip_norm == 0 and v1.data.max_samples == 320_000
    assert (v2.recipe.clones, v2.recipe.mask_prob, v2.recipe.mask_span, v2.recipe.decoder_layers,
            v2.recipe.decoder_kernel, v2.recipe.decoder_dim, v2.recipe.decoder_groups) == (8, 0.5, 5, 4, 7, 384, 16)
    assert (v2.recipe.ema_end_decay, v2.recipe.ema_anneal_end_step, v2.optim.lr, v2.optim.warmup_steps,
            v2.optim.schedule) == (0.99999, 75_000, 7.5e-4, 8000, "cosine")
    assert preset("large", "data2vec", "audio").model.num_layers == 24


def test_tri_stage_schedule():
    from d2v_fast.schedule import tri_stage_factor

    f = lambda s: tri_stage_factor(s, 1000)
    assert f(0) == pytest.approx(0.01) and f(15) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(30) == f(929) == 1.0
    assert f(930 + 35) == pytest.approx(0.1) and f(1000) == f(5000) == pytest.approx(0.01)


@pytest.mark.parametrize("recipe", RECIPES)
def test_student_shapes_teacher_and_export_names(recipe):
    cfg = preset("tiny", recipe, "audio")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.recipe, "audio")
    S = cfg.data.max_samples
    wav = torch.randn(2, S)
    T = get_modality("audio").units({"waveform": wav, "num_frames": 99}) // 2
    from d2v_fast.modalities.audio import FrameMasks

    masks = FrameMasks(cfg.recipe, 0)(T, torch.tensor([3, 5]), 0)
    R = 2 * (cfg.recipe.clones if recipe == "data2vec2" else 1)
    assert masks["mask"].shape == (R, T) and len(set(masks["mask"].sum(1).tolist())) == 1
    batch = {"waveform": wav, **masks}
    pred, ti = model.student(batch)
    assert pred.shape == (int(masks["mask"].sum()), cfg.model.hidden_size) and ti.shape == (2, T, cfg.model.hidden_size)
    target = model.targets(batch, ti)
    assert target.shape == pred.shape
    # the teacher starts as the student: teacher weights under encoder names = the student's encoder
    student = model.student.encoder.state_dict()
    teacher = get_modality("audio").teacher_encoder_weights(student, model.teacher.state_dict())
    assert set(teacher) == set(student) and all(torch.equal(teacher[k], student[k]) for k in student)
    owned = {"data2vec": {"encoder.layer_norm.weight", "encoder.layers.0.final_layer_norm.bias"},
             "data2vec2": {"encoder.pos_conv_embed.layers.0.conv.weight", "encoder.layers.2.attention.q_proj.weight"}}
    assert {f"encoder.{k}" for k in model.teacher.state_dict()} >= owned[recipe]
    if recipe == "data2vec2":
        assert not model.student.encoder.masked_spec_embed.requires_grad  # unused in 2.0: frozen
        convs = model.student.decoder.convs
        assert convs[0].groups == 16 and convs[0].out_channels == cfg.recipe.decoder_dim


def test_flop_count_of_the_base_recipes():
    from d2v_fast.models.audio import forward_flops

    mod = get_modality("audio")
    v1 = preset("base", "data2vec", "audio")
    T = 999  # frames of a 20 s crop
    fwd = forward_flops(v1.model, 320_000)
    per_frame = mod.flops_per_unit(v1)
    # student fwd+bwd (3x) + teacher (< 1x) + head: between 3x and 4.2x the forward
    assert 3 * fwd / T < per_frame < 4.2 * fwd / T
    v2 = preset("base", "data2vec2", "audio")
    assert mod.flops_per_unit(v2) > 2 * per_frame  # 8 clones of ~60% of the frames


# ----------------------------------------------------------------------------- engine vs reference
@pytest.mark.parametrize("recipe", RECIPES)
def test_engine_matches_reference_for_10_steps(speech_corpus, tmp_path, recipe):
    from d2v_fast.data.audio.corpus import open_audio_corpus
    from d2v_fast.reference.audio import reference_audio_losses
    from d2v_fast.trainer import Trainer

    cfg = audio_cfg(speech_corpus, recipe, max_steps=10, micro_batch_size=4)
    corpus = open_audio_corpus(speech_corpus)
    tr = Trainer(cfg, corpus, tmp_path)
    state = copy.deepcopy(tr.model.state_dict())
    engine = [r["loss"] for r in tr.fit()]
    ref = reference_audio_losses(cfg, corpus, 10, engine_state=state)
    assert len(engine) == len(ref) == 10
    for step, (a, b) in enumerate(zip(engine, ref), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: engine {a} reference {b}"
    assert engine[0] != engine[-1]


# ----------------------------------------------------------------------------- CLI: resume, processes
def cli_args(corpus, recipe, out, *extra):
    return ["--modality", "audio", "--config", "tiny", "--recipe", recipe, "--data", str(corpus), "--out", str(out),
            "--data.num_workers", "0", "--train.log_every", "1", "--train.progress", "false",
            "--train.probe_task", "none", *extra]


@pytest.mark.parametrize("recipe", RECIPES)
def test_stop_and_resume_is_exact(speech_corpus, tmp_path, recipe, capsys):
    fixed = ("--optim.total_steps", "6")  # the same lr schedule whatever --max-steps says
    assert pretrain.main(cli_args(speech_corpus, recipe, tmp_path / "full", "--max-steps", "6", *fixed)) == 0
    assert pretrain.main(cli_args(speech_corpus, recipe, tmp_path / "split", "--max-steps", "3", *fixed)) == 0
    # the same run continued (only --max-steps differs, which a resume allows)
    assert pretrain.main(cli_args(speech_corpus, recipe, tmp_path / "split", "--max-steps", "6", *fixed)) == 0
    assert "resumed from" in capsys.readouterr().err
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 7)) and a == b  # exact float equality, every step
    from safetensors.torch import load_file

    ea, eb = (load_file(str(tmp_path / d / "encoder.safetensors")) for d in ("full", "split"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(speech_corpus, tmp_path, parallel):
    """FSDP shards the speech teacher's parts outside the blocks (positional conv, encoder
    LayerNorm) as units of their own; the EMA over them must stay exact."""
    # no randomness left in a step: no dropout, no mask-token noise (drawn per rank)
    base = ["--max-steps", "3", "--train.micro_batch_size", "4", "--model.dropout", "0",
            "--model.attention_dropout", "0", "--recipe.decoder_dropout", "0", "--recipe.mask_noise_std", "0"]
    env = subprocess_env(speech_corpus)
    one = subprocess.run([sys.executable, "-m", "d2v_fast.pretrain",
                          *cli_args(speech_corpus, "data2vec2", tmp_path / "one", *base)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "d2v_fast.pretrain", *cli_args(speech_corpus, "data2vec2", tmp_path / "two", *base),
                          "--parallel", parallel],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) or pytest.fail(f"step {s}: one {a[s]} two {b[s]}")


def test_fsdp_layerdrop_skips_the_same_blocks_on_every_rank(speech_corpus, tmp_path):
    """Layer drop under FSDP: were the ranks to skip different blocks, their per-block
    all-gathers would mismatch (gloo aborts, NCCL hangs). The trainer reseeds one generator
    alike on every rank each update; v1's published layerdrop is 0.05, here 0.5 and two
    micro-batches so that skips differ between blocks, micro-batches and updates."""
    args = cli_args(speech_corpus, "data2vec", tmp_path / "run", "--max-steps", "3", "--train.micro_batch_size", "2",
                    "--model.layerdrop", "0.5", "--parallel", "fsdp")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "d2v_fast.pretrain", *args], env=subprocess_env(speech_corpus), capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    l = losses(tmp_path / "run")
    assert sorted(l) == [1, 2, 3] and all(math.isfinite(v) for v in l.values()), l


# ----------------------------------------------------------------------------- export and warm start
def test_export_loads_in_transformers_and_matches_on_real_recordings(speech_corpus, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from d2v_fast import export
    from d2v_fast.models.audio import AudioEncoder, config_from_hf

    run = tmp_path / "run"
    assert pretrain.main(cli_args(speech_corpus, "data2vec", run, "--max-steps", "2")) == 0
    out = tmp_path / "hf"
    assert export.main([str(run), str(out), "--weights", "teacher"]) == 0
    model, info = transformers.Data2VecAudioModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(str(out))
    assert fe.sampling_rate == 16000 and fe.do_normalize
    if os.path.isdir(POCKETSPHINX):
        import soundfile

        files = sorted(Path(POCKETSPHINX, "librivox").glob("*.wav"))[:3]
        waves = [soundfile.read(f, dtype="float32")[0] for f in files]
    else:  # the real-recordings check lives in test_audio_model.py too; here any speech will do
        from d2v_fast.data.audio.corpus import open_audio_corpus

        c = open_audio_corpus(speech_corpus)
        waves = [c[i] for i in range(3)]
    n = min(len(w) for w in waves)
    inputs = fe([w[:n] for w in waves], sampling_rate=16000, return_tensors="pt")
    ours = AudioEncoder(config_from_hf(json.loads((out / "config.json").read_text()))).eval()
    from safetensors.torch import load_file

    ours.load_state_dict(load_file(str(out / "model.safetensors")))
    with torch.no_grad():
        want = model.eval()(inputs.input_values).last_hidden_state
        torch.testing.assert_close(ours(inputs.input_values), want, rtol=0, atol=1e-5)
    # --init-from that directory: student and teacher start from the exported weights
    from d2v_fast.data.audio.corpus import open_audio_corpus
    from d2v_fast.trainer import Trainer

    tr = Trainer(audio_cfg(speech_corpus, "data2vec2"), open_audio_corpus(speech_corpus), tmp_path / "warm")
    tr.init_from(out)
    exported = load_file(str(out / "model.safetensors"))
    got = tr.model.student.encoder.state_dict()
    assert set(got) == set(exported) and all(torch.equal(got[k], exported[k]) for k in got)
    assert torch.equal(tr.model.teacher["pos_conv_embed"].layers[0].conv.weight,
                       exported["encoder.pos_conv_embed.layers.0.conv.weight"])


def test_bad_speech_input_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "notacorpus"
    bad.mkdir()
    rc = pretrain.main(["--modality", "audio", "--config", "tiny", "--data", str(bad), "--out", str(tmp_path / "o"),
                        "--train.progress", "false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not a prepared speech corpus" in err
    rc = pretrain.main(["--modality", "audio", "--config", "tiny", "--data.max_samples", "800",
                        "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--data.max_samples 800" in err
    rc = pretrain.main(["--modality", "audio", "--model.conv_dim", "64,x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--model.conv_dim" in err


def test_layerdrop_keeps_every_parameter_in_the_graph():
    """A skipped block still gives its parameters (zero) gradients: DDP needs them all."""
    from d2v_fast.modalities.audio import FrameMasks

    cfg = preset("tiny", "data2vec", "audio")
    cfg.model.layerdrop = 0.9
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.recipe, "audio").train()
    batch = {"waveform": torch.randn(2, 32_000), **FrameMasks(cfg.recipe, 0)(99, torch.tensor([0, 1]), 0)}
    pred, ti = model.student(batch)
    model.loss_sum(pred, model.targets(batch, ti)).backward()
    grads = {n: p.grad for n, p in model.student.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(float(g.abs().sum()) == 0 for n, g in grads.items() if ".layers." in n)  # some block was skipped
