"""Every field of every preset, pinned to where its value was published.

A changed default fails here, loudly, until this table (and its source) changes with it. A
new config field fails too: every field must be listed for every preset. Sources:

- T1: fairseq examples/data2vec/config/text/pretraining/base.yaml (data2vec, text base)
- M1: fairseq examples/data2vec/models/data2vec_text.py (its config defaults and code)
- T2: fairseq examples/data2vec/config/v2/base_text_only_task.yaml (data2vec 2.0, text base)
- T2L: fairseq examples/data2vec/config/v2/large_text_only_task.yaml (data2vec 2.0, text large)
- M2: fairseq examples/data2vec/models/data2vec2.py, models/modalities/{base,text,modules}.py
- P1: the data2vec paper (arXiv 2202.03555); P2: the data2vec 2.0 paper (arXiv 2212.07525)
- B1: data2vec_vision beit/README.md, the ViT-B pretraining command (data2vec v1, images base)
- B2: data2vec_vision beit/run_cyclical.py argument defaults (what B1 does not set) and the model it
  builds (beit/modeling_cyclical.py)
- I2: fairseq examples/data2vec/config/v2/base_images_only_task.yaml (data2vec 2.0, images base)
- IM2: fairseq examples/data2vec/models/modalities/images.py, models/data2vec2.py, data/mae_image_dataset.py
- S1: fairseq examples/data2vec/config/audio/pretraining/base_librispeech.yaml (data2vec, speech base)
- SM1: fairseq examples/data2vec/models/data2vec_audio.py (its config defaults and code)
- S2: fairseq examples/data2vec/config/v2/base_audio_only_task.yaml (data2vec 2.0, speech base)
- FD: fairseq fairseq/data/data_utils.py compute_block_mask_1d (called by data/audio/raw_audio_dataset.py)
- BM: data2vec_vision beit/modeling_cyclical.py; BD: beit/datasets.py; BO: beit/optim_factory.py
- ours: an engineering choice of this project (no recipe value), or the CPU-sized tiny preset
"""
import dataclasses

import pytest
import torch

from d2v_fast.config import SECTIONS, preset

OURS = "ours: engineering default, not part of the recipe"
CORPUS = "ours: replaced by the corpus's tokenizer at run time (RoBERTa BPE: pad id 1, docs/design.md#hf-layout)"
UNUSED_V1 = "not used by data2vec (v1): data2vec 2.0 only"
NOT_TEXT = "not used by text: images only"
NOT_IMAGES = "not used by images: text only"

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
    "recipe.mask_patches": (0, NOT_TEXT),
    "recipe.mask_min_block": (16, NOT_TEXT),
    "recipe.mask_prob_adjust": (0.0, NOT_TEXT),
    "recipe.cls_loss_weight": (0.0, NOT_TEXT),
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
    "data.crop_scale": ((0.08, 1.0), NOT_TEXT),
    "data.color_jitter": (0.4, NOT_TEXT),
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
    "train.min_target_var": (0.1, "M2 Data2VecMultiConfig.min_target_var"),
    "train.min_pred_var": (0.01, "M2 Data2VecMultiConfig.min_pred_var"),
    "train.max_skipped_steps": (10, OURS),
    "train.skip_on_device": (True, OURS + " (performance switch, same math)"),
    "train.host_counts": (True, OURS + " (performance switch, same math)"),
    "train.compile": ("none", OURS + " (performance switch, same math)"),
    "train.graph_bucket": (64, OURS + " (stack-cudagraphs shape buckets, same math up to attention's masked backend)"),
    "train.fused_qkv": (True, OURS + " (performance switch, same math)"),
    "train.bf16_teacher": (True, OURS + " (performance switch, same math)"),
    "train.cast_once": (True, OURS + " (performance switch, same math)"),
    "train.bf16_student": (True, OURS + " (performance switch, same math)"),
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
TINY_PROBE = TINY + ": the default job's probe beats its random-init floor (probe-default-job-cpu.json)"
TINY_V1 = {**BASE_V1, **TINY_COMMON, "recipe.top_k": (3, TINY),
           "recipe.ema_decay": (0.9999, TINY_PROBE + "; a teacher that tracks the student in 300 steps loses to it"),
           "recipe.ema_end_decay": (0.9999, TINY_PROBE + ": held, no anneal"),
           "optim.lr": (3e-3, TINY_PROBE + "; 1e-3 stays at the floor"),
           "optim.warmup_steps": (100, TINY_PROBE + "; after 30 warmup steps lr 3e-3 diverged on one seed of three")}

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

# Images (the model section is VisionConfig). data2vec v1: B1 line by line.
_TRAIN_COMMON = {k: v for k, v in BASE_V1.items() if k.startswith("train.") or k in (
    "optim.fused", "data.path", "data.num_workers", "data.verify")}
IMAGES_BASE_V1 = {
    **_TRAIN_COMMON,
    "model.image_size": (224, "B1 --model beit_base_patch16_224"),
    "model.patch_size": (16, "B1 --model beit_base_patch16_224"),
    "model.num_channels": (3, "B1 RGB ImageNet"),
    "model.hidden_size": (768, "B1 --model beit_base_patch16_224 (ViT-B)"),
    "model.num_layers": (12, "B1 ViT-B"),
    "model.num_heads": (12, "B1 ViT-B"),
    "model.ffn_size": (3072, "B1 ViT-B (mlp_ratio 4)"),
    "model.position_encoding": ("relative", "B2 rel_pos_bias default true -> use_shared_rel_pos_bias; abs_pos_emb false"),
    "model.layer_scale_init": (1e-4, "B1 --layer_scale_init_value 1e-4"),
    "model.use_mask_token": (True, "B2 modeling_cyclical.py: learned mask token (BEiT)"),
    "model.layer_norm_eps": (1e-6, "B2 modeling_cyclical.py: pre-LN LayerNorm eps 1e-6"),
    "model.dropout": (0.0, "B2: no --drop argument (timm default 0)"),
    "model.attention_dropout": (0.05, "B1 --attn_drop_rate 0.05"),
    "model.drop_path": (0.25, "B1 --drop_path 0.25"),
    "model.init_std": (0.02, "B2 modeling_cyclical.py: BEiT init (trunc normal 0.02)"),
    "recipe.name": ("data2vec", "P1"),
    "recipe.top_k": (6, "B1 --target_layers [6,7,8,9,10,11]"),
    "recipe.layer_norm": ("layer", "B2 target_layer_norm_last (no --no_target_layer_norm_last in B1)"),
    "recipe.final_norm": ("layer", "B1 --post_target_layer_norm"),
    "recipe.head_hidden_mult": (0, "B2 modeling_cyclical.py: head Linear(768 -> 768)"),
    "recipe.loss_beta": (2.0, "B1 --l1_beta=2.0"),
    "recipe.loss_scale": (1 / 768, "B1 F.smooth_l1_loss mean over elements = our channel sum x 1/768"),
    "recipe.ema_decay": (0.9998, "B1 --ema_decay 0.9998 --ema_start_at 0 (constant)"),
    "recipe.ema_end_decay": (0.9998, "B1 --ema_decay 0.9998"),
    "recipe.ema_anneal_end_step": (0, "B1 --ema_start_at 0 (no annealing)"),
    "recipe.mask_prob": (0.35, NOT_IMAGES + " (v1 images count patches: mask_patches)"),
    "recipe.mask_span": (4, NOT_IMAGES),
    "recipe.clones": (1, UNUSED_V1),
    "recipe.decoder_layers": (5, UNUSED_V1),
    "recipe.decoder_kernel": (9, UNUSED_V1),
    "recipe.decoder_dim": (0, UNUSED_V1),
    "recipe.decoder_groups": (1, UNUSED_V1),
    "recipe.decoder_dropout": (0.0, UNUSED_V1),
    "recipe.mask_noise_std": (0.01, UNUSED_V1),
    "recipe.mask_patches": (120, "B1 --num_mask_patches 120"),
    "recipe.mask_min_block": (16, "B1 --min_mask_patches_per_block 16"),
    "recipe.mask_prob_adjust": (0.0, UNUSED_V1),
    "recipe.cls_loss_weight": (0.0, UNUSED_V1),
    "optim.lr": (2e-3, "B1 --lr 2e-3"),
    "optim.betas": ((0.9, 0.999), "B2 --opt adamw, opt_betas None (timm AdamW default)"),
    "optim.eps": (1e-8, "B2 --opt_eps 1e-8"),
    "optim.weight_decay": (0.05, "B1 --weight_decay 0.05"),
    "optim.decay_biases_and_norms": (False, "B2 create_optimizer: 1-D and bias parameters skip weight decay"),
    "optim.warmup_steps": (6250, "B1 --warmup_epochs 10 x 625 updates (1,281,167 // 2048) per epoch"),
    "optim.total_steps": (500_000, "B1 --epochs 800 x 625 updates"),
    "optim.clip_norm": (3.0, "B1 --clip_grad 3.0"),
    "optim.schedule": ("cosine", "B1 cosine schedule (timm cosine_scheduler)"),
    "optim.tri_stage_phases": ((0.03, 0.9, 0.07), "not used by cosine (speech v1's tri_stage phase_ratio)"),
    "data.max_samples": (320_000, "not used by images (speech crop cap)"),
    "data.seq_len": (512, NOT_IMAGES),
    "data.block_mode": ("document", NOT_IMAGES),
    "data.crop_scale": ((0.08, 1.0), "B2 BEiT RandomResizedCrop(224, scale 0.08-1)"),
    "data.color_jitter": (0.4, "B2 --color_jitter 0.4"),
    "train.batch_size": (2048, "B1 --batch_size 128 x --world_size 16"),
    "train.min_target_var": (0.0, "BM / B2 engine_for_cyclical.py: no collapse guard (0 = never stops)"),
    "train.min_pred_var": (0.0, "BM / B2 engine_for_cyclical.py: no collapse guard (0 = never stops)"),
    "train.max_steps": (500_000, "B1 --epochs 800 x 625 updates"),
}
TINY_IMAGES = "ours: tiny CPU preset (32x32 Fashion-MNIST photos in 4x4 patches)"
TINY_IMAGES_COMMON = {
    "model.image_size": (32, TINY_IMAGES),
    "model.patch_size": (4, TINY_IMAGES),
    "model.hidden_size": (128, TINY_IMAGES),
    "model.num_layers": (4, TINY_IMAGES),
    "model.num_heads": (4, TINY_IMAGES),
    "model.ffn_size": (512, TINY_IMAGES),
    "recipe.top_k": (3, TINY_IMAGES),
    "recipe.ema_decay": (0.998, TINY_IMAGES + ": a short, quickly annealed EMA so the loss moves in 300 steps"),
    "recipe.ema_end_decay": (0.9995, TINY_IMAGES),
    "recipe.ema_anneal_end_step": (300, TINY_IMAGES),
    "optim.lr": (1e-3, TINY_IMAGES),
    "optim.warmup_steps": (30, TINY_IMAGES),
    "optim.total_steps": (0, TINY_IMAGES + ": cosine over --max-steps"),
    "data.crop_scale": ((0.35, 1.0), TINY_IMAGES + ": 28-pixel photos lose the garment below a third"),
    "train.max_steps": (300, TINY_IMAGES),
    "train.log_every": (10, TINY_IMAGES),
    "train.ckpt_every": (100, TINY_IMAGES),
    "train.collapse_warmup": (100, TINY_IMAGES),
}
IMAGES_TINY_V1 = {
    **IMAGES_BASE_V1, **TINY_IMAGES_COMMON,
    "model.attention_dropout": (0.0, TINY_IMAGES),
    "model.drop_path": (0.0, TINY_IMAGES + ": no stochastic depth at 4 blocks"),
    "recipe.loss_scale": (1 / 128, "B1 mean over elements at width 128"),
    "recipe.mask_patches": (39, TINY_IMAGES + ": B1's 120/196 of 64 patches"),
    "recipe.mask_min_block": (4, TINY_IMAGES + ": B1's 16/196 of 64 patches"),
    "train.batch_size": (32, TINY_IMAGES),
}
# data2vec 2.0 images: I2 line by line (sizes: M2 defaults; prenet_depth 2 + depth 10 = 12 blocks).
IMAGES_BASE_V2 = {
    **IMAGES_BASE_V1,
    "model.position_encoding": ("sincos", "IM2 fixed 2-D sin-cos positions (use_alibi_encoder false)"),
    "model.layer_scale_init": (0.0, "M2 layer scale off (the HF block, see docs/images.md)"),
    "model.use_mask_token": (False, "IM2: masked patches are dropped, not replaced"),
    "model.layer_norm_eps": (1e-6, "I2 model.norm_eps"),
    "model.dropout": (0.0, "I2 model.encoder_dropout / post_mlp_drop"),
    "model.attention_dropout": (0.0, "I2 model.attention_dropout"),
    "model.drop_path": (0.0, "M2 Data2VecMultiConfig.drop_path default 0"),
    "model.num_layers": (12, "I2 model.depth 10 + modalities.image.prenet_depth 2"),
    "recipe.name": ("data2vec2", "P2"),
    "recipe.top_k": (10, "I2 model.average_top_k_layers"),
    "recipe.layer_norm": ("instance", "I2 model.instance_norm_target_layer: true"),
    "recipe.final_norm": ("layer", "I2 model.layer_norm_targets: true"),
    "recipe.head_hidden_mult": (0, "IM2 Decoder2d: one Linear projection"),
    "recipe.loss_beta": (0.0, "M2 loss_beta default 0 (MSE)"),
    "recipe.loss_scale": (0.0, "M2 loss_scale None = 1/sqrt(768)"),
    "recipe.ema_decay": (0.9998, "I2 model.ema_decay"),
    "recipe.ema_end_decay": (0.99999, "I2 model.ema_end_decay"),
    "recipe.ema_anneal_end_step": (100_000, "I2 model.ema_anneal_end_step"),
    "recipe.mask_prob": (0.8, "I2 modalities.image.mask_prob"),
    "recipe.mask_span": (3, "I2 modalities.image.mask_length (visible block side)"),
    "recipe.clones": (16, "I2 model.clone_batch"),
    "recipe.decoder_layers": (6, "I2 decoder.decoder_layers"),
    "recipe.decoder_kernel": (3, "I2 decoder.decoder_kernel"),
    "recipe.decoder_dim": (0, "I2 decoder.decoder_dim 768 = the encoder width"),
    "recipe.decoder_groups": (16, "I2 decoder.decoder_groups: D2vDecoderConfig's default 16, not overridden"),
    "recipe.decoder_dropout": (0.0, "I2 decoder.input_dropout"),
    "recipe.mask_noise_std": (0.01, "I2 modalities.image.mask_noise_std"),
    "recipe.mask_patches": (0, "not used by data2vec 2.0: v1 only"),
    "recipe.mask_min_block": (16, "not used by data2vec 2.0: v1 only"),
    "recipe.mask_prob_adjust": (0.07, "I2 modalities.image.mask_prob_adjust"),
    "recipe.cls_loss_weight": (0.01 * 256, "I2 model.cls_loss 0.01 x 256 clone rows per GPU (see docs/images.md)"),
    "optim.lr": (1e-3, "I2 optimizer.groups.default.lr_float"),
    "optim.betas": ((0.9, 0.95), "I2 optimizer.groups.default.optimizer.adam_betas"),
    "optim.eps": (1e-8, "M2 fairseq adam eps default 1e-8 (I2 sets none)"),
    "optim.weight_decay": (0.05, "I2 optimizer.groups.default.optimizer.weight_decay"),
    "optim.decay_biases_and_norms": (False, "M2: 1-D and bias parameters get weight_decay_scale 0"),
    "optim.warmup_steps": (50_040, "I2 lr_scheduler.warmup_updates"),
    "optim.total_steps": (375_300, "I2 optimization.max_update"),
    "optim.clip_norm": (4.0, "I2 optimization.clip_norm"),
    "data.crop_scale": ((0.2, 1.0), "IM2 mae_image_dataset RandomResizedCrop(scale=(0.2, 1.0))"),
    "data.color_jitter": (0.0, "IM2 mae_image_dataset: no colour jitter"),
    "train.batch_size": (256, "I2 dataset.batch_size 16 x distributed_world_size 16"),
    "train.max_steps": (375_300, "I2 optimization.max_update"),
    "train.min_target_var": (0.0, "I2 model.min_target_var: 0"),
    "train.min_pred_var": (0.0, "I2 model.min_pred_var: 0"),
}
IMAGES_TINY_V2 = {
    **IMAGES_BASE_V2, **TINY_IMAGES_COMMON,
    "recipe.clones": (4, TINY_IMAGES),
    "recipe.decoder_layers": (3, TINY_IMAGES),
    "recipe.cls_loss_weight": (0.01 * 16, TINY_IMAGES + ": I2's cls_loss x the 16 clone rows of a tiny batch's 4 images"),
    "train.batch_size": (16, TINY_IMAGES),
}

TABLES = {("base", "data2vec"): BASE_V1, ("large", "data2vec"): LARGE_V1, ("tiny", "data2vec"): TINY_V1,
          ("base", "data2vec2"): BASE_V2, ("large", "data2vec2"): LARGE_V2, ("tiny", "data2vec2"): TINY_V2,
          ("base", "data2vec", "images"): IMAGES_BASE_V1, ("tiny", "data2vec", "images"): IMAGES_TINY_V1,
          ("base", "data2vec2", "images"): IMAGES_BASE_V2, ("tiny", "data2vec2", "images"): IMAGES_TINY_V2}


def flat(cfg) -> dict:
    return {f"{s}.{f.name}": getattr(getattr(cfg, s), f.name)
            for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))}


@pytest.mark.parametrize("key", list(TABLES), ids=lambda v: "/".join(v))
def test_every_field_of_the_preset_is_pinned_to_its_source(key):
    table = TABLES[key]
    size, recipe = key[:2]
    got = flat(preset(*key))
    assert sorted(got) == sorted(table), "a config field was added or removed: list it in this table with its source"
    wrong = {k: (got[k], want) for k, (want, _) in table.items()
             if got[k] != want or type(got[k]) is not type(want)}
    assert not wrong, f"{size}/{recipe} preset differs from its published table (got, want): {wrong}"
    assert all(src.strip() for _, src in table.values())


def test_tables_name_a_source_that_exists():
    """Every source names one of the documents above, a paper, or says it is ours."""
    prefixes = ("T1 ", "T2 ", "T2L ", "M1", "M2", "P1", "P2", "ours", "not ", "fairseq", "B1", "B2", "I2 ",
                "IM2", "S1 ", "SM1", "S2 ", "FD", "BM", "BD", "BO")
    for key, table in {**TABLES, **SPEECH}.items():
        for field, (_, src) in table.items():
            assert src.startswith(prefixes), f"{key} {field}: source {src!r} names no document"


# Speech: the values the published configs and code fix, per preset (the speech model section
# and the rest are pinned in tests/test_audio_recipes.py).
_SPEECH_GUARD = {
    "train.collapse_warmup": (5000, "SM1 / M2: the guard acts once num_updates > 5000"),
    "train.min_target_var": (0.1, "SM1 Data2VecAudioConfig.min_target_var / M2 Data2VecMultiConfig.min_target_var"),
    "train.min_pred_var": (0.01, "SM1 Data2VecAudioConfig.min_pred_var / M2 Data2VecMultiConfig.min_pred_var"),
}
SPEECH_BASE_V1 = {
    "recipe.mask_prob": (0.65, "S1 model.mask_prob"),
    "recipe.mask_span": (10, "S1 model.mask_length"),
    "recipe.clones": (1, "S1 model: one mask per utterance (no clone_batch)"),
    "optim.weight_decay": (0.01, "S1 optimizer.weight_decay"),
    "optim.decay_biases_and_norms": (True, "S1 optimizer._name adam (fp16: one flat parameter): no exemption"),
    **_SPEECH_GUARD,
}
SPEECH_BASE_V2 = {
    "recipe.mask_prob": (0.5, "S2 model.modalities.audio.mask_prob (FD: exactly int(0.5 T) per clone)"),
    "recipe.mask_span": (5, "S2 model.modalities.audio.mask_length"),
    "recipe.mask_prob_adjust": (0.05, "S2 model.modalities.audio.mask_prob_adjust"),
    "recipe.clones": (8, "S2 model.clone_batch"),
    "optim.weight_decay": (0.01, "S2 optimizer.weight_decay"),
    # plain adam with common.fp16: FP16Optimizer flattens every parameter into one tensor, so the
    # per-parameter optim_overrides (weight_decay_scale 0) are never read (only composite reads them)
    "optim.decay_biases_and_norms": (True, "S2 optimizer._name adam, common.fp16 true: every parameter decays"),
    **_SPEECH_GUARD,
}
SPEECH_TINY = {"train.collapse_warmup": (100, TINY)}
SPEECH_TINY_V1 = {
    **SPEECH_BASE_V1, **SPEECH_TINY,
    "optim.lr": (3e-4, TINY + ": the loss ends below where it starts (audio-job-data2vec-*.json)"),
    "optim.schedule": ("cosine", TINY + ": to 0 over the run; at the published tri-stage shape the loss rose after step 100"),
    "optim.warmup_steps": (30, TINY),
}
SPEECH = {("base", "data2vec", "audio"): SPEECH_BASE_V1, ("tiny", "data2vec", "audio"): SPEECH_TINY_V1,
          ("base", "data2vec2", "audio"): SPEECH_BASE_V2,
          ("tiny", "data2vec2", "audio"): {**SPEECH_BASE_V2, "recipe.clones": (4, TINY), **SPEECH_TINY}}


@pytest.mark.parametrize("key", list(SPEECH), ids=lambda v: "/".join(v))
def test_speech_presets_take_the_published_values(key):
    got = flat(preset(*key))
    wrong = {k: (got[k], want) for k, (want, _) in SPEECH[key].items()
             if got[k] != want or type(got[k]) is not type(want)}
    assert not wrong, f"{key} preset differs from its published values (got, want): {wrong}"


def _groups(modality, recipe):
    from d2v_fast.recipes import build_model
    from d2v_fast.schedule import build_optimizer

    cfg = preset("tiny", recipe, modality)
    student = build_model(cfg.model, cfg.recipe, modality).student
    opt = build_optimizer(student, cfg.optim)
    names = {id(p): n for n, p in student.named_parameters()}
    return cfg, {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


def test_speech_2_decays_every_parameter():
    """S2: plain adam, fp16 -> every trainable parameter at weight_decay 0.01 (biases, norms too)."""
    cfg, groups = _groups("audio", "data2vec2")
    assert groups[0.01] and not groups.get(0.0)
    assert {"encoder.encoder.layers.0.attention.q_proj.bias", "encoder.encoder.layer_norm.weight",
            "decoder.proj.bias"} <= groups[0.01]


def test_images_v1_exempts_the_cls_token_and_1d_parameters_from_decay():
    """BM no_weight_decay {pos_embed, cls_token} (our v1 encoder has relative positions, no
    pos_embed) and BO get_parameter_groups: 1-D parameters and biases skip weight decay; the
    mask token and the relative position bias table decay."""
    _, groups = _groups("images", "data2vec")
    assert "encoder.embeddings.cls_token" in groups[0.0]
    assert {"encoder.embeddings.mask_token", "encoder.encoder.relative_position_bias.relative_position_bias_table",
            "head.weight"} <= groups[0.05]
    assert all(not n.endswith(".weight") or "norm" in n or "lambda" in n for n in groups[0.0] - {
        "encoder.embeddings.cls_token"})


def test_images_init_follows_each_published_model():
    """v1, BM: trunc_normal_(std=.02) cut at a=-std, b=std for linear and conv weights, the CLS
    and mask tokens and the head; each block's output projections divided by sqrt(2 * depth).
    2.0, M2 init_bert_params: linear weights N(0, 0.02) untruncated, no depth rescale; IM2: the
    patch embedding xavier_uniform over [out, in * k * k], the CLS token N(0, 1)
    (I2 init_extra_token_zero: false), the decoder PyTorch's default init."""
    import math

    from d2v_fast.recipes import build_model

    torch.manual_seed(0)
    cfg = preset("tiny", "data2vec", "images")
    std = cfg.model.init_std
    v1 = build_model(cfg.model, cfg.recipe, "images").student
    enc = v1.encoder
    q = enc.encoder.layer[0].attention.attention.query.weight
    assert q.abs().max() <= std and 0.45 * std < q.std() < 0.62 * std  # ±1 std cut: std 0.54 sigma
    for t in (enc.embeddings.cls_token, enc.embeddings.mask_token, v1.head.weight,
              enc.embeddings.patch_embeddings.projection.weight):
        assert t.abs().max() <= std
    out = enc.encoder.layer[3].output.dense.weight
    assert out.abs().max() <= std / math.sqrt(8) + 1e-9  # depth 4: divided by sqrt(2 * 4)

    cfg = preset("tiny", "data2vec2", "images")
    v2 = build_model(cfg.model, cfg.recipe, "images").student
    enc = v2.encoder
    for w in (enc.encoder.layer[0].attention.attention.query.weight, enc.encoder.layer[3].output.dense.weight):
        assert 0.9 * std < w.std() < 1.1 * w.new_tensor(std) and w.abs().max() > 3 * std  # untruncated, no rescale
    patch = enc.embeddings.patch_embeddings.projection.weight
    fan_in, fan_out = patch[0].numel(), patch.shape[0]
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert patch.abs().max() <= bound and patch.abs().max() > 0.95 * bound
    assert 0.75 < enc.embeddings.cls_token.std() < 1.25
    conv = v2.decoder.convs[1]
    default = 1 / math.sqrt(conv.weight[0].numel())  # kaiming_uniform(a=sqrt(5)) bound
    assert conv.weight.abs().max() <= default and conv.weight.abs().max() > 0.9 * default
    assert v2.decoder.proj.weight.abs().max() <= 1 / math.sqrt(v2.decoder.proj.in_features)

