r"""Character/byte/BPE language modelling with any norm.

  quick (this 2-core CPU, <= 10 minutes):
    python -m experiments.text --config=experiments/configs/text.py:quick \
        --config.norm=batch --config.tokenizer=bpe --workdir=runs/text_bn_bpe
  full (nanoGPT's character-level Shakespeare: 6 layers, d=384, context 256; GPU):
    python -m experiments.text --config=experiments/configs/text.py:full \
        --config.norm=layer --workdir=runs/text_full_ln

Any UTF-8 file instead of tiny_shakespeare: --config.text_file=PATH.
"""

import ml_collections

from experiments.configs import select


def base() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Corpus: TFDS tiny_shakespeare from data_dir (None: $TFDS_DATA_DIR, else
    # TFDS's default; our machines: ../shared/tfds), or text_file (a UTF-8 file,
    # its last validation_fraction held out).
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.download = True
    config.text_file = ml_collections.FieldReference(None, field_type=str)
    config.validation_fraction = 0.1
    # 'byte' | 'char' | 'bpe' (trained on the training split, vocab_size tokens).
    config.tokenizer = "char"
    config.vocab_size = 1024
    config.norm = "layer"
    config.norm_kwargs = ml_collections.ConfigDict()
    # Running-statistics momentum of the norms that keep them (None: default).
    config.norm_momentum = ml_collections.FieldReference(None, field_type=float)
    # Causal mode of batch statistics: 'cumulative' (over batch and positions
    # <= t), 'per_position', 'running', or 'off' (leaks the future; for
    # demonstrations only).
    config.causal = "cumulative"
    config.num_layers = 4
    config.num_heads = 4
    config.d_model = 128
    config.max_len = 64
    config.mlp_ratio = 4
    config.dropout_rate = 0.0
    config.tie_embeddings = True
    config.batch_size = 16
    config.num_steps = 1000
    config.optimizer = "adamw"
    config.learning_rate = 2e-3
    config.b1 = 0.9
    config.b2 = 0.99
    config.weight_decay = 0.1
    config.grad_clip = 1.0
    config.schedule = "cosine"
    config.warmup_steps = 100
    config.warmup_from = 0.0
    config.final_lr_fraction = 0.1
    # Evaluation: the whole validation split, windows of max_len advanced by
    # eval_stride (None: max_len // 2), every token scored once.
    config.eval_stride = ml_collections.FieldReference(None, field_type=int)
    config.eval_batch_size = 64
    # Statistics sources evaluated: 'running' (population statistics kept while
    # training; the first is reported as val_loss), 'precise' (recomputed over
    # precise_batches training batches), 'batch' (each evaluation batch's own
    # causal statistics, as in training: batches of batch_eval_batch_size
    # windows, None = the training batch size, lying far apart in the text);
    # also 'example_weighted' (each window by 1/batch_size of its own causal
    # statistics mixed with the population's; see normjax.calibrate).
    config.eval_sources = ("running", "precise", "batch")
    config.precise_batches = 50
    config.batch_eval_batch_size = ml_collections.FieldReference(None, field_type=int)
    config.eval_every = 0
    config.log_every = 50
    config.checkpoint_every = 500
    config.keep_checkpoints = 2
    # The generated sample written at the end (sample.txt).
    config.sample_prompt = "\n"
    config.sample_tokens = 300
    config.sample_temperature = 0.8
    config.progress = True
    # TensorBoard event files in WORKDIR/tensorboard, beside metrics.jsonl
    # (live curves: tensorboard --logdir runs/).
    config.tensorboard = True
    # A workdir holding a run with another configuration: 'auto' refuses it,
    # 'force' continues it anyway.
    config.resume = "auto"
    return config


def quick() -> ml_collections.ConfigDict:
    """4 layers, d=128, context 64: char-level layer norm reaches <= 1.55 nats per
    character over the whole validation split in under 10 minutes on 2 cores."""
    config = base()
    config.batch_size = 32
    config.num_steps = 2300
    return config


def full() -> ml_collections.ConfigDict:
    """nanoGPT's shakespeare_char: 6 layers, 6 heads, d=384, context 256, batch
    64, dropout 0.2, AdamW 1e-3 for 5000 steps (for a GPU)."""
    config = base()
    config.num_layers = 6
    config.num_heads = 6
    config.d_model = 384
    config.max_len = 256
    config.dropout_rate = 0.2
    config.batch_size = 64
    config.num_steps = 5000
    config.learning_rate = 1e-3
    config.warmup_steps = 100
    config.final_lr_fraction = 0.1
    config.eval_batch_size = 128
    config.eval_every = 500
    config.checkpoint_every = 500
    config.sample_tokens = 500
    return config


def tiny() -> ml_collections.ConfigDict:
    """A few steps of a tiny model: tests and smoke runs."""
    config = base()
    config.num_layers = 1
    config.num_heads = 2
    config.d_model = 16
    config.max_len = 16
    config.batch_size = 4
    config.num_steps = 6
    config.warmup_steps = 2
    config.vocab_size = 300
    config.eval_batch_size = 256
    config.precise_batches = 4
    config.log_every = 2
    config.checkpoint_every = 2
    config.sample_tokens = 20
    config.progress = False
    return config


PRESETS = {"quick": quick, "full": full, "tiny": tiny}

# The main keys, one line each (``--help``).
KEYS = {
    "norm": "registered norm name (layer, rms, batch, bln, power, ...)",
    "norm_kwargs": "options of the norm: --config.norm_kwargs.NAME=VALUE",
    "causal": "batch statistics: cumulative, per_position, running or off",
    "tokenizer": "'byte', 'char' or 'bpe' (trained on the training split)",
    "vocab_size": "BPE vocabulary size",
    "data_dir": "TFDS data directory (None: $TFDS_DATA_DIR, else TFDS's default)",
    "text_file": "a UTF-8 file instead of tiny_shakespeare",
    "max_len": "context length",
    "batch_size": "training batch size (sequences)",
    "num_steps": "training steps",
    "learning_rate": "peak learning rate (AdamW)",
    "eval_sources": "statistics sources evaluated: running, precise, batch, ...",
    "seed": "random seed",
    "tensorboard": "write TensorBoard event files into WORKDIR/tensorboard",
    "resume": "'auto' refuses a workdir of another configuration, 'force' resumes",
}


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    return select(PRESETS, preset)
