r"""CIFAR-10 with any norm.

  quick (this 2-core CPU, <= 10 minutes):
    python -m experiments.cifar --config=experiments/configs/cifar.py:quick \
        --config.norm=layer --workdir=runs/cifar_ln
  full (ResNet-20 as in He et al. 2016, for a GPU):
    python -m experiments.cifar --config=experiments/configs/cifar.py:full \
        --config.norm=batch --workdir=runs/cifar_resnet20_bn
"""

import ml_collections

from experiments.configs import select


def base() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # None: $TFDS_DATA_DIR, else TFDS's default directory (downloaded there when
    # absent and ``download`` is True). Our machines: ../shared/tfds.
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.download = True
    # Decoded images are cached here (None: $NORMJAX_CACHE_DIR, else
    # ~/.cache/normjax), never in data_dir.
    config.cache_dir = ml_collections.FieldReference(None, field_type=str)
    config.train_subset = ml_collections.FieldReference(None, field_type=int)
    # Hold out this many training images (a fixed draw) and evaluate on them
    # instead of the test split: for choosing hyperparameters. 0: the test split.
    config.holdout = 0
    config.test_subset = ml_collections.FieldReference(None, field_type=int)
    config.norm = "batch"
    config.norm_kwargs = ml_collections.ConfigDict()
    # Running-statistics momentum (Flax convention), for the norms that keep
    # running statistics; ignored by per-sample norms. None: the norm's default.
    config.norm_momentum = ml_collections.FieldReference(None, field_type=float)
    # Batch statistics are those of the global batch (over every device) unless
    # one of these asks for ghost batches of a given size, or per-device batches.
    config.ghost_batch_size = ml_collections.FieldReference(None, field_type=int)
    config.per_device_batch_stats = False
    # Norms that read a reference batch ('reference'): the model is wrapped in
    # normjax.nn.WithReference with the first this-many training images as R.
    config.reference_size = 32
    config.model = "fast_cnn"
    config.widths = (32, 64, 128)
    config.depth = 20
    config.width = 16
    config.zero_init_residual = False
    # Weight normalization (Salimans & Kingma 2016) on every trained convolution.
    config.weight_norm = False
    # Convolution and max-pool: 'auto' (normjax's CPU-fast ones on the CPU
    # backend, flax.linen's on GPU/TPU), 'fast' or 'flax'.
    config.layers = "auto"
    config.augment = True
    config.label_smoothing = 0.0
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 1.0
    config.num_steps = ml_collections.FieldReference(None, field_type=int)
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 0.0
    config.schedule = "constant"
    config.warmup_steps = 0.0
    config.warmup_from = 0.0
    config.final_lr_fraction = 0.0
    config.vector_lr_scale = 1.0
    config.boundaries = ()
    config.decay_factor = 0.1
    config.log_every = 50
    config.eval_every = 0
    config.checkpoint_every = 500
    config.keep_checkpoints = 2
    # Statistics sources evaluated ('running', 'batch', 'example_weighted':
    # each image by 1/batch_size of its own statistics mixed with the running
    # ones; see normjax.calibrate); the first is reported as test_accuracy.
    config.eval_sources = ("running", "batch")
    config.flip_test = True
    config.progress = True
    # TensorBoard event files in WORKDIR/tensorboard, beside metrics.jsonl
    # (live curves: tensorboard --logdir runs/).
    config.tensorboard = True
    # A workdir holding a run with another configuration: 'auto' refuses it,
    # 'force' continues it anyway.
    config.resume = "auto"
    return config


def quick() -> ml_collections.ConfigDict:
    """FastCNN sized for 2 CPU cores: 7 epochs in about 7-8 minutes, with
    airbench's recipe (Nesterov SGD, label smoothing 0.2, warm-up then linear
    decay, a 16x learning rate on biases and norm parameters)."""
    config = base()
    config.model = "fast_cnn"
    config.widths = (32, 64, 128)
    config.batch_size = 256
    config.num_epochs = 7.0
    # Short runs: running statistics must follow the last ~10 steps' weights.
    config.norm_momentum = 0.9
    config.optimizer = "sgd"
    config.learning_rate = 0.4
    config.momentum = 0.85
    config.nesterov = True
    config.weight_decay = 2.5e-3
    config.vector_lr_scale = 16.0
    config.label_smoothing = 0.2
    config.schedule = "linear"
    config.warmup_steps = 0.23
    config.warmup_from = 0.2
    config.final_lr_fraction = 0.07
    config.checkpoint_every = 200
    return config


def full() -> ml_collections.ConfigDict:
    """ResNet-20 exactly as He et al. 2016 (64k steps of batch 128), for a GPU."""
    config = base()
    config.model = "resnet"
    config.depth = 20
    config.batch_size = 128
    config.num_steps = 64_000
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.schedule = "piecewise"
    config.boundaries = (32_000, 48_000)
    config.decay_factor = 0.1
    config.eval_every = 2_000
    config.checkpoint_every = 2_000
    config.keep_checkpoints = 3
    return config


def tiny() -> ml_collections.ConfigDict:
    """A few steps on a small subset: tests and smoke runs."""
    config = base()
    config.model = "fast_cnn"
    config.widths = (8, 16, 16)
    config.train_subset = 512
    config.test_subset = 200
    config.batch_size = 32
    config.eval_batch_size = 200
    config.num_steps = 6
    config.log_every = 2
    config.checkpoint_every = 2
    config.progress = False
    return config


PRESETS = {"quick": quick, "full": full, "tiny": tiny}

# The main keys, one line each (``--help``).
KEYS = {
    "norm": "registered norm name (batch, layer, rms, group, online, ...)",
    "norm_kwargs": "options of the norm: --config.norm_kwargs.NAME=VALUE",
    "norm_momentum": "running-statistics momentum of norms that keep them",
    "model": "'fast_cnn' or 'resnet'",
    "data_dir": "TFDS data directory (None: $TFDS_DATA_DIR, else TFDS's default)",
    "batch_size": "training batch size (global, over every device)",
    "num_epochs": "training length in epochs (num_steps, if set, wins)",
    "num_steps": "training length in steps",
    "learning_rate": "peak learning rate",
    "ghost_batch_size": "batch statistics over ghost batches of this size",
    "eval_sources": "statistics sources evaluated: running, batch, example_weighted",
    "seed": "random seed (initialization, data order, augmentation)",
    "tensorboard": "write TensorBoard event files into WORKDIR/tensorboard",
    "resume": "'auto' refuses a workdir of another configuration, 'force' resumes",
}


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    return select(PRESETS, preset)
