"""A run's configuration: `sections.py` holds the typed, validated `TrainConfig` and its presets; `flags.py`
turns `megabatch train`'s command line into one. Standard library only, so `--help` and usage errors come
before torch loads."""
