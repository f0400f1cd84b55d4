"""``python -m experiments.priors --config=...:quick --workdir=...``."""

from experiments import priors
from experiments.priors.study import main

__doc__ = priors.__doc__  # what --help shows first

if __name__ == "__main__":
    main()
