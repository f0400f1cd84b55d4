"""``python -m experiments.priors --config=...:quick --workdir=...``."""

from experiments.priors.study import main

if __name__ == "__main__":
    main()
