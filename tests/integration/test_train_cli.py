"""`python -m ppo.train` / `ppo-rlhf train` on models and files made on the fly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ppo.cli import main as cli_main
from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model
from ppo.stage import normalise_argv
from ppo.train import main as train_main


@pytest.fixture
def run_dirs(tmp_path, tiny_tokenizer):
    build_policy(tiny_tokenizer, TinyModelSpec(), seed=0).save_pretrained(tmp_path / "policy")
    tiny_tokenizer.save_pretrained(tmp_path / "policy")
    build_reward_model(tiny_tokenizer, TinyModelSpec(), seed=1).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.txt").write_text("w3 w4\nw5\n\nw6 w7 w8\nw9\n", encoding="utf-8")
    (tmp_path / "rewards.py").write_text(
        "def has_w1(completions, **kw):\n    return [float('w1' in c.split()) for c in completions]\n"
    )
    return tmp_path


def test_normalise_argv_accepts_every_spelling():
    assert normalise_argv(
        ["--model_name", "m", "--kl_coef=0.2", "batch_size=2", "--overwrite", "--config", "c.yaml"]
    ) == ["model_name_or_path=m", "kl_coef=0.2", "batch_size=2", "overwrite=true", "--config", "c.yaml"]


def test_train_flags_end_to_end_then_refuse_rerun(run_dirs, capsys):
    out = run_dirs / "out"
    argv = [
        "--model_name",
        str(run_dirs / "policy"),
        "--reward_model_path",
        str(run_dirs / "rm"),
        "--prompts_file",
        str(run_dirs / "prompts.txt"),
        "--learning_rate",
        "1e-4",
        "--batch_size",
        "2",
        "--num_epochs",
        "1",
        "--ppo_epochs",
        "1",
        "--kl_coef",
        "0.05",
        "--output_dir",
        str(out),
        "--save_steps",
        "1",
        f"reward_funcs=[{run_dirs / 'rewards.py'}:has_w1]",
        "max_new_tokens=3",
        "progress_bar=false",
    ]
    assert train_main(argv) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]  # 4 prompts, batch 2
    assert "rewards/has_w1" in lines[0] and "rewards/reward_model" in lines[0]
    assert (out / "final" / "config.json").exists() and (out / "step_2" / "trainer_state.json").exists()
    assert (out / "config.yaml").exists()
    # A different run into the same directory is refused, and nothing there changes.
    before = (out / "metrics.jsonl").read_text()
    assert train_main(argv[:-2] + ["max_new_tokens=4", "progress_bar=false"]) == 1
    assert "holds a different run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


def test_max_steps_stops_the_run_inside_its_epochs(run_dirs):
    out = run_dirs / "out"
    argv = [
        f"model_name_or_path={run_dirs / 'policy'}",
        f"prompts_file={run_dirs / 'prompts.txt'}",
        f"reward_funcs=[{run_dirs / 'rewards.py'}:has_w1]",
        "batch_size=1",
        "num_epochs=2",  # 8 steps of one prompt, cut at 3
        "max_steps=3",
        "max_new_tokens=2",
        "progress_bar=false",
        f"output_dir={out}",
    ]
    assert train_main(argv) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "final" / "config.json").exists()
    assert train_main([*argv[:-1], "max_steps=0", f"output_dir={run_dirs / 'zero'}"]) == 2


def test_misspelt_key_and_unknown_stage(run_dirs, capsys):
    assert train_main(["--learning_rat", "0.1"]) == 2
    assert "Did you mean 'learning_rate'" in capsys.readouterr().err
    assert cli_main(["trian"]) == 2
    assert "Did you mean 'train'" in capsys.readouterr().err


def test_a_causal_lm_as_reward_model_is_refused(run_dirs, capsys):
    argv = [
        "--model_name",
        str(run_dirs / "policy"),
        "--reward_model_path",
        str(run_dirs / "policy"),
        "--prompts_file",
        str(run_dirs / "prompts.txt"),
        "--output_dir",
        str(run_dirs / "o2"),
    ]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert "not a sequence classifier" in err
    # the advice is one PPO can follow: train a reward model first (PPO has no init_from_policy key)
    assert f"ppo-rlhf reward model_name_or_path={run_dirs / 'policy'} init_from_policy=true" in err
    assert "reward_funcs" in err
    assert not (run_dirs / "o2").exists()


def test_empty_or_non_utf8_prompts_file(run_dirs, capsys):
    (run_dirs / "empty.txt").write_text("\n\n")
    (run_dirs / "latin.txt").write_bytes(b"caf\xe9\n")
    for name in ["empty.txt", "latin.txt"]:
        argv = [
            "--model_name",
            str(run_dirs / "policy"),
            "--prompts_file",
            str(run_dirs / name),
            "reward_funcs=[length_penalty]",
            "--output_dir",
            str(run_dirs / f"o-{name}"),
        ]
        assert train_main(argv) == 1
        assert name in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_and_console_script_agree(run_dirs):
    base = [
        "--model_name",
        str(run_dirs / "policy"),
        "--prompts_file",
        str(run_dirs / "prompts.txt"),
        "reward_funcs=[length_penalty]",
        "max_new_tokens=2",
        "ppo_epochs=1",
        "progress_bar=false",
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    a = subprocess.run(
        [sys.executable, "-m", "ppo.train", *base, f"output_dir={run_dirs / 'a'}"],
        capture_output=True,
        text=True,
        env=env,
    )
    b = subprocess.run(
        [sys.executable, "-m", "ppo.cli", "train", *base, f"output_dir={run_dirs / 'b'}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    assert (run_dirs / "a" / "metrics.jsonl").read_text().count("\n") == 1
    ma = json.loads((run_dirs / "a" / "metrics.jsonl").read_text())
    mb = json.loads((run_dirs / "b" / "metrics.jsonl").read_text())
    assert ma["mean_reward"] == mb["mean_reward"]


def test_progress_bar_false_means_no_bars_from_transformers_either(run_dirs, capfd):
    import transformers

    hf_logging = transformers.utils.logging
    hf_logging.enable_progress_bar()  # as in a user's shell (the suite turns them off)
    argv = [
        f"model_name_or_path={run_dirs / 'policy'}",
        f"reward_model_path={run_dirs / 'rm'}",
        f"prompts_file={run_dirs / 'prompts.txt'}",
        "batch_size=2",
        "max_steps=1",
        "ppo_epochs=1",
        "max_new_tokens=3",
        "save_steps=1",
        "progress_bar=false",
        f"output_dir={run_dirs / 'out'}",
    ]
    assert train_main(argv) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err and "it/s" not in err, err[-2000:]
    assert hf_logging.is_progress_bar_enabled()  # the user's setting, restored after the run
    hf_logging.disable_progress_bar()
