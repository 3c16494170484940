"""Building a run's parts: the checkpoint it continues from, the plan, data, model, optimizer.

`prepare` does everything before the first step: it checks the output folder, chooses the
checkpoint (rank 0 decides, every rank loads the same file), takes the run's decisions once
(plan.make_plan) on the config fitted to its data and model (`_fit`: image size, context length), builds
or restores the parts, and records the fitted config (config.json).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.sections import TEXT_DATA, TrainConfig
from ..data.sources import build_data, build_eval
from ..data.tokenizer import Tokenizer, tokenizer_for
from ..data.types import DataError
from ..evaluation import outputs
from ..evaluation.evaluate import zero_shot_model
from ..models import hf_model
from ..models.towers import ContrastiveModel, TextPairModel
from . import checkpoint, fsdp, identity
from .plan import RunPlan, make_plan
from .runtime import Runtime, collective, restart_count


class Normalized(nn.Module):
    """One tower of `model` (encode_image or encode_text), L2-normalised, in the features' dtype
    (bf16 under --precision bf16, where autocast may leave one tower's output in fp32)."""

    def __init__(self, model: nn.Module, method: str, dtype: torch.dtype):
        super().__init__()
        self.model, self.method, self.dtype = model, method, dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(getattr(self.model, self.method)(x), dim=-1).to(self.dtype)


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on gains, biases and the logit scale/bias (tensors of < 2 dims)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


@dataclass
class Parts:
    """What a run is built from (fresh, or restored from a checkpoint)."""

    model: nn.Module
    tokenizer: Any
    stream: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start: int
    evals: list[dict[str, Any]]
    skipped: int = 0  # non-finite steps skipped so far (all attempts)
    given: dict[str, Any] = field(default_factory=dict)  # the config as given, before _fit fitted it
    files: dict[str, Any] = field(default_factory=dict)  # the data files' fingerprints (rank 0)
    saves: outputs.Saves = field(default_factory=outputs.Saves)  # checkpoints written / failed (rank 0)
    eval_data: Any = None  # the held-out set (rank 0; every rank with --fsdp)


def prepare(cfg: TrainConfig, rt: Runtime, model: Optional[nn.Module],
            tokenizer: Any) -> tuple[RunPlan, Optional[Parts], dict[str, Any]]:
    """(plan, parts, {}) for a run to train; (plan, None, final evaluation) for a finished run run again."""
    given = cfg.to_dict()
    if cfg.batch_size % rt.world:
        raise ValueError(f"--batch-size ({cfg.batch_size}) must be divisible by the number of ranks ({rt.world})")
    if cfg.fsdp and fsdp.unusable(rt.world):
        raise ValueError(fsdp.unusable(rt.world))
    with collective("checking --output (broadcast from rank 0)", rt):
        outputs.check(cfg.output, rt.rank, rt.world)  # before any work: an OutputError on every rank
    files = identity.data_files(cfg) if rt.rank == 0 else {}
    chosen = _choose_checkpoint(cfg, rt, files)
    if chosen and chosen[1]["step"] >= cfg.steps:  # a finished run, run again: nothing to train
        if rt.rank == 0:
            print(outputs.describe_complete(cfg.output, chosen[1], chosen[0], cfg.steps), flush=True)
        return make_plan(cfg, rt), None, (chosen[1].get("evals") or [{}])[-1] if rt.rank == 0 else {}
    fit = _fit(cfg, rt, model, tokenizer, chosen[1] if chosen else None)
    cfg = fit.config
    plan = make_plan(cfg, rt)  # every decision, on the fitted config; nothing changes it afterwards
    p = _build(cfg, plan, rt, fit, chosen)
    p.given, p.files = given, files
    if rt.rank == 0:
        outputs.write_text(plan.output / "config.json", json.dumps(cfg.to_dict(), indent=2))
    # Rank 0 evaluates; with --fsdp every rank runs the evaluation's (collective) forwards with it.
    if rt.rank == 0 or plan.fsdp:
        p.eval_data = build_eval(cfg.data_section(), p.stream, plan.image_size, cfg.seed)
        if rt.rank == 0 and p.eval_data is not None and p.eval_data.queries is not None:
            p.eval_data.reference = zero_shot_model(p.eval_data, plan.context_length, rt.device)  # once a run
    return plan, p, {}


@dataclass
class Fitted:
    """What fitting a run to its data and model settled (`_fit`): the config with its image size and
    context length fitted, and the parts fitting them needed."""

    config: TrainConfig
    stream: Any
    model: Optional[nn.Module]  # a Hugging Face model (built with its tokenizer), the caller's, or None
    tokenizer: Any


def _fit(cfg: TrainConfig, rt: Runtime, model: Optional[nn.Module], tokenizer: Any,
         saved: Optional[dict[str, Any]]) -> Fitted:
    """Fit the image size and context length: restored from a checkpoint (`saved`; identity.FITTED), the
    image size a Hugging Face model takes, the context length the tokenizer fitted to the training
    captions (0, the csv/wds default). Returns a new config; `cfg` stays as given."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    hf = model is None and hf_model.is_hf(cfg.model.source)
    sizes: dict[str, Any] = {}
    if saved:  # what the saved run fitted is restored, not fitted again
        ran = identity.saved_configs(saved)[1]
        sizes = {name: getattr(ran.model, name) for name in identity.fitted_fields(cfg)}
    elif hf:
        sizes = {"image_size": hf_model.image_size(cfg.model.source)}  # the data renders at the model's size
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **sizes))
    # a pretrained model's image processor decides its pixels (read again from the folder on resume)
    pixels = hf_model.pixels(cfg.model.source, announce=rt.rank == 0) if hf else None
    try:
        stream = build_data(cfg.data_section(), cfg.model.image_size, cfg.seed, rt.rank, rt.world,
                            device=rt.device, pixels=pixels)
    except ValueError as e:
        if not hf:
            raise
        raise DataError(f"--model {cfg.model.source} takes {cfg.model.image_size}-pixel images: {e}") from e
    if hf:
        def app_tokenizer(s: Any) -> Any:
            inner = (saved or {}).get("tokenizer") or {}
            return (Tokenizer.from_state_dict(inner["inner"]) if inner.get("inner")
                    else tokenizer_for(cfg.model.context_length, s, "builtin"))

        model, hf_tokenizer = hf_model.build(cfg.model.source, cfg.model.tokenizer, cfg.model.context_length, stream,
                                             cfg.loss, app_tokenizer, pixels)
        tokenizer = tokenizer or hf_tokenizer
    if tokenizer is None:
        tokenizer = (Tokenizer.from_state_dict(saved["tokenizer"]) if saved
                     else tokenizer_for(cfg.model.context_length, stream, cfg.model.text_tower))
    # 0 (the csv/wds default) is fitted to the training captions by the tokenizer
    context = getattr(tokenizer, "context_length", cfg.model.context_length)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, context_length=context))
    return Fitted(cfg, stream, model, tokenizer)


def _choose_checkpoint(cfg: TrainConfig, rt: Runtime, files: dict[str, Any]) -> Optional[tuple[Path, dict[str, Any]]]:
    """The checkpoint this run continues from (path, payload): rank 0 decides, every rank loads the same file.

    `--resume PATH` names it; otherwise the newest loadable checkpoint in OUTPUT/checkpoints whose
    settings as given match `cfg`'s (a mismatch is a CheckpointError), unless `--fresh` deletes
    them on the first attempt. Rank 0 also deletes temp files an interrupted save left behind, and
    warns when the data files (`files`, now) differ from the checkpoint's.
    """
    decision: list[Any] = [None]
    if rt.rank == 0:
        try:
            decision[0] = ("ok", decide_resume(cfg, files))
        except (checkpoint.CheckpointError, FileNotFoundError) as e:
            decision[0] = ("error", str(e))
    if rt.world > 1:
        with collective("choosing the checkpoint (broadcast from rank 0)", rt):
            dist.broadcast_object_list(decision, src=0)
    status, path = decision[0]
    if status == "error":
        raise checkpoint.CheckpointError(path)
    return (Path(path), checkpoint.read(Path(path))) if path else None


def decide_resume(cfg: TrainConfig, files: dict[str, Any]) -> Optional[str]:
    folder = Path(cfg.output) / "checkpoints"
    for stale in checkpoint.remove_stale_temps(folder):
        print(f"megabatch train: deleted {stale.name}, left by an interrupted checkpoint save", flush=True)
    if cfg.resume:
        path, payload = checkpoint.load_latest(cfg.resume)
        if payload["step"] < cfg.steps:
            print(f"megabatch train: resuming from {path} (step {payload['step']}, --resume)", flush=True)
    else:
        found = checkpoint.checkpoints(folder)
        if cfg.fresh and restart_count() == 0:
            for old in found:
                old.unlink()
            if found:
                print(f"megabatch train: --fresh: deleted {len(found)} checkpoint(s) of the previous run in {folder}",
                      flush=True)
            return None
        if not found:
            return None
        path, payload = checkpoint.load_latest(folder)
        identity.check_same_run(payload, cfg, path, len(found))
        if payload["step"] < cfg.steps:
            print(f"megabatch train: resuming from {path} (step {payload['step']}): {cfg.output} holds this run's "
                  f"checkpoints (attempt {restart_count()}; --output NEW_DIR starts another run)", flush=True)
    if payload["step"] < cfg.steps:
        for change in identity.data_changes(payload.get("data_files") or {}, files):
            warnings.warn(f"resuming {path.name} on data that changed since it was saved: {change}; the run goes "
                          "on with the files as they are now (the stream's position may not match them)",
                          stacklevel=2)
    return str(path)


def _build(cfg: TrainConfig, plan: RunPlan, rt: Runtime, fit: Fitted,
           chosen: Optional[tuple[Path, dict[str, Any]]]) -> Parts:
    """The model, optimizer and scheduler of the fitted `cfg`, restored from `chosen` when it resumes."""
    saved = chosen[1] if chosen else None
    stream, model, tokenizer = fit.stream, fit.model, fit.tokenizer
    if hasattr(stream, "set_tokenizer"):  # text-text data: its queries are token ids of the run's tokenizer
        stream.set_tokenizer(tokenizer)
    if model is None:
        two_texts = cfg.data in TEXT_DATA
        model = (TextPairModel if two_texts else ContrastiveModel)(cfg.model, tokenizer.vocab_size, plan.loss)
    _init_logit_bias(plan, model)
    model.to(rt.device).train()
    if saved:  # before sharding: every rank loads the full state, fully_shard keeps its rows
        model.load_state_dict(checkpoint.fit_scalar_shapes(saved["model"], model.state_dict()))
    if plan.fsdp:
        fsdp.shard(model, rt.device, rt.world)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup_steps, cfg.steps))
    parts = Parts(model, tokenizer, stream, optimizer, scheduler, 0, [])
    if chosen:
        parts.saves = outputs.Saves(chosen[0], saved["step"])
    if saved:
        state = checkpoint.fit_optimizer_shapes(saved["optimizer"], [q for g in optimizer.param_groups
                                                                     for q in g["params"]])
        if plan.fsdp:
            fsdp.load_optimizer_state(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)
        scheduler.load_state_dict(saved["scheduler"])
        parts.start, parts.evals, parts.skipped = saved["step"], saved["evals"], saved.get("skipped_steps", 0)
        if len(saved["rng"]) == rt.world:
            checkpoint.set_rng_state(saved["rng"][rt.rank])
            if saved["data"][rt.rank] and hasattr(stream, "load_state_dict"):
                stream.load_state_dict(saved["data"][rt.rank])
        elif rt.rank == 0:
            warnings.warn(f"resuming a {len(saved['rng'])}-rank run on {rt.world} rank(s): weights and optimizer "
                          "are restored, but RNG and file-stream positions are not, so the curve may differ")
    return parts


def _init_logit_bias(plan: RunPlan, model: nn.Module) -> None:
    """A fresh SigLIP run's bias: plan.bias_init (--logit-bias-init, else -ln(B - 1) for the global batch B
    until the first step balances it on the first batch: step.balance_bias; health.py says why)."""
    bias = getattr(model, "logit_bias", None)
    if plan.bias_init is not None and isinstance(bias, Tensor) and not getattr(model, "pretrained", False):
        with torch.no_grad():
            bias.fill_(plan.bias_init)
