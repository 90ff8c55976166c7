"""The ``hf`` benchmark provider (plain Hugging Face transformers, d2v_fast/reference/hf_step.py)
computes the engine's data2vec step: same weights and batch, dropout off -> the same losses
over several updates (AdamW, schedule and EMA included)."""
import copy

import pytest
import torch

from d2v_fast.steptimer import RESERVED_IDS, SyntheticCorpus, synthetic_batch
from d2v_fast.config import preset
from d2v_fast.errors import UsageError
from d2v_fast.trainer import Trainer

pytest.importorskip("transformers", reason="the hf provider needs transformers")
from d2v_fast.reference.hf_step import HFData2VecStep  # noqa: E402

VOCAB = 300


def tiny_cfg(recipe="data2vec", **recipe_fields):
    cfg = preset("tiny", recipe)
    cfg.model.num_layers, cfg.model.dropout, cfg.model.attention_dropout = 3, 0.0, 0.0
    cfg.recipe.top_k = 2
    cfg.data.seq_len, cfg.data.num_workers, cfg.train.progress = 32, 0, False
    cfg.optim.warmup_steps = 2  # a moving lr, so the schedule is compared too
    for k, v in recipe_fields.items():
        setattr(cfg.recipe, k, v)
    return cfg


@pytest.mark.parametrize("recipe_fields", [
    {},  # tiny: instance norm per layer and on the average, smooth L1 beta 4
    {"layer_norm": "layer", "final_norm": "none", "loss_beta": 0.0, "loss_scale": 0.0},
], ids=["instance-smoothl1", "layer-mse"])
def test_hf_step_matches_the_engine(tmp_path, recipe_fields):
    cfg = tiny_cfg(**recipe_fields)
    engine = Trainer(cfg, SyntheticCorpus(vocab_size=VOCAB), tmp_path / "run")
    hf = HFData2VecStep(cfg, torch.device("cpu"), VOCAB, RESERVED_IDS["pad"])
    hf.load_engine_state(copy.deepcopy(engine.model.state_dict()))
    batches = [synthetic_batch(cfg, 4, VOCAB, seed=s) for s in range(4)]
    a = [float(engine.train_step([b])["loss"]) for b in batches]
    b = [float(hf(batch)) for batch in batches]
    assert a[0] != a[-1]
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= 1e-4 * abs(x), f"step {step}: engine {x} hf {y}"
    teacher_engine = dict(engine.model.teacher.named_parameters())
    for name, p in hf.teacher.encoder.layer.named_parameters():
        torch.testing.assert_close(p, teacher_engine[name], rtol=1e-4, atol=1e-5)


def test_hf_provider_refuses_data2vec2():
    with pytest.raises(UsageError, match="--providers hf: only --recipe data2vec"):
        HFData2VecStep(tiny_cfg("data2vec2"), torch.device("cpu"), VOCAB)
