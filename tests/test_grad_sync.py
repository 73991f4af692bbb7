"""Bucketed, overlapped gradient averaging (hcp_core/train/grad_sync.py) on two gloo CPU processes.

Each rank trains a small model on its own data with two micro-steps of gradient accumulation; the
averaged gradients must equal the mean of both ranks' gradients computed here in one process. One
tensor is unused on rank 1 only (it joins with zeros), one is unused everywhere (its gradient
stays None, as in a one-process run), and on one micro-step rank 1 has no backward at all.
Buckets are made tiny so that several reductions overlap backward; gradients are views into the
bucket buffers (no second copy).
"""
from __future__ import annotations

import os
import socket
from typing import Dict, List

import torch
import torch.multiprocessing as mp

from hcp_core.train.grad_sync import GradSync, make_buckets


def _model() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "a": torch.nn.Linear(6, 5), "b": torch.nn.Linear(5, 4),
        "only_rank0": torch.nn.Linear(4, 4, bias=False), "never": torch.nn.Linear(3, 3, bias=False),
    })


def _micro_losses(model: torch.nn.ModuleDict, rank: int) -> List[torch.Tensor | None]:
    """The two micro-step losses of ``rank`` (None: no backward on that micro-step)."""
    out: List[torch.Tensor | None] = []
    for micro in range(2):
        if rank == 1 and micro == 0:
            out.append(None)
            continue
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(100 * rank + micro))
        h = model["b"](torch.tanh(model["a"](x)))
        if rank == 0:
            h = model["only_rank0"](h)
        out.append((h ** 2).mean() / 2)
    return out


def _local_grads(rank: int) -> Dict[str, torch.Tensor]:
    model = _model()
    for loss in _micro_losses(model, rank):
        if loss is not None:
            loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        params = list(model.parameters())
        sync = GradSync(params, 2, bucket_bytes=64)  # ~16 floats: several buckets
        launched_in_backward = []
        for _ in range(2):  # the first step rebuilds the buckets in rank 0's arrival order
            losses = _micro_losses(model, rank)
            for micro, loss in enumerate(losses):
                sync.micro_step(micro, len(losses))
                if loss is not None:
                    loss.backward()
            launched_in_backward.append(sum(b.work is not None for b in sync.buckets))
            sync.finish()
            grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
            views = all(p.grad is None or any(p.grad.data_ptr() == v.data_ptr() for b in sync.buckets for v in b.views)
                        for p in params)
            model.zero_grad(set_to_none=True)  # what the loop's optimizer.zero_grad does
        torch.save({"grads": grads,
                    "launched": launched_in_backward, "buckets": len(sync.buckets), "views": views},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        sync.close()
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_the_mean_gradient_with_accumulation_and_unused_tensors(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: no second import of torch (a spawned process takes seconds to start on a loaded machine)
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    local = [_local_grads(r) for r in range(2)]
    for name in results[0]["grads"]:
        got = [r["grads"][name] for r in results]
        if name.startswith("never"):
            assert got == [None, None]  # no process trained it: the optimizer skips it, as in one process
            continue
        expected = (local[0][name] + local[1].get(name, torch.zeros_like(local[0][name]))) / 2
        assert torch.equal(got[0], got[1]), name
        assert torch.allclose(got[0], expected, atol=1e-7, rtol=0), name
    assert results[0]["buckets"] >= 4 and all(r["views"] for r in results)
    # Second step, buckets in arrival order: rank 0's backward fills every bucket but the one of the
    # tensor no rank uses, and they go out during backward (with registration order the unused
    # tensor's bucket came first and held back every other one).
    assert results[0]["launched"][1] == results[0]["buckets"] - 1


def test_buckets_respect_the_size_and_keep_one_dtype_each() -> None:
    params = [torch.nn.Parameter(torch.zeros(n, dtype=d)) for n, d in
              [(10, torch.float32), (10, torch.float32), (100, torch.float32), (4, torch.float16), (4, torch.float32)]]
    buckets = make_buckets(params, bucket_bytes=80)
    assert sorted(i for b in buckets for i in b) == list(range(5))
    for b in buckets:
        assert len({params[i].dtype for i in b}) == 1
        assert len(b) == 1 or sum(params[i].numel() * params[i].element_size() for i in b) <= 80
    assert buckets[0][0] == 4  # last tensors first: backward produces them first


def test_deepspeed_and_megatron_from_accelerate_config_are_refused(tmp_path, demo_model_dir, demo_data_dir,
                                                                    monkeypatch, capsys) -> None:
    import pytest

    from hcp_core import cli
    from hcp_core.errors import UserError
    from hcp_core.train.grad_sync import refuse_sharded_engines
    from train_support import pipeline_toml, write_pipeline

    refuse_sharded_engines({"ACCELERATE_USE_DEEPSPEED": "false"}, "MULTI_GPU")  # plain data parallel: fine
    refuse_sharded_engines({"ACCELERATE_USE_FSDP": "true"}, "MULTI_GPU")  # FSDP: hcp shards itself (sharding.py)
    with pytest.raises(UserError, match="accelerate is configured for DeepSpeed, which hcp does not support"):
        refuse_sharded_engines({"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(UserError, match="configured for MEGATRON_LM"):
        refuse_sharded_engines({}, "MEGATRON_LM")
    # What `accelerate launch --config_file deepspeed.yaml` sets: refused at start-up, before the model loads.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=1))
    assert cli.main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "accelerate is configured for DeepSpeed" in err and "distributed_type: FSDP" in err
    assert not (tmp_path / "exp" / "config.toml").exists()
