"""A converted model under DDP and FSDP2 (fully_shard), 2 CPU processes with gloo: the gradients equal
a single-process run on the whole batch."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lowmem_ops as lo

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not dist.is_available(), reason="gloo on Linux")


def model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 32),
                            torch.nn.SiLU(), torch.nn.Linear(32, 4))
    report = lo.convert(m, example_inputs=torch.randn(4, 16))
    assert len(report.applied) == 3
    return m


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def reference_grads():
    m = model()
    x, y = batch()
    torch.nn.functional.mse_loss(m(x), y).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def _worker(rank, world, port, kind, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = model()
        x, y = batch()
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        if kind == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(m)
            torch.nn.functional.mse_loss(wrapped(x), y).backward()
            grads = {n: p.grad for n, p in m.named_parameters()}
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in m:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer)
            fully_shard(m)
            torch.nn.functional.mse_loss(m(x), y).backward()
            grads = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
        if rank == 0:
            torch.save({n: g.detach().clone() for n, g in grads.items()}, os.path.join(out_dir, f"{kind}.pt"))
        dist.barrier()  # neither rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's normal exit: gloo's threads occasionally abort it ("terminate
    # called without an active exception", SIGABRT) after all the work is done and saved.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_gradients_match_single_process(kind, tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), kind, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(tmp_path / f"{kind}.pt")
    want = reference_grads()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
