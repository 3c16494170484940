"""The training loop: torchrun-aware, GradCache micro-batching, the megabatch loss, exact resume.

One step over a global contrastive batch B with W ranks (b = B / W per rank):
  1. rank r renders/reads samples [r*b, (r+1)*b) of global batch `step`;
  2. `mb.GradCache` encodes them in micro-batches without a graph, computes the loss over the whole
     global batch (strategy "auto" resolves to ring under torchrun, local otherwise), then re-runs
     each micro-batch with grad, leaving the full-batch gradient in every parameter;
  3. DDP averages the gradients once per step (GradCache drives its last micro-batch through the
     wrapper) -- docs/design.md's convention makes that average exactly dL/dtheta; the logged loss is
     the mean of the ranks' losses, which is the global loss. With --fsdp, FSDP2 shards the model
     instead (fsdp.py) and reduce-scatters the same average once per step;
  4. AdamW with linear warmup then cosine decay; the logit scale is clamped at log(100).
Rank 0 logs metrics.jsonl, evaluates, checkpoints, and draws curves.png.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import random
import re
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import megabatch as mb

from . import checkpoint, fsdp, hf_model, outputs, preempt, teardown
from .config import TrainConfig
from .data import build_data, build_eval, state_of
from .evaluate import evaluate
from .faults import Injector
from .files import DataError, stable_id
from .health import balanced_bias, collapse_warning, embedding_stats, recovery_note
from .plots import plot_curves
from .report import MetricsLog, summary, text_notes
from .tokenizer import Tokenizer, tokenizer_for
from .towers import Center, ContrastiveModel


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    owns_group: bool


def restart_count() -> int:
    """torchrun's count of this worker group's restarts (0 on the first attempt, and without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _elastic_store(timeout: timedelta) -> Optional[dist.Store]:
    """The store for init_process_group under torchrun, its keys namespaced by the restart.

    Why: torchrun's c10d rendezvous shares one TCPStore server, hosted by the agent, with its
    workers (TORCHELASTIC_USE_AGENT_STORE=True), and the same server serves every restart.
    init_process_group keys the ranks' gloo addresses (and NCCL's unique id) by group name only,
    so a restarted rank can read the address a killed peer published in the previous attempt
    before the restarted peer overwrites it, and gloo's connectFullMesh fails ("Connection
    refused", or "Connect timeout"). Measured with benchmarks/gloo_restart_repro.py (a bare
    2-rank gloo script, rank 1 SIGKILLed): 8 of 10 restarts failed so; 10 of 10 succeed with this
    namespace, 8 of 8 with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store each attempt).
    The restart count is the same for every worker of one agent, so this holds on one node; with
    several nodes each agent counts its own restarts, and restarts need
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment (README, Limits).
    Returns None (let init_process_group use env://) when the agent's store is not shared.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        if os.environ.get("RANK") == "0":  # several agents: their restart counts disagree (see above)
            warnings.warn("torchrun shares one TCPStore with the workers of every attempt: with several nodes, "
                          "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment or restarts may fail "
                          "in gloo's connectFullMesh / NCCL's init", stacklevel=2)
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"megabatch/attempt_{restart_count()}", store)


def init_runtime(device: str, timeout_s: float = 1800.0) -> Runtime:
    """Join the torchrun group if launched by torchrun (gloo on CPU, nccl on CUDA); collectives
    that wait longer than `timeout_s` seconds for a peer fail instead of hanging."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    owns = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=timeout_s)
        store = _elastic_store(timeout)
        kwargs: dict[str, Any] = {} if store is None else dict(
            store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, **kwargs)
        owns = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if use_cuda:
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    return Runtime(rank, world, dev, owns)


class _Normalized(nn.Module):
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


def sum_over_ranks(value: Tensor | float, world: int) -> float:
    """A scalar summed over ranks (one tiny all-reduce; on logging steps only)."""
    if world == 1:
        return float(value)
    t = torch.as_tensor(value).detach().reshape(1).double().clone()
    dist.all_reduce(t)
    return float(t)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
    cfg.validate()
    with preempt.StopRequest() as stop:
        rt = init_runtime(cfg.device, cfg.dist_timeout)
        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        intact = rt.owns_group
        try:
            result = _train(cfg, rt, model, tokenizer, stop)
            if rt.owns_group:
                _barrier("the barrier at the end of the run", cfg, rt.world)
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


@dataclass
class _Parts:
    """What a run is built from (fresh, or restored from a checkpoint)."""

    model: nn.Module
    tokenizer: Any
    stream: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start: int
    evals: list[dict[str, Any]]
    skipped: int = 0  # non-finite steps skipped so far (all attempts)
    given: dict[str, Any] = field(default_factory=dict)  # the config as given, before _build fitted it
    files: dict[str, Any] = field(default_factory=dict)  # the data files' fingerprints (rank 0)
    saves: outputs.Saves = field(default_factory=outputs.Saves)  # checkpoints written / failed (rank 0)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the run stops rather than train on garbage."""


class CollectiveError(RuntimeError):
    """A collective failed: a peer stopped calling it (timeout) or died (connection closed)."""


# What gloo and NCCL say when a peer stopped (timeout) or died (closed connection); gloo raises
# plain RuntimeErrors, so the text is all there is to go by.
_PEER_FAILURE = re.compile(r"timed out|timeout|connection|closed|reset by peer|read error|gloo|nccl", re.IGNORECASE)


@contextlib.contextmanager
def _collective(what: str, cfg: TrainConfig, world: int) -> Any:
    """Name the collective in the error when `what` fails for want of a peer."""
    if world == 1:
        yield
        return
    try:
        yield
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or _PEER_FAILURE.search(str(e))):
            raise  # not a communication failure: keep the error as it is
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(f"{what} failed (waited up to --dist-timeout {cfg.dist_timeout:g} s for the other "
                              f"ranks; a rank stopped calling it or died): {first}") from e


def _loss_collectives(cfg: TrainConfig, world: int) -> str:
    strategy = cfg.strategy if cfg.strategy != "auto" else ("ring" if world > 1 else "local")
    ops = {"ring": "send/recv around the ring", "gather": "all_gather", "local": "no collective"}[strategy]
    grads = ("FSDP's parameter all_gathers and gradient reduce_scatter" if cfg.fsdp
             else "DDP's gradient all_reduce")
    return f"the {cfg.loss} loss (strategy {strategy}: {ops}) and {grads}"


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
            decision[0] = ("ok", _decide(cfg, files))
        except (checkpoint.CheckpointError, FileNotFoundError) as e:
            decision[0] = ("error", str(e))
    if rt.world > 1:
        with _collective("choosing the checkpoint (broadcast from rank 0)", cfg, rt.world):
            dist.broadcast_object_list(decision, src=0)
    status, path = decision[0]
    if status == "error":
        raise checkpoint.CheckpointError(path)
    return (Path(path), checkpoint.read(Path(path))) if path else None


def _decide(cfg: TrainConfig, files: dict[str, Any]) -> Optional[str]:
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
        checkpoint.check_same_run(payload, cfg, path, len(found))
        if payload["step"] < cfg.steps:
            print(f"megabatch train: resuming from {path} (step {payload['step']}): {cfg.output} holds this run's "
                  f"checkpoints (attempt {restart_count()}; --output NEW_DIR starts another run)", flush=True)
    if payload["step"] < cfg.steps:
        for change in checkpoint.data_changes(payload.get("data_files") or {}, files):
            warnings.warn(f"resuming {path.name} on data that changed since it was saved: {change}; the run goes "
                          "on with the files as they are now (the stream's position may not match them)",
                          stacklevel=2)
    return str(path)


def _build(cfg: TrainConfig, rt: Runtime, model: Optional[nn.Module], tokenizer: Any,
           chosen: Optional[tuple[Path, dict[str, Any]]]) -> _Parts:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    saved = chosen[1] if chosen else None
    hf = model is None and hf_model.is_hf(cfg.model.source)
    if saved:  # what the saved run fitted is restored, not fitted again (checkpoint.FITTED)
        ran = checkpoint.saved_configs(saved)[1]
        for name in checkpoint.fitted_fields(cfg):
            setattr(cfg.model, name, getattr(ran.model, name))
    elif hf:
        cfg.model.image_size = hf_model.image_size(cfg.model.source)  # the data renders at the model's size
    # a pretrained model's image processor decides its pixels (read again from the folder on resume)
    pixels = hf_model.pixels(cfg.model.source, announce=rt.rank == 0) if hf else None
    try:
        stream = build_data(cfg.data, cfg.model.image_size, cfg.seed, rt.rank, rt.world, cfg=cfg, device=rt.device,
                            pixels=pixels)
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
    cfg.model.context_length = getattr(tokenizer, "context_length", cfg.model.context_length)
    if model is None:
        model = ContrastiveModel(cfg.model, tokenizer.vocab_size, cfg.loss)
    _init_logit_bias(cfg, model)
    model.to(rt.device).train()
    if saved:  # before sharding: every rank loads the full state, fully_shard keeps its rows
        model.load_state_dict(checkpoint.fit_scalar_shapes(saved["model"], model.state_dict()))
    if cfg.fsdp:
        fsdp.shard(model, rt.device, rt.world)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup_steps, cfg.steps))
    parts = _Parts(model, tokenizer, stream, optimizer, scheduler, 0, [])
    if chosen:
        parts.saves = outputs.Saves(chosen[0], saved["step"])
    if saved:
        state = checkpoint.fit_optimizer_shapes(saved["optimizer"], [q for g in optimizer.param_groups
                                                                     for q in g["params"]])
        if cfg.fsdp:
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


def _train(cfg: TrainConfig, rt: Runtime, model: Optional[nn.Module], tokenizer: Any,
           stop: Optional[preempt.StopRequest] = None) -> dict[str, Any]:
    t_run = time.perf_counter()
    cfg = copy.deepcopy(cfg)  # the caller's config stays as given; _build fits this copy
    given = cfg.to_dict()
    if cfg.batch_size % rt.world:
        raise ValueError(f"--batch-size ({cfg.batch_size}) must be divisible by the number of ranks ({rt.world})")
    if cfg.fsdp and fsdp.unusable(rt.world):
        raise ValueError(fsdp.unusable(rt.world))
    local = cfg.batch_size // rt.world
    with _collective("checking --output (broadcast from rank 0)", cfg, rt.world):
        outputs.check(cfg.output, rt.rank, rt.world)  # before any work: an OutputError on every rank
    files = checkpoint.data_files(cfg) if rt.rank == 0 else {}
    chosen = _choose_checkpoint(cfg, rt, files)
    if chosen and chosen[1]["step"] >= cfg.steps:  # a finished run, run again: nothing to train
        if rt.rank == 0:
            print(outputs.describe_complete(cfg.output, chosen[1], chosen[0], cfg.steps), flush=True)
        return (chosen[1].get("evals") or [{}])[-1] if rt.rank == 0 else {}
    p = _build(cfg, rt, model, tokenizer, chosen)
    p.given, p.files = given, files
    model, evals = p.model, p.evals
    loss_fn = functools.partial(mb.siglip_loss if cfg.loss == "siglip" else mb.clip_loss,
                                strategy=cfg.strategy, backend=cfg.backend)
    # Under torchrun a DDP wrapper (which broadcasts rank 0's weights) averages the gradients once
    # per step: GradCache runs the last micro-batch through it and the others under no_sync().
    # With --fsdp the model is already sharded (_build) and GradCache syncs its last backward.
    wrapper: Optional[nn.Module] = model if cfg.fsdp else None
    if rt.world > 1 and not cfg.fsdp:
        wrapper = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index]
                                                      if rt.device.type == "cuda" else None)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    gc = mb.GradCache(_Normalized(model, "encode_image", dtype), _Normalized(model, "encode_text", dtype), loss_fn,
                      cfg.micro_batch_size, modules=wrapper)
    positives = cfg.resolved_positives()
    lead = rt.rank == 0
    out = Path(cfg.output)
    log = MetricsLog(out / "metrics.jsonl", keep_until=p.start) if lead else None
    if lead:
        outputs.write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    # Rank 0 evaluates; with --fsdp every rank runs the evaluation's (collective) forwards with it.
    eval_data = (build_eval(cfg.eval_data, p.stream, cfg.model.image_size, cfg.seed, cfg.eval_size, cfg=cfg)
                 if lead or cfg.fsdp else None)
    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())
    bar = _progress(cfg, p.start) if lead else None
    t_window, n_window = time.perf_counter(), 0
    warned: list[str] = []
    faults, in_a_row, what = Injector(rt.rank), 0, _loss_collectives(cfg, rt.world)
    for step in range(p.start, cfg.steps):
        done = step + 1
        images, captions, ids = _batch(p.stream, step, cfg.batch_size, rt.rank * local, (rt.rank + 1) * local)
        tokens = p.tokenizer(captions)
        if step == 0 and cfg.loss == "siglip" and cfg.logit_bias_init is None:
            _balance_bias(rt, model, images.to(rt.device), tokens.to(rt.device), cfg.batch_size)
        pos = positive_ids(positives, captions, ids)
        id_kwargs = {} if pos is None else {"image_ids": pos.to(rt.device), "text_ids": pos.to(rt.device)}
        p.optimizer.zero_grad(set_to_none=True)
        if cfg.fsdp:
            model.unshard()  # the loss arguments below come from the gathered logit_scale / logit_bias
        scale = model.logit_scale.exp()
        loss_args = (scale, model.logit_bias) if cfg.loss == "siglip" else (scale,)
        faults.before_loss(done)
        with autocast, _collective(f"step {done}: {what}", cfg, rt.world):
            loss = gc(images.to(rt.device), tokens.to(rt.device), *loss_args, **id_kwargs)
        faults.after_backward(done, model)
        with _collective(f"step {done}: the non-finite check's all_reduce", cfg, rt.world):
            bad_ranks, global_loss, asked = _nonfinite_ranks(loss, model, rt.world, stop.pending() if stop else ())
        if bad_ranks:
            p.skipped, in_a_row = p.skipped + 1, in_a_row + 1
            if rt.rank == 0:
                warnings.warn(f"step {done}: non-finite loss or gradient on {bad_ranks} rank(s) (global loss "
                              f"{global_loss:.4g}): update skipped on every rank ({in_a_row} in a row)", stacklevel=1)
            if in_a_row >= cfg.max_bad_steps:
                raise NonFiniteError(
                    f"stopping at step {done}: {in_a_row} non-finite steps in a row (--max-bad-steps "
                    f"{cfg.max_bad_steps}); last global loss {global_loss:.4g}, "
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
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            with _collective(f"step {done}: the metrics' all_reduce", cfg, rt.world):
                record = _record(cfg, rt, p, done, loss, n_window * cfg.batch_size / (now - t_window), now - t_run)
            t_window, n_window = now, 0
            if log is not None:
                _check_health(cfg, model, images.to(rt.device), tokens.to(rt.device), record, warned)
                log.append(record)
            elif cfg.fsdp:  # the probe's forwards gather parameters: every rank runs them with rank 0
                with _collective(f"step {done}: the health probe's parameter all_gathers (--fsdp)", cfg, rt.world):
                    embedding_stats(model, images.to(rt.device), tokens.to(rt.device))
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        signum = preempt.StopRequest.agreed(asked)
        if signum is not None and done < cfg.steps:  # every rank saw the same sums: they stop here together
            if bar is not None:
                bar.close()
            def save_now() -> tuple[Optional[Path], Optional[int]]:
                _save(cfg, rt, done, p)  # rank 0 writes; it alone knows whether the write failed
                if not lead:
                    return checkpoint.checkpoint_path(cfg.output, done), done
                return p.saves.newest, (p.saves.newest_step if p.saves.newest is not None else None)

            preempt.stop(signum, done, save_now,
                         lambda: _barrier(f"step {done}: the barrier after the preemption checkpoint", cfg, rt.world),
                         lead)
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            if eval_data is not None:
                with (_collective(f"step {done}: the evaluation's parameter all_gathers (--fsdp)", cfg, rt.world)
                      if cfg.fsdp else contextlib.nullcontext()):
                    metrics = evaluate(model, p.tokenizer, eval_data, rt.device)
                if lead:
                    evals.append({"step": done, **metrics})
                    outputs.write_text(out / "eval.json", json.dumps({**evals[-1], "history": evals}, indent=2))
            if rt.world > 1:
                with _collective(f"step {done}: the barrier after rank 0's evaluation", cfg, rt.world):
                    dist.barrier()
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps:
            _save(cfg, rt, done, p)
    if bar is not None:
        bar.close()
    bad_data = getattr(p.stream, "skip_summary", lambda: None)()  # users' files: each rank's bad rows, counted
    if bad_data:
        print(f"megabatch train: {bad_data}", file=sys.stderr, flush=True)
    if log is None:
        return {}
    title = f"{cfg.loss} | global batch {cfg.batch_size} over {rt.world} rank(s) | {cfg.data}"
    plot_curves(log.records, evals, out / "curves.png", title=title)
    final = evals[-1] if evals else {}
    notes = text_notes(p.tokenizer, eval_data) + p.saves.notes()
    print(summary(cfg, rt.world, final, time.perf_counter() - t_run, notes), flush=True)
    return final


def _init_logit_bias(cfg: TrainConfig, model: nn.Module) -> None:
    """A fresh SigLIP run's bias: --logit-bias-init, else -ln(B - 1) for the global batch B until
    the first step balances it on the first batch (_balance_bias; health.py says why)."""
    bias = getattr(model, "logit_bias", None)
    if cfg.loss == "siglip" and isinstance(bias, Tensor) and not getattr(model, "pretrained", False):
        value = cfg.logit_bias_init if cfg.logit_bias_init is not None else balanced_bias(cfg.batch_size)
        with torch.no_grad():
            bias.fill_(value)


def _balance_bias(rt: Runtime, model: nn.Module, images: Tensor, tokens: Tensor, batch_size: int) -> None:
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


def _check_health(cfg: TrainConfig, model: nn.Module, images: Tensor, tokens: Tensor, record: dict[str, Any],
                  warned: list[str]) -> None:
    """Add the probe's embedding statistics to `record`; warn (once) when they show a collapse."""
    record.update(embedding_stats(model, images, tokens))
    message = collapse_warning(record, record["step"], cfg.steps, cfg.warmup_steps, cfg.loss, cfg.batch_size,
                               record["logit_scale"], record.get("logit_bias"))
    if message is not None:
        record["collapsed"] = True
        if not warned:
            warned.append(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    elif len(warned) == 1 and record["step"] > cfg.warmup_steps:  # said once, when it has left the collapse
        note = recovery_note(record, record["step"])
        if note is not None:
            warned.append(note)
            print(f"megabatch train: {note}", file=sys.stderr, flush=True)


def _batch(stream: Any, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str], Optional[Tensor]]:
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


def _progress(cfg: TrainConfig, start: int) -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


@torch.no_grad()
def _nonfinite_ranks(loss: Tensor, model: nn.Module, world: int,
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


def _barrier(what: str, cfg: TrainConfig, world: int) -> None:
    if world > 1:
        with _collective(what, cfg, world):
            dist.barrier()


@torch.no_grad()
def _record(cfg: TrainConfig, rt: Runtime, p: _Parts, step: int, loss: Tensor, samples_per_s: float,
            elapsed: float) -> dict[str, Any]:
    """One metrics.jsonl line: the global loss (mean of the ranks'), temperature, lr, throughput
    (all ranks), peak memory (rank 0: CUDA max allocated, or the process's peak RSS on CPU)."""
    model = p.model
    record = {"step": step, "loss": sum_over_ranks(loss, rt.world) / rt.world,
              "logit_scale": math.exp(fsdp.scalar(model.logit_scale)), "lr": p.scheduler.get_last_lr()[0],
              "samples_per_s": samples_per_s, "peak_mem_mb": peak_memory_mb(rt.device), "elapsed_s": elapsed,
              "skipped_steps": p.skipped}
    if cfg.loss == "siglip":
        record["logit_bias"] = fsdp.scalar(model.logit_bias)
    if hasattr(p.stream, "skipped"):
        record["data_skipped"] = int(sum_over_ranks(float(p.stream.skipped), rt.world))
    return record


def _save(cfg: TrainConfig, rt: Runtime, step: int, p: _Parts) -> None:
    with _collective(f"step {step}: the checkpoint's all_gather_object of RNG and data states", cfg, rt.world):
        rngs = checkpoint.gathered(checkpoint.rng_state(), rt.world)
        data = checkpoint.gathered(state_of(p.stream), rt.world)
    if cfg.fsdp:  # gathered to rank 0's CPU, in the unsharded format (loads with or without --fsdp)
        with _collective(f"step {step}: the checkpoint's gather of the sharded state", cfg, rt.world):
            model_state = fsdp.full_model_state(p.model)
            optimizer_state = fsdp.full_optimizer_state(p.model, p.optimizer)
    else:
        model_state, optimizer_state = p.model.state_dict(), p.optimizer.state_dict()
    if rt.rank != 0:
        return
    payload = {"step": step, "config": cfg.to_dict(), "given_config": p.given, "model": model_state,
               "optimizer": optimizer_state, "scheduler": p.scheduler.state_dict(),
               "tokenizer": p.tokenizer.state_dict() if hasattr(p.tokenizer, "state_dict") else None,
               "rng": rngs, "data": data, "evals": p.evals, "world": rt.world, "skipped_steps": p.skipped,
               "data_files": p.files}
    path = checkpoint.checkpoint_path(cfg.output, step)
    try:
        checkpoint.save(path, payload, cfg.keep_checkpoints)
    except OSError as e:  # disk full, folder gone or read-only: the run goes on, the next save tries again
        p.saves.failure(path, step, e)
    else:
        p.saves.wrote(path, step)
