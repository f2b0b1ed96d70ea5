"""`ppo.distributed` in one process is a set of no-ops, and the rank arithmetic of the loops (which
rows each rank takes) is right for any rank; no process is launched here."""

from __future__ import annotations

import pytest
import torch

from ppo import distributed as dist
from ppo.loop import batch_bounds
from ppo.stage import rank_micro_batches


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init_from_env() is False
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    model = torch.nn.Linear(3, 2)
    assert dist.wrap(model, "fsdp") is model and dist.wrap(model, "ddp") is model and dist.unwrap(model) is model
    assert dist.wrap_frozen(model, "fsdp") is model and dist.full_state_dict(model) is None
    with dist.full_weights(model), dist.gradient_sync([model], enabled=False):
        model(torch.ones(1, 3)).sum().backward()
    assert model.weight.grad is not None  # no no_sync without DDP: the gradient is just there
    with pytest.raises(ValueError, match="strategy"):
        dist.wrap(model, "zero3")


def test_one_process_collectives_return_their_input():
    x = torch.arange(6.0).reshape(2, 3)
    assert dist.all_gather_rows(x) is x
    assert dist.all_gather_objects(["a"]) == [["a"]]
    assert dist.all_reduce_mean({"b": torch.tensor(0.1), "a": 2.0}) == {"a": 2.0, "b": torch.tensor(0.1).item()}
    assert dist.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert dist.shard_slice(5) == slice(0, 5)


def test_forward_as_routes_a_call_through_a_module():
    model = torch.nn.Linear(3, 1)
    call = dist.ForwardAs(model, lambda x: model(x)[:, 0])  # a view of the output...
    out = call(torch.ones(2, 3))
    assert not out._is_view() and list(call.parameters()) == list(model.parameters())  # ...handed back as its own


@pytest.mark.parametrize(
    "n, world, expected",
    [
        (10, 1, [(0, 4), (4, 8), (8, 10)]),  # one process keeps the short last batch
        (10, 2, [(0, 4), (4, 8), (8, 10)]),  # 2 rows split evenly over 2 ranks
        (9, 2, [(0, 4), (4, 8)]),  # a last batch of 1 prompt cannot be shared by 2 ranks
        (11, 2, [(0, 4), (4, 8), (8, 10)]),  # 3 -> 2 prompts
    ],
)
def test_batch_bounds_give_every_rank_an_equal_share(n, world, expected):
    assert batch_bounds(n, 4, world) == expected


def test_batch_size_must_divide_over_ranks():
    with pytest.raises(ValueError, match="multiple of the 2 ranks"):
        batch_bounds(10, 3, 2)


def test_rank_micro_batches_match_in_number_across_ranks(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    items = list("abcde")  # rank 0: a b, rank 1: c d e; batches of 2 -> 2 micro-batches each
    monkeypatch.setattr(dist, "rank", lambda: 0)
    assert rank_micro_batches(items, 2) == [(["a", "b"], 1.0), (["a"], 0.0)]  # zero-weight filler
    monkeypatch.setattr(dist, "rank", lambda: 1)
    assert rank_micro_batches(items, 2) == [(["c", "d"], 1.0), (["e"], 1.0)]
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    assert rank_micro_batches(items, 2) == [(["a", "b"], 1.0), (["c", "d"], 1.0), (["e"], 1.0)]
