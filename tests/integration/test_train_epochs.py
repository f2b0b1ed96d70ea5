"""`PPOTrainer.train(prompts)` runs the config's `num_epochs`; an explicit argument wins."""

from __future__ import annotations

import pytest

from ppo import PPOConfig, PPOTrainer

PROMPTS = ["w3 w4", "w5 w6", "w2", "w8 w9", "w7"]  # batch_size 2: three batches an epoch (the last short)


def count_w1(completions, **kwargs):
    return [float(c.split().count("w1")) for c in completions]


def trainer_for(tiny_policy, tiny_tokenizer, tmp_path, **overrides):
    config = PPOConfig(
        batch_size=2,
        max_new_tokens=2,
        ppo_epochs=1,
        progress_bar=False,
        precision="fp32",
        fp32_matmul="mkl",
        output_dir=str(tmp_path),
        **overrides,
    )
    return PPOTrainer(config, tiny_policy, tiny_tokenizer, reward_funcs=count_w1)


@pytest.mark.parametrize("config_epochs, argument, expected_steps", [(2, None, 6), (2, 1, 3), (1, 2, 6)])
def test_train_runs_the_config_epochs_unless_told(
    tiny_policy, tiny_tokenizer, tmp_path, config_epochs, argument, expected_steps
):
    trainer = trainer_for(tiny_policy, tiny_tokenizer, tmp_path, num_epochs=config_epochs)
    history = trainer.train(PROMPTS) if argument is None else trainer.train(PROMPTS, num_epochs=argument)
    assert len(history) == expected_steps == trainer.global_step
    assert history[-1]["epoch"] == pytest.approx(expected_steps / 3)


def test_on_step_sees_each_batch_and_its_metrics_are_logged_and_max_steps_stops(tiny_policy, tiny_tokenizer, tmp_path):
    import json

    trainer = trainer_for(tiny_policy, tiny_tokenizer, tmp_path, num_epochs=3)
    seen = []

    def on_step(stats, rows):
        seen.append([r["prompt"] for r in rows])
        return {"texts_seen": len(stats["generated_texts"])}

    history = trainer.train(PROMPTS, on_step=on_step, max_steps=4)
    assert len(history) == len(seen) == 4 == trainer.global_step
    assert sorted(p for batch in seen[:3] for p in batch) == sorted(PROMPTS)  # epoch 1: every prompt once
    assert [h["texts_seen"] for h in history] == [len(b) for b in seen]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["texts_seen"] for line in logged] == [len(b) for b in seen]
    assert (tmp_path / "final" / "config.json").exists()


def test_a_second_run_into_the_same_output_dir_is_refused_unless_overwrite(tiny_policy, tiny_tokenizer, tmp_path):
    """From Python as from the CLI: a new run does not mix its checkpoints and final model with an
    earlier run's; overwrite=True replaces them."""
    import copy

    from ppo.stage import OutputDirError

    trainer_for(copy.deepcopy(tiny_policy), tiny_tokenizer, tmp_path, save_steps=2).train(PROMPTS)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert {"final", "step_2", "metrics.jsonl"} <= before.keys()
    second = trainer_for(copy.deepcopy(tiny_policy), tiny_tokenizer, tmp_path, seed=1)
    with pytest.raises(OutputDirError, match=r"already holds a run's outputs \(final, latest, step_2\)"):
        second.train(PROMPTS)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing touched
    third = trainer_for(copy.deepcopy(tiny_policy), tiny_tokenizer, tmp_path, overwrite=True)
    third.train(PROMPTS, max_steps=1)
    assert not list(tmp_path.glob("step_*")) and (tmp_path / "final").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
