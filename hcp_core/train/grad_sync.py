"""Gradient averaging across processes: bucketed all-reduces that overlap the backward pass.

What DDP does, without wrapping any module (module and parameter names stay as they are, adapters
may train any tensor: LoRA factors, an embedding row of a custom word, a whole UNet):

* The trained tensors are grouped into ~25 MB buckets, in reverse registration order at first
  and, from the second step on, in the order rank 0's gradients arrived (as DDP rebuilds its
  buckets). Each bucket is one flat buffer, and each tensor's
  ``.grad`` is a *view* into it: autograd accumulates straight into the buffer, the all-reduce runs
  in place, so the gradients are never copied (no second copy of every gradient, as a flat
  ``torch.cat`` would make).
* On the last micro-step of an optimizer step, a post-accumulate-grad hook counts the tensors of
  each bucket; a full bucket starts an asynchronous ``all_reduce`` while backward goes on.
  Buckets are launched strictly in index order (a ready bucket waits for the ones before it), so
  every process issues the same collectives in the same order even when their backward passes
  differ.
* :meth:`GradSync.finish` launches what is left (a tensor unused on this process, e.g. a word
  absent from its prompts, joins with zeros), waits for every reduction and divides by the number
  of processes. A tensor that received no gradient on *any* process gets ``grad = None`` back, so
  the optimizer skips it exactly as a one-process run would.

Earlier micro-steps of gradient accumulation only accumulate locally (no communication).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch

#: Bucket size DDP also uses by default: big enough to amortise a collective's launch, small
#: enough that the first buckets are reduced while backward still runs.
BUCKET_BYTES = 25 * 2**20


class _Bucket:
    """One flat buffer and the tensors whose gradients are views into it."""

    def __init__(self, params: List[torch.nn.Parameter]) -> None:
        self.params = params
        first = params[0]
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
        self.views: List[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.pending = len(params)
        self.work: Any = None


def make_buckets(params: Sequence[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES,
                 order: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Indices into ``params`` grouped into buckets of at most ``bucket_bytes`` (a larger tensor
    gets a bucket of its own), one dtype and device per bucket, filled in ``order`` (default:
    last tensors first, roughly the order backward produces their gradients)."""
    buckets: List[List[int]] = []
    open_: Dict[Tuple[torch.dtype, torch.device], Tuple[List[int], int]] = {}
    for i in (reversed(range(len(params))) if order is None else order):
        p = params[i]
        key = (p.dtype, p.device)
        members, size = open_.get(key, ([], 0))
        nbytes = p.numel() * p.element_size()
        if members and size + nbytes > bucket_bytes:
            buckets.append(members)
            members, size = [], 0
        open_[key] = (members + [i], size + nbytes)
    buckets.extend(members for members, _ in open_.values() if members)
    return buckets


class GradSync:
    """Averages the gradients of ``params`` over the default process group; see the module docstring.

    Per optimizer step: :meth:`micro_step` at the start of each micro-step, then :meth:`finish`
    after the last backward and before clipping and the optimizer step. After the first step the
    buckets are rebuilt in the order rank 0's gradients arrived (as DDP does), so that a tensor
    registered early but reached late by backward (a text encoder's, an unused one) does not hold
    back the buckets behind it.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], world_size: int, *, bucket_bytes: int = BUCKET_BYTES,
                 group: Optional[Any] = None) -> None:
        self.params = [p for p in params if p.requires_grad]  # the others never get a gradient
        self.world_size = world_size
        self.group = group
        self.bucket_bytes = bucket_bytes
        self._order = {id(p): i for i, p in enumerate(self.params)}
        self._build(None)
        self._rebuilt = False
        self._arrival: Dict[int, None] = {}  # indices in the order their gradients arrived (first step)
        self._armed = False
        self._seen: Set[int] = set()
        self._next = 0  # the next bucket to launch (launches go in index order)
        self._got_grad = torch.zeros(len(self.params), dtype=torch.float32)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _build(self, order: Optional[Sequence[int]]) -> None:
        self.buckets = [_Bucket([self.params[i] for i in members])
                        for members in make_buckets(self.params, self.bucket_bytes, order)]
        self._where: Dict[int, Tuple[int, int]] = {}  # id(param) -> (bucket, slot)
        for b, bucket in enumerate(self.buckets):
            for slot, p in enumerate(bucket.params):
                self._where[id(p)] = (b, slot)

    def micro_step(self, index: int, count: int) -> None:
        """Micro-step ``index`` of ``count`` begins: the first one points every ``.grad`` at a
        zeroed bucket view; the last one lets full buckets start reducing during backward."""
        if index == 0:
            self._got_grad.zero_()
            for bucket in self.buckets:
                bucket.buffer.zero_()
                bucket.pending = len(bucket.params)
                bucket.work = None
                for p, view in zip(bucket.params, bucket.views):
                    p.grad = view
            self._next = 0
        self._armed = index == count - 1
        self._seen = set()  # tensors whose gradient arrived in the armed micro-step

    def _on_grad(self, param: torch.Tensor) -> None:
        index = self._order[id(param)]
        self._got_grad[index] = 1.0
        if not self._rebuilt:
            self._arrival.setdefault(index)
        if not self._armed:
            return
        first = index not in self._seen
        self._seen.add(index)
        b, slot = self._where[id(param)]
        bucket = self.buckets[b]
        if b < self._next:  # its bucket is already on the wire (a tensor used by two checkpointed segments)
            raise RuntimeError(f"trained tensor {index} received a gradient after its bucket was reduced; "
                               "gradient synchronisation cannot be overlapped for this model")
        if param.grad is not None and param.grad.data_ptr() != bucket.views[slot].data_ptr():
            # Autograd replaced the view (it may when it cannot accumulate in place): copy it back.
            bucket.views[slot].copy_(param.grad)
            param.grad = bucket.views[slot]
        if first:
            bucket.pending -= 1
        self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        import torch.distributed as dist

        while self._next < len(self.buckets) and (force or self.buckets[self._next].pending <= 0):
            bucket = self.buckets[self._next]
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            self._next += 1

    def finish(self) -> None:
        """Launch the remaining buckets, wait for all, average; tensors no process trained get
        ``grad = None``."""
        import torch.distributed as dist

        self._armed = False
        for bucket in self.buckets:  # a view replaced outside a hook (or set to None) goes back in
            for slot, p in enumerate(bucket.params):
                if p.grad is None:
                    p.grad = bucket.views[slot]
                elif p.grad.data_ptr() != bucket.views[slot].data_ptr():
                    bucket.views[slot].copy_(p.grad)
                    p.grad = bucket.views[slot]
        self._launch_ready(force=True)
        used = self._got_grad.to(self.buckets[0].buffer.device)
        used_work = dist.all_reduce(used, group=self.group, async_op=True)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer.div_(self.world_size)
        used_work.wait()
        if not self._rebuilt:
            self._rebuild_in_arrival_order()
        for i in torch.nonzero(used.cpu() == 0).flatten().tolist():
            self.params[i].grad = None

    def _rebuild_in_arrival_order(self) -> None:
        """Buckets in rank 0's arrival order (broadcast, so every rank builds the same ones); the
        averaged gradients move into the new buffers."""
        import torch.distributed as dist

        order = [*self._arrival, *(i for i in reversed(range(len(self.params))) if i not in self._arrival)]
        shared = torch.tensor(order, dtype=torch.int64, device=self.buckets[0].buffer.device)
        dist.broadcast(shared, src=0, group=self.group)
        grads = [p.grad for p in self.params]
        self._build(shared.cpu().tolist())
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views):
                view.copy_(grads[self._order[id(p)]])
                p.grad = view
        self._rebuilt = True
        self._arrival = {}

    def close(self) -> None:
        """Remove the hooks (the run is over)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


#: accelerate's switches (set by ``accelerate launch`` from its config file) for engines that wrap
#: the model and own its training step; hcp runs data parallel, or FSDP (:mod:`.sharding`).
SHARDED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def refuse_sharded_engines(environ: Mapping[str, str], distributed_type: Optional[str] = None) -> None:
    """A clear :class:`~hcp_core.errors.UserError` when accelerate is configured for DeepSpeed or
    Megatron-LM (``environ``: the launch's environment; ``distributed_type``: the accelerator's).

    These engines wrap the model and run its step themselves; hcp averages gradients itself (this
    module) or shards the denoiser with FSDP (:mod:`.sharding`), so running under such a config
    would silently not do what the config says.
    """
    from ..errors import UserError

    asked = [name for var, name in SHARDED_ENGINES.items() if str(environ.get(var, "")).lower() in ("1", "true", "yes")]
    if distributed_type in ("DEEPSPEED", "MEGATRON_LM"):
        asked.append(distributed_type)
    if asked:
        raise UserError(
            f"accelerate is configured for {asked[0]}, which hcp does not support: hcp trains data-parallel (every "
            "process holds the whole model; gradients are averaged in overlapped buckets) or, for full fine-tunes "
            "too big for that, with FSDP. Use an accelerate config with distributed_type: MULTI_GPU (or `torchrun "
            "--nproc_per_node N -m hcp_core run ...`), or distributed_type: FSDP to shard the denoiser's trained "
            "weights, gradients and optimizer state (docs/training.md, 'Several processes')")


def grad_sync_for(accelerator: Any, params: Sequence[torch.nn.Parameter]) -> Optional[GradSync]:
    """A :class:`GradSync` over ``params`` when several processes train them, else None."""
    if accelerator.num_processes == 1 or not params:
        return None
    return GradSync(params, accelerator.num_processes)
