"""The pieces under checkpoints, without a model: the trainer-state files (no pickle), sealed
directories (manifest, damage named), atomic replacement, DCP metadata read through an allow-list,
and the signal guard."""

from __future__ import annotations

import os
import pickle
import random
import re
import signal

import pytest
import torch

from ppo import durable
from ppo.interrupt import StopOnSignal, TrainingInterrupted
from ppo.state_file import (
    LEGACY_STATE,
    STATE_JSON,
    UnsafeCheckpointError,
    read_state,
    write_state,
)


def test_trainer_state_round_trips_exactly_without_pickle(tmp_path):
    random.seed(5)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "step": 3,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "optimizer": opt.state_dict(),
        "nested": [1.5, float("inf"), None, True, "text", (1, (2, 3))],
        "bf16": torch.arange(4, dtype=torch.bfloat16),
    }
    write_state(tmp_path, state)
    assert b"pickle" not in (tmp_path / STATE_JSON).read_bytes()
    back = read_state(tmp_path)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # betas stay a tuple
    assert set(back["optimizer"]["state"]) == {0, 1}  # parameter ids stay ints
    for pid, entry in state["optimizer"]["state"].items():
        assert all(torch.equal(back["optimizer"]["state"][pid][k], v) for k, v in entry.items())
    assert (
        back["nested"] == state["nested"]
        and back["bf16"].dtype == torch.bfloat16
        and torch.equal(back["bf16"], state["bf16"])
    )
    expected = random.random()
    random.setstate(back["rng"]["python"])
    assert random.random() == expected
    opt.load_state_dict(back["optimizer"])  # an optimizer takes it back


def test_state_that_would_need_pickle_is_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"trainer state at /extra: cannot store a object"):
        write_state(tmp_path, {"extra": object()})


def test_plain_legacy_state_loads_but_one_that_needs_code_is_refused(tmp_path):
    torch.save({"global_step": 4, "rng": torch.get_rng_state()}, tmp_path / LEGACY_STATE)
    assert read_state(tmp_path)["global_step"] == 4
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"global_step": Evil()}, tmp_path / LEGACY_STATE)
    with pytest.raises(UnsafeCheckpointError, match=r"trainer_state.pt is a pickle that would run code when loaded"):
        read_state(tmp_path)
    assert not marker.exists()


def sealed(tmp_path):
    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"x" * 100)
    (root / "sub" / "b.txt").write_text("hello")
    durable.seal(root)
    return root


@pytest.mark.parametrize(
    "damage, problem",
    [
        (
            lambda r: (r / "a.bin").write_bytes(b"x" * 50),
            r"a.bin is truncated or altered \(50 bytes, the manifest says 100\)",
        ),
        (lambda r: (r / "a.bin").write_bytes(b"y" * 100), r"a.bin is corrupt"),
        (lambda r: (r / "sub" / "b.txt").unlink(), r"sub/b.txt is missing"),
        (
            lambda r: (r / durable.MANIFEST).unlink(),
            r"manifest.json is missing \(the directory was not completely written\)",
        ),
        (lambda r: (r / durable.MANIFEST).write_text("{"), r"manifest.json is damaged"),
    ],
)
def test_a_sealed_directory_names_what_is_wrong(tmp_path, damage, problem):
    root = sealed(tmp_path)
    assert durable.problem(root) is None
    damage(root)
    assert re.match(problem, durable.problem(root)), durable.problem(root)


def test_publish_replaces_a_directory_whole_and_leaves_nothing_behind(tmp_path):
    old = tmp_path / "step_2"
    old.mkdir()
    (old / "stale").write_text("old")
    new = durable.fresh_tmp(tmp_path, "step_2")
    (new / "fresh").write_text("new")
    durable.seal(new)
    durable.publish(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["fresh", durable.MANIFEST]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]
    durable.write_text(tmp_path / "latest", "step_2")
    assert (tmp_path / "latest").read_text() == "step_2" and not (tmp_path / "latest.tmp").exists()


def test_dcp_metadata_is_read_through_an_allow_list(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from ppo.checkpoint_dcp import _safe_load

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(
            {"m": get_model_state_dict(model), "o": get_optimizer_state_dict(model, opt)},
            checkpoint_id=tmp_path / "dcp",
        )
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters())
    state = {"m": get_model_state_dict(other), "o": get_optimizer_state_dict(other, other_opt)}
    _safe_load(state, tmp_path / "dcp")
    assert torch.equal(state["m"]["weight"], model.weight.detach())
    assert state["o"]["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]  # a non-tensor entry, read as plain data
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load posix.mkdir"):
        _safe_load(state, tmp_path / "dcp")
    assert not marker.exists()


def test_first_signal_asks_to_stop_second_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM
        with pytest.raises(TrainingInterrupted) as err:
            os.kill(os.getpid(), signal.SIGINT)
        assert err.value.abandoned and err.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_metrics_write_error_names_the_file(tmp_path, monkeypatch):
    import errno
    import pathlib

    from ppo.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path)

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "open", full_disk)
    with pytest.raises(
        OSError, match=rf"could not append step 3 to {re.escape(str(tmp_path / 'metrics.jsonl'))}: No space left"
    ):
        logger.log(3, {"kl": 0.1})


def test_saves_print_no_transformers_bars_and_leave_their_setting_alone(tiny_policy, tiny_tokenizer, tmp_path, capfd):
    import transformers

    from ppo.checkpoint import save_critic, save_model_dir

    hf_logging = transformers.utils.logging
    hf_logging.enable_progress_bar()  # as in a user's process (the suite turns them off)
    tiny_policy.save_pretrained(tmp_path / "plain")  # transformers' own save draws its bar
    assert "Writing model shards" in capfd.readouterr().err  # so the check below can fail
    save_model_dir(tmp_path / "policy", tiny_policy, tiny_tokenizer)
    save_critic(tmp_path / "critic", tiny_policy)
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored as found
    hf_logging.disable_progress_bar()
    save_model_dir(tmp_path / "again", tiny_policy, tiny_tokenizer)
    assert not hf_logging.is_progress_bar_enabled()
