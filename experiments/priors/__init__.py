r"""The priors study: what do batch statistics give a network that per-sample
statistics don't?

    python -m experiments.priors --config=experiments/configs/priors.py:quick \
        --config.data_dir=../shared/tfds --workdir=runs/priors [--config.parts=probe]

The hypothesis: batch statistics give each sample a prior — how far it sits from
the typical sample — and samples of one class deviate from the population in
similar ways; per-sample norms discard that; a tokenizer supplies global
statistics to text models in another way. Parts (``config.parts``, comma
separated; every table is mean ± std over ``config.seeds``):

1. ``probe`` — CIFAR-10, a model per norm, each evaluated on the test set with
   statistics from: running averages; precise statistics recomputed over training
   images; the current batch, for random batches of each size in
   ``probe_batch_sizes``; class-homogeneous batches; class-skewed batches. The
   per-sample norms' rows must not move (a built-in sanity check, recorded as the
   largest logit change against running statistics).
2. ``stats`` — at every norm layer of those models, each sample's per-channel
   mean and standard deviation of the norm's input, and a logistic regression on
   them alone (train split -> test split), against chance (10 %).
3. ``sweep`` — each norm trained at each batch size (learning rate scaled with the
   batch size, same epochs), evaluated with running and with precise statistics
   (4. is the gap between the two).
5. ``text`` — tokenizers x norms (validation bits per byte), a context-length
   sweep, and small-batch text runs for the headline.
6. The headline table: batch vs layer/group vs prior, CIFAR and text, at large
   and small batch.

Resumable: every run lives in ``WORKDIR/runs/<name>/``; a finished run (its
results file exists) is skipped and a killed one resumes from its checkpoint.
``results.json``, ``results.md`` and the PNG plots are rebuilt from whatever runs
exist, so the study can be run in parts across sessions. Several processes may
work on one workdir at once (the same command started again, e.g. one per core
or per GPU): each run is locked by the process running it and skipped by the
others; ``--config.parts=`` afterwards rebuilds the tables from every run.

Modules: :mod:`~experiments.priors.runs` (run directories, locks, records),
:mod:`~experiments.priors.cifar_eval` (evaluation per statistics source; the
CIFAR runs), :mod:`~experiments.priors.probe` (the statistics probe),
:mod:`~experiments.priors.text` (the text parts), :mod:`~experiments.priors.report`
(results.md) and :mod:`~experiments.priors.plots`; :mod:`~experiments.priors.study`
runs them.
"""

from experiments.priors.plots import PLOTS, write_plots
from experiments.priors.probe import fit_linear_probe, norm_input_statistics
from experiments.priors.report import mean_std, write_markdown
from experiments.priors.runs import PARTS
from experiments.priors.study import main, run_study

__all__ = [
    "PARTS",
    "PLOTS",
    "fit_linear_probe",
    "main",
    "mean_std",
    "norm_input_statistics",
    "run_study",
    "write_markdown",
    "write_plots",
]
