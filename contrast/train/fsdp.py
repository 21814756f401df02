"""``train.fsdp``: shard parameters, gradients and optimizer state across the processes with FSDP2
(``torch.distributed.fsdp.fully_shard``) instead of replicating the model under DDP.

Units (each one all-gathered before its forward and backward, resharded after): every child of an
``nn.ModuleList`` / ``nn.Sequential`` whose children all share one class (the repeated blocks of a transformer, the
blocks of a CNN stage), innermost first, then the root, which takes every parameter left. The rule reads only the
module tree, never a model's name or attribute names. A block whose parameters are also used by a module outside it
(tied weights) stays in its parent's unit. Frozen parameters may sit in any unit: FSDP2 all-gathers them with the
others and reduces only the gradients of trainable ones (LiT's locked towers, BLIP-2's frozen tower).

Kept whole on every rank, as under DDP (not sharded):
- 0-d parameters (a learned logit scale or bias), which FSDP2 cannot shard; a gradient hook averages their gradients
  across the ranks;
- frozen parameters outside the block units. A forward may change frozen parameters in place (BLIP's momentum
  teacher follows the student by EMA inside the model's forward); FSDP2 would drop such a change made to the root's
  gathered copy, while whole parameters keep it. The teacher's blocks are units like the student's, and their EMA
  runs on the matching shards. These are small next to the blocks (patch and position embeddings, final norms).
  A block that changed its own parameters in place in its forward would lose the change: train such a model with DDP.

Evaluation (:func:`evaluating`) calls the model's embedding and matching methods (``encode_image``, ``encode_text``,
``itm_score``) instead of its forward. Inside that context they run as FSDP forwards of the root
(``register_fsdp_forward_method``): the root's own parameters are gathered for the call and the block units gather
themselves one at a time in their forwards, as in training, so evaluation holds no more of the model at once than a
training forward does (unsharding the whole model instead would hold every parameter on every rank). The
registration lasts only for the evaluation: the training forward calls the same methods from inside the root's
forward, where they must stay plain methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from contrast.config import TrainConfig
from contrast.distributed import DistInfo


def use_fsdp(cfg: TrainConfig, dist_info: DistInfo) -> bool:
    """Whether this run shards; ``train.fsdp`` in a single process trains unsharded and says so."""
    if not cfg.fsdp:
        return False
    if dist_info.world_size > 1:
        return True
    print("train.fsdp: FSDP shards across processes and this run has one, so it trains unsharded "
          "(launch with torchrun --nproc_per_node N to shard)")
    return False


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (the bare model, not a torch.compile wrapper) was sharded by :func:`shard_model`."""
    return isinstance(model, FSDPModule)


def _post_order(module: nn.Module, seen: set[int]) -> Iterator[nn.Module]:
    for child in module.children():
        if id(child) not in seen:
            seen.add(id(child))
            yield from _post_order(child, seen)
    yield module


def _is_block_stack(module: nn.Module) -> bool:
    kids = list(module.children())
    return isinstance(module, nn.ModuleList | nn.Sequential) and bool(kids) and len({type(k) for k in kids}) == 1


def _self_contained(module: nn.Module, owners: dict[int, set[int]]) -> bool:
    """Has parameters, and no module outside it holds any of them (a tied weight keeps its block in the parent)."""
    inside = {id(m) for m in module.modules()}
    params = list(module.parameters())
    return bool(params) and all(owners[id(p)] <= inside for p in params)


def plan_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard_model` passes to ``fully_shard``, innermost first; the root is always last."""
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    blocks = {id(k) for m in model.modules() if _is_block_stack(m) for k in m.children()}
    units = [m for m in _post_order(model, {id(model)})
             if m is not model and id(m) in blocks and _self_contained(m, owners)]
    return [*units, model]


def _average_grad_across_ranks(p: torch.Tensor) -> None:
    dist.all_reduce(p.grad)
    p.grad.div_(dist.get_world_size())


def _broadcast_from_main(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights and buffers (as DDP does at construction)."""
    seen: set[int] = set()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                dist.broadcast(t, src=0)


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over every process of the default group (units: :func:`plan_units`); returns it.

    Build the optimizer after this: it must hold the sharded (DTensor) parameters.
    """
    _broadcast_from_main(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = plan_units(model)
    in_blocks = {p for unit in units[:-1] for p in unit.parameters()}
    whole = {p for p in model.parameters() if p.ndim == 0 or (not p.requires_grad and p not in in_blocks)}
    for p in whole:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad_across_ranks)
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=whole)
    return model


EVAL_METHODS = ("encode_image", "encode_text", "itm_score")  # the Model protocol's methods evaluation calls


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Within this context a sharded model's :data:`EVAL_METHODS` run as FSDP forwards of the root (every rank must
    call them, with the same number of batches); afterwards they are plain methods again and every unit is
    resharded. A model that is not sharded is left as it is."""
    if not is_sharded(model):
        yield
        return
    for name in EVAL_METHODS:  # every Model has them (a family without one raises CapabilityError when called)
        register_fsdp_forward_method(model, name)  # sets an instance attribute over the class's method
    try:
        yield
    finally:
        for name in EVAL_METHODS:
            model.__dict__.pop(name, None)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()  # the root keeps its gathered parameters after a forward; give the memory back
