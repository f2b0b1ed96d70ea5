"""`ppo-rlhf demo` in its quick form: the stages chain, the outputs load, the report is written.

The quick run (tiny data, a few steps) is a smoke test of the pipeline: nothing here asserts the
quality targets, which only the full demo is tuned to reach (its numbers are in the README).
"""

from __future__ import annotations

import json

import pytest
import torch

from ppo.config import DemoConfig
from ppo.demo.run import main, run_demo


def quick_config(path, **overrides) -> DemoConfig:
    values = dict(
        output_dir=str(path), quick=True, progress_bar=False, threads=1, refresh_at=0.5
    )  # the online round too
    values.update(overrides)
    return DemoConfig(**values)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    try:
        summary = run_demo(quick_config(out))
    finally:
        torch.set_num_threads(threads)
    return out, summary


def test_every_stage_directory_loads_as_a_plain_hugging_face_model(quick_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out, _ = quick_run
    for policy_dir in (out / "base", out / "sft" / "final", out / "ppo" / "final"):
        assert isinstance(AutoModelForCausalLM.from_pretrained(policy_dir), torch.nn.Module)
        assert AutoTokenizer.from_pretrained(policy_dir).eos_token == "<eos>"
    reward = AutoModelForSequenceClassification.from_pretrained(out / "reward" / "final")
    assert reward.config.num_labels == 1
    # Each stage wrote its effective config next to its outputs.
    for stage in ("", "sft", "reward", "ppo"):
        assert (out / stage / "config.yaml").is_file()


def test_the_stages_chain(quick_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out, summary = quick_run
    base = AutoModelForCausalLM.from_pretrained(out / "base").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(out / "sft" / "final").state_dict()
    ppo = AutoModelForCausalLM.from_pretrained(out / "ppo" / "final").state_dict()
    reward = AutoModelForSequenceClassification.from_pretrained(out / "reward" / "final").state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[name], sft[name])  # SFT trained the base model
    assert not torch.equal(sft[name], ppo[name])  # PPO started from SFT and moved it
    assert not torch.equal(sft[name], reward[name])  # the RM's backbone trained on from SFT's
    refreshed = AutoModelForSequenceClassification.from_pretrained(out / "reward_refresh" / "final").state_dict()
    assert not torch.equal(reward[name], refreshed[name])  # the mid-PPO refresh trained the reward model on
    assert summary["reward"]["refresh"]["pairs"] > 0
    assert summary["reward"]["accuracy"] == summary["reward"]["refresh"]["accuracy_all"]  # the RM that PPO ended with
    lines = (out / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["ppo"]["steps"] == summary["plan"]["ppo_steps"]
    assert {"proxy", "gold", "kl", "entropy", "response_length"} <= set(json.loads(lines[0]))


def test_summary_and_report_hold_the_table(quick_run):
    out, summary = quick_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["eval"] == summary["eval"]
    assert set(on_disk["eval"]) == {"sft", "best_of_4", "ppo"}
    for result in on_disk["eval"].values():
        for key in ("rewards/reward_model", "rewards/gold_reward", "kl", "rm_accuracy", "response_length"):
            assert key in result
        assert 0.0 <= result["rewards/gold_reward"] <= 100.0
    assert on_disk["eval"]["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)  # SFT against itself
    assert [t["name"] for t in on_disk["targets"]][0] == "whole demo time"
    assert {"2 SFT", "3 reward model", "4 PPO", "5 evaluation", "total"} <= set(on_disk["times"])
    report = (out / "report.md").read_text()
    for row in ("| SFT (sampled) |", "| best-of-4 from SFT |", "| PPO |", "report.png", "## Sample generations"):
        assert row in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_run(quick_run, tmp_path):
    _, first = quick_run
    threads = torch.get_num_threads()
    try:
        again = run_demo(quick_config(tmp_path / "again"))
    finally:
        torch.set_num_threads(threads)
    assert again["eval"] == first["eval"]
    assert again["ppo"]["history"] == first["ppo"]["history"]
    assert again["samples"] == first["samples"]


def test_cli_refuses_another_run_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 3\n")
    (out / "notes.txt").write_text("someone else's run\n")
    before = sorted((p.name, p.read_text()) for p in out.iterdir())
    assert main([f"output_dir={out}", "quick=true", "progress_bar=false", "threads=1"]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert sorted((p.name, p.read_text()) for p in out.iterdir()) == before


def test_cli_misspelt_key_names_the_close_match(tmp_path, capsys):
    assert main([f"output_dir={tmp_path / 'x'}", "quik=true"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'quik'" in err and "Did you mean 'quick'" in err
    assert not (tmp_path / "x").exists()
