"""`make experiment`: the memory experiment (`moshi_ttt.experiments.memory_experiment`), run from the repository."""

from moshi_ttt.experiments.memory_experiment import main

if __name__ == "__main__":
    main()
