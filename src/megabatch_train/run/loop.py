"""The training loop: torchrun-aware, GradCache micro-batching, the megabatch loss, exact resume.

One step over a global contrastive batch B with W ranks (b = B / W per rank):
  1. rank r renders/reads samples [r*b, (r+1)*b) of global batch `step`;
  2. `mb.GradCache` encodes them in micro-batches without a graph, computes the loss over the whole
     global batch (strategy "auto": the cost model's pick under torchrun, local otherwise), then re-runs
     each micro-batch with grad, leaving the full-batch gradient in every parameter;
  3. DDP averages the gradients once per step (GradCache drives its last micro-batch through the
     wrapper) -- docs/design.md's convention makes that average exactly dL/dtheta; the logged loss is
     the mean of the ranks' losses, which is the global loss. With --fsdp, FSDP2 shards the model
     instead (fsdp.py) and reduce-scatters the same average once per step;
  4. AdamW with linear warmup then cosine decay; the logit scale is clamped at log(100).
Rank 0 logs metrics.jsonl, evaluates, checkpoints, and draws curves.png.

The loop reads the run's plan (plan.py), never the config's fields: the decisions are taken
once, before the first step. Its parts: runtime.py (processes, collectives), build.py (checkpoint
choice, model, data, optimizer), step.py (the step's pieces).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import megabatch as mb

from ..config.sections import TrainConfig
from ..evaluation import outputs
from ..evaluation.evaluate import evaluate
from ..evaluation.plots import plot_curves
from ..evaluation.report import MetricsLog, summary, text_notes
from . import checkpoint, fsdp, preempt, teardown
from .build import Normalized, Parts, prepare
from .faults import Injector
from .health import SIDES, embedding_stats
from .plan import RunPlan
from .runtime import CollectiveError, Runtime, barrier, collective, start
from .step import (NonFiniteError, balance_bias, check_health, nonfinite_ranks, positive_ids, progress_bar, record_step,
                   save_checkpoint, take_batch)

__all__ = ["train"]


def train(
    cfg: TrainConfig, model: Optional[nn.Module] = None, tokenizer: Optional[Callable[[list[str]], Tensor]] = None
) -> dict[str, Any]:
    """Run `cfg` (single process, or one rank under torchrun); returns the final evaluation on rank 0.

    `model` may be any module with encode_image / encode_text / logit_scale (/ logit_bias); then
    `tokenizer` (list[str] -> (n, L) int64) must match its text tower.

    SIGTERM / SIGUSR1 while it runs: every rank stops at the same step after its checkpoint and
    raises preempt.Preempted (preempt.py). A CollectiveError in a group this call created (under
    torchrun) aborts the group instead of destroying it; the process should then end with
    teardown.exit_now, as the command does, since Python's clean-up of the failed group can deadlock
    (teardown.py).
    """
    with preempt.StopRequest() as stop:
        rt = start(cfg)
        threads = torch.get_num_threads()
        if rt.threads:
            torch.set_num_threads(rt.threads)
        intact = rt.owns_group
        try:
            result = _train(cfg, rt, model, tokenizer, stop)
            if rt.owns_group:
                barrier("the barrier at the end of the run", rt)
                time.sleep(0.05)  # let gloo drain before teardown
            return result
        except preempt.Preempted:
            if rt.owns_group:
                time.sleep(0.05)  # every rank passed the barrier after the checkpoint; let gloo drain
            raise
        except CollectiveError:
            if rt.owns_group:
                intact = False
                teardown.abandon_group()
            raise
        finally:
            torch.set_num_threads(threads)
            if intact:
                dist.destroy_process_group()



def _train(cfg: TrainConfig, rt: Runtime, model: Optional[nn.Module], tokenizer: Any,
           stop: Optional[preempt.StopRequest] = None) -> dict[str, Any]:
    t_run = time.perf_counter()
    plan, p, finished = prepare(cfg, rt, model, tokenizer)
    if p is None:
        return finished
    return _loop(plan, rt, p, stop, t_run)


def _loop(plan: RunPlan, rt: Runtime, p: Parts, stop: Optional[preempt.StopRequest], t_run: float) -> dict[str, Any]:
    """The steps from p.start to plan.steps; the final evaluation on rank 0."""
    model, evals, eval_data = p.model, p.evals, p.eval_data
    # Under torchrun a DDP wrapper (which broadcasts rank 0's weights) averages the gradients once
    # per step: GradCache runs the last micro-batch through it and the others under no_sync().
    # With --fsdp the model is already sharded (build.py) and GradCache syncs its last backward.
    wrapper: Optional[nn.Module] = model if plan.fsdp else None
    if plan.ddp:
        wrapper = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index]
                                                      if rt.device.type == "cuda" else None)
    gc = mb.GradCache(Normalized(model, "encode_image", plan.dtype), Normalized(model, "encode_text", plan.dtype),
                      plan.loss_fn, plan.micro_batch_size, modules=wrapper)
    lead = rt.rank == 0
    out = plan.output
    log = MetricsLog(out / "metrics.jsonl", keep_until=p.start) if lead else None
    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16) if plan.bf16 else contextlib.nullcontext())
    bar = progress_bar(plan, p.start) if lead else None
    t_window, n_window = time.perf_counter(), 0
    warned: list[str] = []
    sides = eval_data.sides if eval_data is not None else SIDES  # what the health messages call the two sides
    faults, in_a_row, what = Injector(rt.rank), 0, plan.collectives(rt.world)
    local = plan.local_batch
    for step in range(p.start, plan.steps):
        done = step + 1
        images, captions, ids = take_batch(p.stream, step, plan.batch_size, rt.rank * local, (rt.rank + 1) * local)
        tokens = p.tokenizer(captions)
        if step == 0 and plan.balance_bias:
            balance_bias(rt, model, images.to(rt.device), tokens.to(rt.device), plan.batch_size)
        pos = positive_ids(plan.positives, captions, ids)
        id_kwargs = {} if pos is None else {"image_ids": pos.to(rt.device), "text_ids": pos.to(rt.device)}
        p.optimizer.zero_grad(set_to_none=True)
        if plan.fsdp:
            model.unshard()  # the loss arguments below come from the gathered logit_scale / logit_bias
        scale = model.logit_scale.exp()
        loss_args = (scale, model.logit_bias) if plan.siglip else (scale,)
        faults.before_loss(done)
        with autocast, collective(f"step {done}: {what}", rt):
            loss = gc(images.to(rt.device), tokens.to(rt.device), *loss_args, **id_kwargs)
        faults.after_backward(done, model)
        with collective(f"step {done}: the non-finite check's all_reduce", rt):
            bad_ranks, global_loss, asked = nonfinite_ranks(loss, model, rt.world, stop.pending() if stop else ())
        if bad_ranks:
            p.skipped, in_a_row = p.skipped + 1, in_a_row + 1
            if rt.rank == 0:
                warnings.warn(f"step {done}: non-finite loss or gradient on {bad_ranks} rank(s) (global loss "
                              f"{global_loss:.4g}): update skipped on every rank ({in_a_row} in a row)", stacklevel=1)
            if in_a_row >= plan.max_bad_steps:
                raise NonFiniteError(
                    f"stopping at step {done}: {in_a_row} non-finite steps in a row (--max-bad-steps "
                    f"{plan.max_bad_steps}); last global loss {global_loss:.4g}, "
                    f"logit scale {float(scale.detach()):.4g}, "
                    f"lr {p.scheduler.get_last_lr()[0]:.3g}. The newest checkpoint is from before; try a lower "
                    "--lr, more --warmup-steps or --precision fp32")
            p.optimizer.zero_grad(set_to_none=True)
        else:
            in_a_row = 0
            fsdp.at_rest(model)
            p.optimizer.step()
        p.scheduler.step()
        fsdp.at_rest(model)
        with torch.no_grad():
            fsdp.local(model.logit_scale).clamp_(0, math.log(100))
        faults.after_update(done)
        n_window += 1
        if done % plan.log_every == 0 or done == plan.steps:
            now = time.perf_counter()
            with collective(f"step {done}: the metrics' all_reduce", rt):
                record = record_step(plan, rt, p, done, loss, n_window * plan.batch_size / (now - t_window), now - t_run)
            t_window, n_window = now, 0
            if log is not None:
                check_health(plan, model, images.to(rt.device), tokens.to(rt.device), record, warned, sides)
                log.append(record)
            elif plan.fsdp:  # the probe's forwards gather parameters: every rank runs them with rank 0
                with collective(f"step {done}: the health probe's parameter all_gathers (--fsdp)", rt):
                    embedding_stats(model, images.to(rt.device), tokens.to(rt.device))
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        signum = preempt.StopRequest.agreed(asked)
        if signum is not None and done < plan.steps:  # every rank saw the same sums: they stop here together
            if bar is not None:
                bar.close()
            def save_now() -> tuple[Optional[Path], Optional[int]]:
                save_checkpoint(plan, rt, done, p)  # rank 0 writes; it alone knows whether the write failed
                if not lead:
                    return checkpoint.checkpoint_path(plan.output, done), done
                return p.saves.newest, (p.saves.newest_step if p.saves.newest is not None else None)

            preempt.stop(signum, done, save_now,
                         lambda: barrier(f"step {done}: the barrier after the preemption checkpoint", rt),
                         lead)
        if (plan.eval_every and done % plan.eval_every == 0) or done == plan.steps:
            if eval_data is not None:
                with (collective(f"step {done}: the evaluation's parameter all_gathers (--fsdp)", rt)
                      if plan.fsdp else contextlib.nullcontext()):
                    metrics = evaluate(model, p.tokenizer, eval_data, rt.device)
                if lead:
                    evals.append({"step": done, **metrics})
                    outputs.write_text(out / "eval.json", json.dumps({**evals[-1], "history": evals}, indent=2))
            if rt.world > 1:
                with collective(f"step {done}: the barrier after rank 0's evaluation", rt):
                    dist.barrier()
        if (plan.ckpt_every and done % plan.ckpt_every == 0) or done == plan.steps:
            save_checkpoint(plan, rt, done, p)
    if bar is not None:
        bar.close()
    bad_data = getattr(p.stream, "skip_summary", lambda: None)()  # users' files: each rank's bad rows, counted
    if bad_data:
        print(f"megabatch train: {bad_data}", file=sys.stderr, flush=True)
    if log is None:
        return {}
    title = f"{plan.loss} | global batch {plan.batch_size} over {rt.world} rank(s) | {plan.data}"
    plot_curves(log.records, evals, out / "curves.png", title=title)
    final = evals[-1] if evals else {}
    notes = text_notes(p.tokenizer, eval_data) + p.saves.notes()
    print(summary(plan.config, rt.world, final, time.perf_counter() - t_run, notes), flush=True)
    return final
