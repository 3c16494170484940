"""FSDP2 helpers for the integrations and the app: megabatch._fsdp's, under their public name.

They live below GradCache (megabatch/_fsdp.py), which needs them too and may not import upwards.
"""
from .._fsdp import is_dtensor, is_fsdp, shardable

__all__ = ["is_dtensor", "is_fsdp", "shardable"]
