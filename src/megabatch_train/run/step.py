"""The pieces of one training step: the batch, its positives, the non-finite check, the bias's
balance at step 0, the metrics record and health probe, the checkpoint."""
from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config.sections import TrainConfig
from ..data.files.pairs import stable_id
from ..data.sources import state_of
from ..models.towers import Center
from . import checkpoint, fsdp
from .build import Parts
from .health import SIDES, balanced_bias, collapse_warning, embedding_stats, recovery_note
from .plan import RunPlan
from .runtime import Runtime, collective, peak_memory_mb, sum_over_ranks


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the run stops rather than train on garbage."""



def balance_bias(rt: Runtime, model: nn.Module, images: Tensor, tokens: Tensor, batch_size: int) -> None:
    """Step 0 of a fresh SigLIP run without --logit-bias-init and uncentred towers: b = -ln(B - 1) - t * c0,
    with c0 the mean image-text cosine of the towers as initialised (on a probe of each rank's first batch,
    averaged over ranks), so that a row's positive pull and its negatives' push balance at the start."""
    bias = getattr(model, "logit_bias", None)
    if getattr(model, "pretrained", False):
        return  # a pretrained model's bias is its own
    if not isinstance(bias, Tensor) or isinstance(getattr(model, "image_center", None), Center):
        return  # centred towers: the mean pair cosine is ~0 by construction, -ln(B - 1) is balanced
    c0 = sum_over_ranks(embedding_stats(model, images, tokens)["cos_pairs_mean"], rt.world) / rt.world
    value = balanced_bias(batch_size) - math.exp(fsdp.scalar(model.logit_scale)) * c0
    fsdp.at_rest(model)
    with torch.no_grad():
        fsdp.local(model.logit_bias).fill_(value)


def check_health(run: RunPlan | TrainConfig, model: nn.Module, images: Tensor, tokens: Tensor,
                  record: dict[str, Any], warned: list[str], sides: tuple[str, str] = SIDES) -> None:
    """Add the probe's embedding statistics to `record`; warn (once) when they show a collapse. `run` gives the
    steps, warmup steps, loss and global batch (the run's plan, or a config); `sides` what the messages call
    the two sides (the eval data's)."""
    record.update(embedding_stats(model, images, tokens))
    message = collapse_warning(record, record["step"], run.steps, run.warmup_steps, run.loss, run.batch_size,
                               record["logit_scale"], record.get("logit_bias"), sides)
    if message is not None:
        record["collapsed"] = True
        if not warned:
            warned.append(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    elif len(warned) == 1 and record["step"] > run.warmup_steps:  # said once, when it has left the collapse
        note = recovery_note(record, record["step"], sides)
        if note is not None:
            warned.append(note)
            print(f"megabatch train: {note}", file=sys.stderr, flush=True)


def take_batch(stream: Any, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str], Optional[Tensor]]:
    """This rank's pairs of global batch `step`, with the data's per-pair ids where it has them."""
    if hasattr(stream, "batch_with_ids"):
        return stream.batch_with_ids(step, size, start, stop)
    images, captions = stream.batch(step, size, start, stop)
    return images, captions, None


def positive_ids(mode: str, captions: list[str], ids: Optional[Tensor]) -> Optional[Tensor]:
    """The int64 ids that make pairs positive for the loss (the same for images and texts, since
    each pair is one image and its caption), or None for index positives (image i <-> caption i).
    caption: a stable 63-bit hash of the caption, so identical captions anywhere in the global
    batch are positives of each other's images instead of negatives; id: the data's own ids."""
    if mode == "index":
        return None
    if mode == "id":
        if ids is None:
            raise ValueError("--positives id: this data has no per-pair ids (--csv-id-key / --wds-id-key)")
        return ids
    return torch.tensor([stable_id(c) for c in captions], dtype=torch.int64)


def progress_bar(plan: RunPlan, start: int) -> Any:
    if not plan.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=plan.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


@torch.no_grad()
def nonfinite_ranks(loss: Tensor, model: nn.Module, world: int,
                     requests: Sequence[float] = ()) -> tuple[int, float, list[float]]:
    """(ranks whose loss or gradients hold a NaN/inf, the mean of the ranks' losses, `requests` summed
    over ranks): one all_reduce, so every rank takes the same decisions. `requests` are the stop
    flags of preempt.StopRequest.pending(), carried by this all_reduce so that stopping costs nothing."""
    loss = loss.detach().double().reshape(())
    checks = [torch.isfinite(loss)] + [torch.isfinite(fsdp.local(p.grad)).all() for p in model.parameters()
                                       if p.grad is not None]
    bad = (~torch.stack(checks).all()).double()
    t = torch.stack([bad, loss])  # on the loss's device (NCCL needs CUDA tensors); one host sync below
    if requests:
        t = torch.cat([t, torch.tensor(list(requests), dtype=t.dtype).to(t.device)])
    if world > 1:
        dist.all_reduce(t)
    n_bad, total, *asked = t.tolist()
    return int(n_bad), total / world, asked



@torch.no_grad()
def record_step(plan: RunPlan, rt: Runtime, p: Parts, step: int, loss: Tensor, samples_per_s: float,
            elapsed: float) -> dict[str, Any]:
    """One metrics.jsonl line: the global loss (mean of the ranks'), temperature, lr, throughput
    (all ranks), peak memory (rank 0: CUDA max allocated, or the process's peak RSS on CPU)."""
    model = p.model
    record = {"step": step, "loss": sum_over_ranks(loss, rt.world) / rt.world,
              "logit_scale": math.exp(fsdp.scalar(model.logit_scale)), "lr": p.scheduler.get_last_lr()[0],
              "samples_per_s": samples_per_s, "peak_mem_mb": peak_memory_mb(rt.device), "elapsed_s": elapsed,
              "skipped_steps": p.skipped}
    if plan.siglip:
        record["logit_bias"] = fsdp.scalar(model.logit_bias)
    if hasattr(p.stream, "skipped"):
        record["data_skipped"] = int(sum_over_ranks(float(p.stream.skipped), rt.world))
    return record


def save_checkpoint(plan: RunPlan, rt: Runtime, step: int, p: Parts) -> None:
    with collective(f"step {step}: the checkpoint's all_gather_object of RNG and data states", rt):
        rngs = checkpoint.gathered(checkpoint.rng_state(), rt.world)
        data = checkpoint.gathered(state_of(p.stream), rt.world)
    if plan.fsdp:  # gathered to rank 0's CPU, in the unsharded format (loads with or without --fsdp)
        with collective(f"step {step}: the checkpoint's gather of the sharded state", rt):
            model_state = fsdp.full_model_state(p.model)
            optimizer_state = fsdp.full_optimizer_state(p.model, p.optimizer)
    else:
        model_state, optimizer_state = p.model.state_dict(), p.optimizer.state_dict()
    if rt.rank != 0:
        return
    payload = {"step": step, "config": plan.config.to_dict(), "given_config": p.given, "model": model_state,
               "optimizer": optimizer_state, "scheduler": p.scheduler.state_dict(),
               "tokenizer": p.tokenizer.state_dict() if hasattr(p.tokenizer, "state_dict") else None,
               "rng": rngs, "data": data, "evals": p.evals, "world": rt.world, "skipped_steps": p.skipped,
               "data_files": p.files}
    path = checkpoint.checkpoint_path(plan.output, step)
    try:
        checkpoint.save(path, payload, plan.config.keep_checkpoints)
    except OSError as e:  # disk full, folder gone or read-only: the run goes on, the next save tries again
        p.saves.failure(path, step, e)
    else:
        p.saves.wrote(path, step)
