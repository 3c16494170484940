"""The run's plan: every decision the config and the runtime settle, taken once.

make_plan turns the validated config and the runtime (world, device) into a frozen RunPlan: the
loss and its arguments, DDP or FSDP, the concrete strategy ("auto" resolved here), positives,
centring, the logit bias's start, and the step's sizes and cadences. The training loop reads the
plan, never the config's fields, so a decision cannot be taken twice, two ways. The plan is made
from the fitted config (build._fit settles the image size and context length first) and is frozen.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import megabatch as mb
from megabatch.strategies import planned

from ..config.sections import TrainConfig
from .health import balanced_bias
from .runtime import Runtime

_COLLECTIVES = {"auto": "the cost model's pick at the first step", "ring": "send/recv around the ring",
                "gather": "all_gather", "local": "no collective", "hierarchical": "send/recv between nodes, all_gather within each"}


@dataclass(frozen=True)
class RunPlan:
    config: TrainConfig  # the run's (fitted) config, as checkpoints and config.json record it
    loss: str  # "clip" or "siglip"
    loss_fn: Callable[..., torch.Tensor]  # the library's loss with its strategy and backend bound
    siglip: bool  # the loss takes (scale, bias), not (scale,)
    strategy: str  # concrete: ring, gather or local
    fsdp: bool  # FSDP2 shards the model; else DDP averages the gradients (on several ranks)
    ddp: bool
    positives: str  # index, caption or id
    centred: bool  # the towers subtract their batch mean embedding
    bias_init: Optional[float]  # a fresh SigLIP model's logit bias, None when the loss has none
    balance_bias: bool  # step 0 balances the fresh bias on the first batch (no --logit-bias-init)
    dtype: torch.dtype  # the features' dtype
    bf16: bool  # autocast to bf16
    steps: int
    warmup_steps: int
    batch_size: int  # global
    local_batch: int  # this rank's share
    micro_batch_size: int
    log_every: int
    eval_every: int
    ckpt_every: int
    max_bad_steps: int
    output: Path
    data: str
    progress: bool
    image_size: int  # fitted to the data and model before the plan is made (build._fit)
    context_length: int

    def collectives(self, world: int) -> str:
        """What a step waits on other ranks for, for a CollectiveError's message."""
        grads = "FSDP's parameter all_gathers and gradient reduce_scatter" if self.fsdp else "DDP's gradient all_reduce"
        return f"the {self.loss} loss (strategy {self.strategy}: {_COLLECTIVES[self.strategy]}) and {grads}"


def make_plan(cfg: TrainConfig, rt: Runtime) -> RunPlan:
    """The plan of `cfg` (validated) on `rt`."""
    siglip = cfg.loss == "siglip"
    strategy = planned(cfg.strategy, rt.world)
    loss_fn = functools.partial(mb.siglip_loss if siglip else mb.clip_loss, strategy=strategy, backend=cfg.backend)
    bias = cfg.logit_bias_init if cfg.logit_bias_init is not None else balanced_bias(cfg.batch_size)
    return RunPlan(
        config=cfg, loss=cfg.loss, loss_fn=loss_fn, siglip=siglip, strategy=strategy, fsdp=cfg.fsdp,
        ddp=rt.world > 1 and not cfg.fsdp, positives=cfg.resolved_positives(), centred=cfg.model.centred(cfg.loss),
        bias_init=bias if siglip else None, balance_bias=siglip and cfg.logit_bias_init is None,
        dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32, bf16=cfg.precision == "bf16",
        steps=cfg.steps, warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size,
        local_batch=cfg.batch_size // rt.world, micro_batch_size=cfg.micro_batch_size, log_every=cfg.log_every,
        eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every, max_bad_steps=cfg.max_bad_steps,
        output=Path(cfg.output), data=cfg.data, progress=cfg.progress,
        image_size=cfg.model.image_size, context_length=cfg.model.context_length)
