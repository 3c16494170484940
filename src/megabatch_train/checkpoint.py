"""Checkpoints that resume a run exactly: the same loss curve as if it had never stopped.

A checkpoint (`<output>/checkpoints/step_000123.pt`, written by rank 0) holds the completed step,
the config, model / optimizer / scheduler state, the tokenizer, the evaluation history, the count
of skipped non-finite steps, and for every rank its RNG states (python, numpy, torch CPU and CUDA)
and its data stream's position. Synthetic and digits streams are addressed by (seed, step, index),
so the step is their position; file streams add their own state.

The files -- written atomically, loaded safely, the newest usable one found -- are checkpoint_files.py's;
whether a checkpoint belongs to the run being started (settings compared, data files fingerprinted)
is run_identity.py's. Both are used through this module.
"""
from __future__ import annotations

from .checkpoint_files import (CheckpointError, checkpoint_path, checkpoints, fit_optimizer_shapes, fit_scalar_shapes,
                               gathered, latest, load, load_latest, read, remove_stale_temps, rng_state, save,
                               set_rng_state)
from .run_identity import (FITTED, HASH_LIMIT, RESUMABLE, check_same_run, data_changes, data_files, differences,
                           fitted_fields, flag_of, resume_config, saved_configs)

__all__ = ["FITTED", "HASH_LIMIT", "RESUMABLE", "CheckpointError", "check_same_run", "checkpoint_path", "checkpoints",
           "data_changes", "data_files", "differences", "fit_optimizer_shapes", "fit_scalar_shapes", "fitted_fields",
           "flag_of", "gathered", "latest", "load", "load_latest", "read", "remove_stale_temps", "resume_config",
           "rng_state", "save", "saved_configs", "set_rng_state"]
