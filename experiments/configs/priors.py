r"""The priors study: per-sample vs batch statistics, measured.

  smoke (tests, seconds per run):
    python -m experiments.priors --config=experiments/configs/priors.py:smoke \
        --config.data_dir=../shared/tfds --workdir=runs/priors_smoke
  quick (2-core CPU, each run 1-3 minutes; resumable, run it in parts):
    python -m experiments.priors --config=experiments/configs/priors.py:quick \
        --config.data_dir=../shared/tfds --workdir=runs/priors --config.parts=probe
  full (GPU-sized models and schedules):
    python -m experiments.priors --config=experiments/configs/priors.py:full \
        --workdir=runs/priors_full
"""

import ml_collections

from experiments.configs import cifar as cifar_configs
from experiments.configs import select
from experiments.configs import text as text_configs

PARTS = (
    "probe",
    "stats",
    "sweep",
    "text",
    "ablation_lr",
    "ablation",
    "ablation_text",
)


def base() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.seeds = (0, 1, 2)
    # Which parts to run now (the others are reported from what is on disk).
    config.parts = ",".join(PARTS)
    # A results.json of this study (e.g. the committed one): its finished text
    # runs are restored into the workdir instead of being run again, provided
    # it was made with the same text configuration (checked; refused if not).
    config.restore_from = ml_collections.FieldReference(None, field_type=str)

    # 1. Statistics-source probe on CIFAR-10: one model per norm and seed.
    config.probe_norms = (
        "batch",
        "batch_renorm",
        "ghost_batch",
        "bln",
        "prior",
        "layer",
        "group",
        "instance",
        "rms",
        "none",
    )
    config.probe_batch_sizes = (2, 8, 32, 256)
    config.class_batch_size = 100  # class-homogeneous and class-skewed batches
    config.skew_fraction = 0.75
    config.precise_images = 10_000  # training images pooled into precise statistics
    config.precise_batch_size = 256

    # 2. Class information in each sample's per-channel input statistics.
    config.stats_train_images = 10_000
    config.stats_steps = 300  # full-batch Adam steps of the logistic regression
    config.stats_l2 = 1e-4

    # 3-4. Batch-size sweep, evaluated with running and precise statistics.
    config.sweep_norms = ("batch", "batch_renorm", "bln", "prior", "layer", "group")
    config.sweep_batch_sizes = (2, 4, 8, 16, 32, 128)
    config.sweep_base_batch_size = 128  # learning rate scaled by B / this
    config.sweep_epochs = 4.0
    config.sweep_train_subset = ml_collections.FieldReference(10_000, field_type=int)

    # 5. Text: norms x tokenizers, and a context-length sweep.
    config.text_norms = (
        "layer",
        "rms",
        "batch",
        "batch:per_position",
        "bln",
        "power",
        "prior",
    )
    config.text_tokenizers = ("byte", "bpe")
    config.context_norms = ("layer", "batch", "bln")
    config.context_lengths = (64, 128, 256)
    # The context sweep runs twice: at the text preset's batch size, and at this
    # many tokens per step (batch size tokens // L), so that a longer context
    # is not also more tokens per step.
    config.context_tokens_per_step = 2048
    config.text_small_batch_size = 4  # the headline's small-batch text runs
    config.headline_small_batch = 8  # the headline's small-batch CIFAR column

    # 7. The ablation: batch norm taken apart (experiments.priors.ablation).
    # Part ablation_lr: each row's learning rate from this grid, by accuracy on
    # ablation_holdout training images held out, at the short budget; part
    # ablation: every row at each budget (epochs) and seed, batch
    # ablation_batch_size, and the small-batch rows at ablation_small_batch.
    config.ablation_rows = (
        "batch",
        "ghost4",
        "ghost16",
        "ghost64",
        "renorm_free",
        "population",
        "reference",
        "online",
        "mix",
        "batch_group",
        "instance",
        "group8",
        "layer_chw",
        "layer_pixel",
        "none",
        "none_wn",
        "prior",
    )
    config.ablation_learning_rates = (0.2, 0.4, 0.8)
    # A row whose best rate is at an edge of that grid gets up to this many more
    # rates past the edge (continuing the grid's ratio), one at a time.
    config.ablation_lr_extend = 2
    config.ablation_holdout = 5000
    config.ablation_lr_seed = 0
    config.ablation_budgets = ml_collections.ConfigDict({"short": 2.0, "long": 6.0})
    config.ablation_batch_size = 256
    config.ablation_small_batch = 8
    config.ablation_small_batch_rows = (
        "batch",
        "ghost4",
        "online",
        "mix",
        "reference",
        "group8",
    )
    config.ablation_small_batch_budgets = ("short",)
    config.ablation_train_subset = ml_collections.FieldReference(None, field_type=int)
    # Steps of batch norm before the population rows (renorm_free: r, d
    # unclipped; population) train on population statistics.
    config.ablation_population_warmup = 100
    config.ablation_single_images = 64  # evaluated one at a time as a check
    # 8. The text ablation (part ablation_text; experiments.priors.ablation_text)
    # at each of context_lengths, context_tokens_per_step tokens per step.
    config.ablation_text_norms = ("layer", "batch", "batch:running", "prior", "mix")
    config.ablation_text_reference = 15  # training windows in the reference batch

    config.cifar = cifar_configs.quick()
    config.text = text_configs.quick()
    return config


def _study_cifar(cifar: ml_collections.ConfigDict) -> None:
    """What every CIFAR run of the study shares: no test-time extras during
    training (the study evaluates the trained models itself)."""
    cifar.eval_sources = ("running",)
    cifar.flip_test = False
    cifar.progress = False


def quick() -> ml_collections.ConfigDict:
    """Every run 1-3 minutes on 2 CPU cores."""
    config = base()
    config.cifar = cifar_configs.quick()
    config.cifar.num_epochs = 2.0
    _study_cifar(config.cifar)
    config.text = text_configs.quick()
    config.text.num_steps = 800
    config.text.progress = False
    config.text.sample_tokens = 100
    return config


def full() -> ml_collections.ConfigDict:
    """ResNet-20 and nanoGPT-sized text runs (for a GPU)."""
    config = base()
    config.cifar = cifar_configs.full()
    _study_cifar(config.cifar)
    config.sweep_train_subset = None
    config.sweep_epochs = 30.0
    config.precise_images = 50_000
    config.stats_train_images = 50_000
    config.text = text_configs.full()
    config.context_lengths = (256, 1024, 4096)
    config.context_tokens_per_step = 64 * 256
    config.ablation_learning_rates = (0.05, 0.1, 0.2, 0.4)
    config.ablation_budgets = ml_collections.ConfigDict({"short": 30.0, "long": 160.0})
    config.ablation_small_batch_budgets = ("short", "long")
    config.ablation_population_warmup = 2000
    return config


def smoke() -> ml_collections.ConfigDict:
    """Tiny models, a few steps, subsets: the whole study in about a minute."""
    config = base()
    config.seeds = (0,)
    config.cifar = cifar_configs.tiny()
    _study_cifar(config.cifar)
    config.cifar.test_subset = 200
    config.cifar.eval_batch_size = 200
    config.probe_norms = ("batch", "layer")
    config.probe_batch_sizes = (2, 8)
    config.class_batch_size = 10
    config.precise_images = 128
    config.precise_batch_size = 32
    config.stats_train_images = 256
    config.stats_steps = 50
    config.sweep_norms = ("batch", "layer")
    config.sweep_batch_sizes = (4, 16)
    config.sweep_base_batch_size = 16
    config.sweep_epochs = 0.25
    config.sweep_train_subset = 256
    config.text = text_configs.tiny()
    config.text.vocab_size = 260
    config.text_norms = ("layer", "batch")
    # BPE runs end to end in tests/test_experiments_text.py; one tokenizer here
    config.text_tokenizers = ("byte",)
    config.context_norms = ("batch",)
    config.context_lengths = (8, 16)  # 16: the tokenizer runs' own length
    config.context_tokens_per_step = 16  # B = 2 at L = 8, 1 at L = 16
    config.text_small_batch_size = 2
    config.headline_small_batch = 4
    config.ablation_rows = ("batch", "layer_chw", "mix", "none_wn")
    config.ablation_learning_rates = (0.1, 0.4)
    config.ablation_lr_extend = 0
    config.ablation_holdout = 100
    config.ablation_batch_size = 32
    config.ablation_train_subset = 356  # 256 after the held-out 100
    config.ablation_budgets = ml_collections.ConfigDict({"short": 0.25, "long": 0.5})
    config.ablation_small_batch_rows = ("batch", "mix")
    config.ablation_population_warmup = 2
    config.ablation_single_images = 8
    config.ablation_text_norms = ("layer", "batch", "prior")
    config.ablation_text_reference = 3
    return config


PRESETS = {"quick": quick, "full": full, "smoke": smoke}

# The main keys, one line each (``--help``).
KEYS = {
    "parts": "parts to run now (the rest is read from disk); empty: rebuild only",
    "data_dir": "TFDS data directory holding cifar10 and tiny_shakespeare",
    "seeds": "seeds of every run (tables: mean, std, paired differences)",
    "probe_norms": "norms of the statistics-source probe (parts probe, stats)",
    "sweep_norms": "norms of the batch-size sweep",
    "sweep_batch_sizes": "batch sizes of the sweep",
    "text_norms": "norms (NAME or NAME:CAUSAL) of the text comparison",
    "context_lengths": "context lengths of the text context sweep",
    "restore_from": "a results.json whose finished text runs are restored",
    "ablation_rows": "rows of the ablation (parts ablation_lr, ablation)",
    "ablation_budgets": "the ablation's short and long budgets, in epochs",
    "ablation_text_norms": "rows of the text ablation (part ablation_text)",
    "cifar.num_epochs": "epochs of each CIFAR run (every cifar.* key applies)",
    "text.num_steps": "steps of each text run (every text.* key applies)",
}


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    return select(PRESETS, preset)
