"""`ppo.create_trainer`: names and paths in, a trainer and its prompts out."""

import json

import pytest

import ppo
from ppo.config import ConfigError
from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model


@pytest.fixture
def dirs(tmp_path, tiny_tokenizer):
    build_policy(tiny_tokenizer, TinyModelSpec(), seed=0).save_pretrained(tmp_path / "policy")
    tiny_tokenizer.save_pretrained(tmp_path / "policy")
    build_reward_model(tiny_tokenizer, TinyModelSpec(), seed=1).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    rows = [{"prompt": "w3 w4", "answer": "w5"}, {"prompt": [{"role": "user", "content": "w6"}], "answer": "w7"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_create_trainer_with_model_and_functions(dirs):
    def always_one(completions, **kwargs):
        return [1.0] * len(completions)

    trainer, prompts = ppo.create_trainer(
        model_name=str(dirs / "policy"),
        dataset_name=str(dirs / "data.jsonl"),
        reward_model_name=str(dirs / "rm"),
        reward_functions=["exact_match", always_one],
        reward_function_weights=[0.0, 1.0, 2.0],
        batch_size=2,
        max_new_tokens=3,
        progress_bar=False,
        output_dir=str(dirs / "out"),
    )
    assert [p["answer"] for p in prompts] == ["w5", "w7"]
    assert trainer.rewards.names == ["reward_model", "exact_match", "always_one"]
    stats = trainer.step([p["prompt"] for p in prompts], extras={"answer": [p["answer"] for p in prompts]})
    assert stats["mean_reward"] == pytest.approx(stats["rewards/exact_match"] + 2.0)


def test_create_trainer_rejects_misspelt_keys_and_missing_rewards(dirs):
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        ppo.create_trainer(model_name=str(dirs / "policy"), reward_functions=["length_penalty"], batchsize=2)
    with pytest.raises(ValueError, match="reward_model_name and/or reward_functions"):
        ppo.create_trainer(model_name=str(dirs / "policy"))
