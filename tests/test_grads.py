"""Partial-sum gradients are reduced once per layout before the optimizer (2 gloo ranks)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from meshplan.runtime.grads import reduce_partial_grads

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    params = []
    for n, place in ((3, Partial()), (5, Partial()), (4, Shard(0))):
        held = place if isinstance(place, Shard) else Replicate()
        p = torch.nn.Parameter(DTensor.from_local(torch.zeros(n), mesh, [held]))
        p.grad = DTensor.from_local(torch.full((n,), float(rank + 1)), mesh, [place],
                                    run_check=False)
        params.append(p)
    ran = reduce_partial_grads(params)
    if rank == 0:
        torch.save({"ran": ran, "placements": [p.grad.placements for p in params],
                    "values": [p.grad.to_local() for p in params]}, out)
    dist.destroy_process_group()


def test_partial_gradients_are_summed_in_one_collective(tmp_path):
    import torch.multiprocessing as mp
    from torch.distributed.tensor import Replicate, Shard

    out = tmp_path / "out.pt"
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    assert got["ran"] == 1  # both partial gradients share one layout: one all-reduce
    assert got["placements"] == [(Replicate(),), (Replicate(),), (Shard(0),)]
    assert torch.equal(got["values"][0], torch.full((3,), 3.0))  # 1 + 2
    assert torch.equal(got["values"][1], torch.full((5,), 3.0))
    assert torch.equal(got["values"][2], torch.full((4,), 1.0))  # not partial: untouched
