"""--fsdp: the training app's FSDP2 (`fully_shard`) layout, full checkpoints, and scalar parameters.

Layout: every element of each nn.ModuleList in the model (the built-in towers' transformer blocks,
MiniLM's layers) is its own FSDP unit, and the root unit holds the rest (patch and token embeddings,
final norms and projections, logit_scale, logit_bias). encode_image / encode_text are registered as
forward methods, so GradCache's calls gather the root's parameters; GradCache (given the root in
`modules=`) runs the same encoder calls on every rank and reduce-scatters once per step. A module
reached under two names (a shared trunk) is one unit: `modules()` yields it once. A unit may mix
frozen and trained parameters (--train-layers: MiniLM's frozen layers are units of frozen
parameters, and the root holds the frozen token embeddings beside the trained heads): FSDP2 shards
each parameter on its own and reduce-scatters only the gradients there are (FSDP1's flat parameter
wanted one requires_grad per unit; FSDP2 does not).

Outside a forward, parameters are sharded DTensors (rank r holds rows of dim 0; a (1,) parameter
lives on rank 0 and is empty elsewhere). The loop therefore:
  * gathers the root (`model.unshard()`) before it computes the loss arguments from logit_scale /
    logit_bias, so their gradient reaches FSDP's reduce-scatter like any other;
  * puts the root back to its shards (`at_rest`) before it changes parameters in place (optimizer
    step, clamp, bias initialisation): changes to a gathered copy would be lost;
  * reads scalars with `scalar()` (a collective: every rank calls it).
Checkpoints keep the unsharded single-process format (full model and optimizer state, gathered to
rank 0's CPU with torch.distributed.checkpoint's state-dict helpers), so a checkpoint written with
--fsdp resumes without it and vice versa, on any number of ranks.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megabatch.integrations.fsdp import is_dtensor, is_fsdp, shardable

NEEDS_RANKS = ("--fsdp shards the model across ranks: launch with torchrun --nproc_per_node N (N >= 2); a single "
               "process trains without it")


def unusable(world: int) -> Optional[str]:
    """Why --fsdp cannot run with `world` ranks on this torch, or None."""
    if world < 2:
        return NEEDS_RANKS
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch {torch.__version__}"
    return None


def shard(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard `model` in place over the default group (rank 0's weights, as DDP would broadcast).

    0-dim parameters (an HF or user model's logit_scale) become shape (1,): fully_shard refuses
    0-dim parameters. Returns `model`, now an FSDPModule.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    shardable(model)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (world,))
    blocks = {id(m): m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst
              if any(True for _ in m.parameters())}
    for block in reversed(list(blocks.values())):  # nested lists: inner units first
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, name)
    return model


def at_rest(model: nn.Module) -> None:
    """Put a sharded model's gathered units back to their shards (before in-place changes)."""
    if is_fsdp(model):
        model.reshard()


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    return t.to_local() if is_dtensor(t) else t


def scalar(t: Tensor) -> float:
    """The value of a one-element parameter, sharded or not (collective for a DTensor)."""
    full = t.full_tensor() if is_dtensor(t) else t
    return float(full.detach().reshape(()))


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on rank 0's CPU ({} on other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    at_rest(model)
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the ids of optimizer.state_dict())."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state in `optimizer.state_dict()`'s format (parameters by position),
    on rank 0's CPU ({} on other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    at_rest(model)
    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return {}
    index = {n: i for i, n in enumerate(_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an unsharded `optimizer.state_dict()`-format state (every rank holds it) into the sharded
    optimizer: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _names(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    by_name = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):  # as load_state_dict leaves them:
        group.update({k: v for k, v in saved.items() if isinstance(v, tuple)})  # betas a tuple, not a list
