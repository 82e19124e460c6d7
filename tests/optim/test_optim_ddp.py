"""Under DDP the filter sees the averaged gradient, so every rank holds the same Grokfast state."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cognate.optim import GrokfastConfig, MuGrokfastConfig, make_optimizer

CONFIG = MuGrokfastConfig(
    adamw_lr=1e-2, muon_lr=2e-2, grokfast=GrokfastConfig(kind="ema", alpha=0.9, lamb=2.0)
)
STEPS, WORLD = 3, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 1, generator=generator)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = make_model()
    ddp = DistributedDataParallel(model)
    optimizer = make_optimizer(model, "mugrokfast", CONFIG)
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        x, y = batch(step, rank)  # each rank sees different data
        nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()
    torch.save(optimizer.state_dict()["grokfast"], f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_hold_identical_filter_state_equal_to_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert states[0]["steps"] == states[1]["steps"] == STEPS
    for index, saved in states[0]["state"].items():
        assert torch.equal(saved["ema"], states[1]["state"][index]["ema"])

    # One process on both ranks' data at once: the mean loss over the union has the averaged gradient.
    model = make_model()
    optimizer = make_optimizer(model, "mugrokfast", CONFIG)
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        x, y = (torch.cat(parts) for parts in zip(*(batch(step, r) for r in range(WORLD))))
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    single = optimizer.state_dict()["grokfast"]["state"]
    for index, saved in states[0]["state"].items():
        torch.testing.assert_close(saved["ema"], single[index]["ema"], rtol=1e-5, atol=1e-6)
