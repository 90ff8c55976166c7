"""Every field of every preset, pinned to where its value was published.

A changed default fails here, loudly, until this table (and its source) changes with it. A
new config field fails too: every field must be listed for every preset. Sources:

- T1: fairseq examples/data2vec/config/text/pretraining/base.yaml (data2vec, text base)
- M1: fairseq examples/data2vec/models/data2vec_text.py (its config defaults and code)
- T2: fairseq examples/data2vec/config/v2/base_text_only_task.yaml (data2vec 2.0, text base)
- T2L: fairseq examples/data2vec/config/v2/large_text_only_task.yaml (data2vec 2.0, text large)
- M2: fairseq examples/data2vec/models/data2vec2.py, models/modalities/{base,text,modules}.py
- P1: the data2vec paper (arXiv 2202.03555); P2: the data2vec 2.0 paper (arXiv 2212.07525)
- ours: an engineering choice of this project (no recipe value), or the CPU-sized tiny preset
"""
import dataclasses

import pytest

from d2v_fast.config import SECTIONS, preset

OURS = "ours: engineering default, not part of the recipe"
CORPUS = "ours: replaced by the corpus's tokenizer at run time (RoBERTa BPE: pad id 1, SPEC §2)"
UNUSED_V1 = "not used by data2vec (v1): data2vec 2.0 only"

# data2vec, base: T1 line by line.
BASE_V1 = {
    "model.vocab_size": (50265, CORPUS),
    "model.pad_id": (1, CORPUS),
    "model.hidden_size": (768, "T1 model.transformer.encoder.embed_dim"),
    "model.num_layers": (12, "T1 model.transformer.encoder.layers"),
    "model.num_heads": (12, "T1 model.transformer.encoder.attention_heads"),
    "model.ffn_size": (3072, "T1 model.transformer.encoder.ffn_embed_dim"),
    "model.max_seq_len": (512, "T1 model.transformer.max_source_positions"),
    "model.layer_norm_eps": (1e-5, "fairseq LayerNorm default eps (T1 sets none); HF Data2VecTextConfig 1e-5"),
    "model.dropout": (0.1, "T1 model.transformer.dropout"),
    "model.attention_dropout": (0.1, "T1 model.transformer.attention_dropout"),
    "model.init_std": (0.02, "M1: init_bert_params, normal(0, 0.02)"),
    "recipe.name": ("data2vec", "P1"),
    "recipe.top_k": (10, "T1 model.average_top_k_layers"),
    "recipe.layer_norm": ("layer", "T1 model.layer_norm_target_layer: true; P1 §3.3 (layer norm for text)"),
    "recipe.final_norm": ("none", "M1 defaults layer_norm_targets / instance_norm_targets: false"),
    "recipe.head_hidden_mult": (2, "T1 model.head_layers: 2 (M1: Linear(C, 2C), GELU, Linear(2C, C))"),
    "recipe.loss_beta": (4.0, "T1 model.loss_beta"),
    "recipe.loss_scale": (1.0, "T1 model.loss_scale"),
    "recipe.ema_decay": (0.999, "T1 model.ema_decay"),
    "recipe.ema_end_decay": (0.9999, "T1 model.ema_end_decay"),
    "recipe.ema_anneal_end_step": (300_000, "T1 model.ema_anneal_end_step"),
    "recipe.mask_prob": (0.35, "T1 task.mask_prob"),
    "recipe.mask_span": (4, "T1 task.mask_multiple_length"),
    "recipe.clones": (1, UNUSED_V1),
    "recipe.decoder_layers": (5, UNUSED_V1),
    "recipe.decoder_kernel": (9, UNUSED_V1),
    "recipe.decoder_dim": (0, UNUSED_V1),
    "recipe.decoder_groups": (1, UNUSED_V1),
    "recipe.decoder_dropout": (0.0, UNUSED_V1),
    "recipe.mask_noise_std": (0.01, UNUSED_V1),
    "optim.lr": (2e-4, "T1 optimization.lr"),
    "optim.betas": ((0.9, 0.98), "T1 optimizer.adam_betas"),
    "optim.eps": (1e-6, "T1 optimizer.adam_eps"),
    "optim.weight_decay": (0.01, "T1 optimizer.weight_decay"),
    "optim.decay_biases_and_norms": (True, "T1 optimizer adam with weight_decay; M1 exempts no parameter"),
    "optim.warmup_steps": (10_000, "T1 lr_scheduler.warmup_updates"),
    "optim.total_steps": (1_000_000, "T1 optimization.max_update (cosine period)"),
    "optim.clip_norm": (5.0, "T1 optimization.clip_norm"),
    "optim.fused": (True, OURS),
    "optim.schedule": ("cosine", "T1 lr_scheduler._name: cosine"),
    "optim.tri_stage_phases": ((0.03, 0.9, 0.07), "not used by cosine (speech v1's tri_stage phase_ratio)"),
    "data.path": ("", OURS),
    "data.seq_len": (512, "T1 task.tokens_per_sample"),
    "data.block_mode": ("document", "T1 task.sample_break_mode: complete_doc (blocks never cross a document)"),
    "data.num_workers": (2, OURS),
    "data.verify": ("background", OURS),
    "data.max_samples": (320_000, "not used by text (speech crop cap)"),
    "train.batch_size": (256, "T1 dataset.max_tokens 8192 x 16 GPUs / 512 tokens; P1 §5.3: 256 sequences"),
    "train.micro_batch_size": (0, OURS),
    "train.max_steps": (1_000_000, "T1 optimization.max_update; P1 §5.3: 1M updates"),
    "train.seed": (0, OURS),
    "train.out": ("", OURS),
    "train.log_every": (10, OURS),
    "train.ckpt_every": (1000, OURS),
    "train.keep_last": (3, OURS),
    "train.dtype": ("auto", OURS),
    "train.device": ("auto", OURS),
    "train.parallel": ("ddp", OURS),
    "train.kernels": ("auto", OURS),
    "train.collapse_warmup": (1000, OURS),
    "train.min_target_var": (0.1, "M2 Data2VecMultiConfig.min_target_var (SPEC collapse guard)"),
    "train.min_pred_var": (0.01, "M2 Data2VecMultiConfig.min_pred_var (SPEC collapse guard)"),
    "train.max_skipped_steps": (10, OURS),
    "train.skip_on_device": (False, OURS + " (performance switch, same math)"),
    "train.compile": ("none", OURS + " (performance switch, same math)"),
    "train.fused_qkv": (False, OURS + " (performance switch, same math)"),
    "train.bf16_teacher": (False, OURS + " (performance switch, same math)"),
    "train.cast_once": (False, OURS + " (performance switch, same math)"),
    "train.attention": ("auto", OURS + " (performance switch: SDPA backend pinned, same math)"),
    "train.probe_task": ("builtin", OURS + " (the representation probe after training)"),
    "train.probe_every": (0, OURS),
    "train.progress": (True, OURS),
}

RL = "ours: RoBERTa-large / P1 §4 data2vec Large sizes"
# data2vec, large: P1 published no large text model; the large sizes on T1's recipe.
LARGE_V1 = {
    **BASE_V1,
    "model.hidden_size": (1024, RL),
    "model.num_layers": (24, RL),
    "model.num_heads": (16, RL),
    "model.ffn_size": (4096, RL),
    "optim.lr": (1e-4, "not published for v1 text: T2L's lr (optimizer.groups.default.lr_float)"),
}

TINY = "ours: tiny CPU preset"
# Shared by both recipes' tiny presets.
TINY_COMMON = {
    "model.hidden_size": (128, TINY),
    "model.num_layers": (4, TINY),
    "model.num_heads": (4, TINY),
    "model.ffn_size": (512, TINY),
    "model.max_seq_len": (128, TINY),
    "recipe.ema_decay": (0.998, TINY + ": a short, quickly annealed EMA so the loss moves in 300 steps"),
    "recipe.ema_end_decay": (0.9995, TINY),
    "recipe.ema_anneal_end_step": (300, TINY),
    "optim.lr": (1e-3, TINY),
    "optim.warmup_steps": (30, TINY),
    "optim.total_steps": (0, TINY + ": cosine over --max-steps"),
    "data.seq_len": (128, TINY),
    "data.block_mode": ("pack", TINY + ": the built-in corpus's docstrings are short"),
    "train.batch_size": (16, TINY),
    "train.max_steps": (300, TINY),
    "train.log_every": (10, TINY),
    "train.ckpt_every": (100, TINY),
    "train.collapse_warmup": (100, TINY),
}
TINY_V1 = {**BASE_V1, **TINY_COMMON, "recipe.top_k": (3, TINY)}

# data2vec 2.0, base: T2 line by line (model sizes and dropouts: M2 defaults, T2 sets depth/embed_dim).
BASE_V2 = {
    **BASE_V1,
    "model.hidden_size": (768, "T2 model.embed_dim"),
    "model.num_layers": (12, "T2 model.depth"),
    "model.num_heads": (12, "M2 Data2VecMultiConfig.num_heads"),
    "model.ffn_size": (3072, "M2 Data2VecMultiConfig.mlp_ratio 4"),
    "model.max_seq_len": (512, "T2 task.tokens_per_sample; text.py max_source_positions"),
    "model.layer_norm_eps": (1e-5, "T2 model.norm_eps"),
    "model.dropout": (0.1, "M2 encoder_dropout / text.py D2vTextConfig.dropout"),
    "model.attention_dropout": (0.1, "M2 Data2VecMultiConfig.attention_dropout"),
    "recipe.name": ("data2vec2", "P2"),
    "recipe.top_k": (12, "T2 model.average_top_k_layers"),
    "recipe.layer_norm": ("instance", "T2 model.instance_norm_target_layer: true"),
    "recipe.final_norm": ("none", "T2 model.layer_norm_targets / instance_norm_targets: false"),
    "recipe.head_hidden_mult": (2, "T2 decoder.projection_layers 2, projection_ratio 2.0"),
    "recipe.loss_beta": (0.0, "T2 model.loss_beta (0 = MSE)"),
    "recipe.loss_scale": (1.0, "T2 model.loss_scale"),
    "recipe.ema_decay": (0.9999, "T2 model.ema_decay"),
    "recipe.ema_end_decay": (0.99999, "T2 model.ema_end_decay"),
    "recipe.ema_anneal_end_step": (100_000, "T2 model.ema_anneal_end_step"),
    "recipe.mask_prob": (0.48, "T2 modalities.text.mask_prob"),
    "recipe.mask_span": (1, "T2 modalities.text.mask_length"),
    "recipe.clones": (8, "T2 model.clone_batch"),
    "recipe.decoder_layers": (5, "T2 decoder.decoder_layers"),
    "recipe.decoder_kernel": (9, "T2 decoder.decoder_kernel"),
    "recipe.decoder_dim": (768, "T2 decoder.decoder_dim"),
    "recipe.decoder_groups": (1, "T2 decoder.decoder_groups (the text decoder has no groups)"),
    "recipe.decoder_dropout": (0.1, "T2 decoder.input_dropout"),
    "recipe.mask_noise_std": (0.01, "T2 modalities.text.mask_noise_std"),
    "optim.lr": (2e-4, "T2 optimizer.groups.default.lr_float"),
    "optim.betas": ((0.9, 0.98), "T2 optimizer.groups.default.optimizer.adam_betas"),
    "optim.eps": (1e-6, "T2 optimizer.groups.default.optimizer.adam_eps"),
    "optim.weight_decay": (0.01, "T2 optimizer.groups.default.optimizer.weight_decay"),
    "optim.decay_biases_and_norms": (False, "M2: 1-D and bias parameters get weight_decay_scale 0"),
    "optim.warmup_steps": (4000, "T2 optimizer.groups.default.lr_scheduler.warmup_updates"),
    "optim.total_steps": (1_000_000, "T2 optimization.max_update (cosine period)"),
    "optim.clip_norm": (1.0, "T2 optimization.clip_norm"),
    "data.block_mode": ("pack", "T2 task.sample_break_mode: none"),
    "train.batch_size": (64, "T2 dataset.batch_size 4 x distributed_world_size 16"),
    "train.max_steps": (1_000_000, "T2 optimization.max_update"),
}

# data2vec 2.0, large: T2L.
LARGE_V2 = {
    **BASE_V2,
    "model.hidden_size": (1024, "T2L model.embed_dim"),
    "model.num_layers": (24, "T2L model.depth"),
    "model.num_heads": (16, "T2L model.num_heads"),
    "model.ffn_size": (4096, "M2 Data2VecMultiConfig.mlp_ratio 4"),
    "recipe.top_k": (24, "T2L model.average_top_k_layers"),
    "recipe.layer_norm": ("layer", "T2L model.layer_norm_target_layer: true"),
    "recipe.final_norm": ("instance", "T2L model.instance_norm_targets: true"),
    "recipe.mask_prob": (0.5, "T2L modalities.text.mask_prob"),
    "recipe.decoder_dim": (768, "T2L decoder.decoder_dim (narrower than the 1024-wide encoder)"),
    "optim.lr": (1e-4, "T2L optimizer.groups.default.lr_float"),
    "optim.total_steps": (600_000, "T2L optimization.max_update (cosine period)"),
    "train.batch_size": (64, "T2L dataset.batch_size 2 x distributed_world_size 32"),
    "train.max_steps": (600_000, "T2L optimization.max_update"),
}

TINY_V2 = {
    **BASE_V2, **TINY_COMMON,
    "recipe.top_k": (4, TINY + ": every layer, as T2 averages all 12 of 12"),
    "recipe.final_norm": ("instance", TINY + ": keeps the young teacher's target scale fixed over a short run"),
    "recipe.clones": (4, TINY),
    "recipe.decoder_layers": (3, TINY),
    "recipe.decoder_dim": (0, TINY + ": the encoder width, as in T2"),
    "optim.clip_norm": (1.0, "T2 optimization.clip_norm"),
}

TABLES = {("base", "data2vec"): BASE_V1, ("large", "data2vec"): LARGE_V1, ("tiny", "data2vec"): TINY_V1,
          ("base", "data2vec2"): BASE_V2, ("large", "data2vec2"): LARGE_V2, ("tiny", "data2vec2"): TINY_V2}


def flat(cfg) -> dict:
    return {f"{s}.{f.name}": getattr(getattr(cfg, s), f.name)
            for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))}


@pytest.mark.parametrize("size,recipe", list(TABLES), ids=lambda v: str(v))
def test_every_field_of_the_preset_is_pinned_to_its_source(size, recipe):
    table = TABLES[(size, recipe)]
    got = flat(preset(size, recipe))
    assert sorted(got) == sorted(table), "a config field was added or removed: list it in this table with its source"
    wrong = {k: (got[k], want) for k, (want, _) in table.items()
             if got[k] != want or type(got[k]) is not type(want)}
    assert not wrong, f"{size}/{recipe} preset differs from its published table (got, want): {wrong}"
    assert all(src.strip() for _, src in table.values())


def test_tables_name_a_source_that_exists():
    """Every source names one of the documents above, a paper, or says it is ours."""
    prefixes = ("T1 ", "T2 ", "T2L ", "M1", "M2", "P1", "P2", "ours", "not ", "fairseq", "SPEC")
    for key, table in TABLES.items():
        for field, (_, src) in table.items():
            assert src.startswith(prefixes), f"{key} {field}: source {src!r} names no document"
