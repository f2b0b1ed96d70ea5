"""A table of bad inputs through the CLI (`ppo-rlhf <stage> ...`, in-process) and the Python API.

Each case ends with a non-zero exit (or the exception), a message naming the problem, and every
file under the test's directory - the inputs, a finished earlier run, a user's notes - byte for
byte as it was (hashed before and after). Cases whose run starts (a reward function that fails in
the first step) write into a fresh directory of their own, which must hold no model afterwards.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from ppo import PPOConfig, PPOTrainer
from ppo.cli import main as cli_main
from ppo.config import ConfigError, RewardConfig, SFTConfig, load_config, save_config
from ppo.demo.tiny import (
    TinyModelSpec,
    build_policy,
    build_reward_model,
    build_tokenizer,
)
from ppo.formats import DataFormatError, load_preference_rows
from ppo.rewards import RewardFunctionError
from ppo.stage import OutputDirError, normalise_argv

WORDS = [f"w{i}" for i in range(29)] + ["user", "assistant", ":"]

REWARDS_PY = """
import sys, time

def exits(completions, **kw):
    sys.exit(3)

def hangs(completions, **kw):
    time.sleep(120)

def strings(completions, **kw):
    return ["0.5"] * len(completions)

def huge(completions, **kw):
    return [1e30] * len(completions)

def nones(completions, **kw):
    return [None] * len(completions)
"""


def base(root: Path) -> list[str]:
    """A PPO run that would work: tiny policy, 4 prompts, a built-in reward."""
    return [
        f"model_name_or_path={root / 'policy'}",
        f"prompts_file={root / 'prompts.txt'}",
        "reward_funcs=[length_penalty]",
        "batch_size=2",
        "max_new_tokens=2",
        "ppo_epochs=1",
        "progress_bar=false",
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    tokenizer = build_tokenizer(WORDS)
    for name, model in (
        ("policy", build_policy(tokenizer, TinyModelSpec(), seed=0)),
        ("rm", build_reward_model(tokenizer, TinyModelSpec(), seed=1)),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "prompts.txt").write_text("w3 w4\nw5\nw6 w7 w8\nw9\n")
    (root / "empty.jsonl").write_text("")
    (root / "broken.jsonl").write_text(
        '{"prompt": "w3"}\n{"prompt": "w4"}\n{"prompt": "w5"} trailing\n{"prompt": "w6"}\n'
    )
    (root / "nocol.jsonl").write_text('{"question": "w3"}\n{"question": "w4"}\n')
    (root / "same.jsonl").write_text(
        '{"prompt": "w1", "chosen": "w2", "rejected": "w2"}\n{"prompt": "w3", "chosen": "w4", "rejected": "w4"}\n'
    )
    (root / "rewards.py").write_text(REWARDS_PY)
    (root / "rewards_bad.py").write_text("def broken(:\n")
    (root / "bad.yaml").write_text("batch_size: 2\nsampling:\n  top_p: 1.5\n")
    # A finished run of exactly `base` (its config.yaml, final/, metrics) beside a user's notes.
    done = root / "done"
    save_config(load_config(PPOConfig, None, normalise_argv(base(root) + [f"output_dir={done}"])), done / "config.yaml")
    (done / "final").mkdir()
    (done / "final" / "model.safetensors").write_bytes(b"the previous run's weights")
    (done / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (done / "notes.txt").write_text("mine, not the run's\n")
    return root


def snapshot(root: Path, skip: set[str] = frozenset()) -> dict[str, str]:
    """Every file's hash and every directory under root (bytecode caches left out)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or rel.parts[0] in skip:
            continue
        found[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


# (id, stage, extra arguments ({root} is the test directory), exit code, fragments of the message)
CASES = [
    # config: refused at load, before any model is read
    ("top_p", "train", ["top_p=1.5"], 2, ["top_p", "1.5", "(0, 1]", "override"]),
    ("mini_batch_negative", "train", ["mini_batch_size=-1"], 2, ["mini_batch_size", "-1", ">= 1"]),
    ("mini_batch_too_big", "train", ["mini_batch_size=8"], 2, ["mini_batch_size", "<= the 2 samples", "8"]),
    ("kl_coef", "train", ["kl_coef=-1"], 2, ["kl_coef", "-1", ">= 0"]),
    ("save_steps", "train", ["save_steps=-1"], 2, ["save_steps", "-1", ">= 0"]),
    ("num_epochs", "train", ["num_epochs=0"], 2, ["num_epochs", ">= 1"]),
    ("batch_size_word", "train", ["batch_size=four"], 2, ["batch_size", "four", "int"]),
    ("yaml_file", "train", ["--config", "{root}/bad.yaml"], 2, ["bad.yaml", "top_p", "1.5"]),
    ("unknown_stage", "trian", [], 2, ["'trian'", "demo, sft, reward, train, eval", "Did you mean 'train'"]),
    (
        "stage_not_first",
        "--config",
        ["{root}/bad.yaml", "train"],
        2,
        ["'--config'", "Put the stage first: ppo-rlhf train --config"],
    ),
    # output directories: nothing of the finished run, the user's notes or the inputs is touched
    (
        "rerun_finished",
        "train",
        ["output_dir={root}/done"],
        1,
        ["finished run", "overwrite=true", "resume_from_checkpoint"],
    ),
    ("other_run", "train", ["output_dir={root}/done", "kl_coef=0.5"], 1, ["different run", "overwrite=true"]),
    (
        "overwrite_typo_model",
        "train",
        ["output_dir={root}/done", "overwrite=true", "model_name_or_path={root}/policy-typo"],
        1,
        ["policy-typo"],
    ),
    (
        "overwrite_typo_prompts",
        "train",
        ["output_dir={root}/done", "overwrite=true", "prompts_file={root}/promts.txt"],
        1,
        ["promts.txt"],
    ),
    (
        "overwrite_broken_data",
        "train",
        ["output_dir={root}/done", "overwrite=true", "prompts_file={root}/broken.jsonl"],
        1,
        ["broken.jsonl", "row 3"],
    ),
    (
        "overwrite_bad_reward_file",
        "train",
        ["output_dir={root}/done", "overwrite=true", "reward_funcs=[{root}/rewards_bad.py:broken]"],
        1,
        ["rewards_bad.py", "failed to load", "SyntaxError"],
    ),
    ("output_is_a_file", "train", ["output_dir={root}/prompts.txt", "overwrite=true"], 1, ["prompts.txt", "is a file"]),
    (
        "output_is_policy",
        "train",
        ["output_dir={root}/policy", "overwrite=true"],
        1,
        ["is this run's model_name_or_path"],
    ),
    (
        "input_in_output",
        "train",
        ["output_dir={root}/done", "overwrite=true", "model_name_or_path={root}/done/final"],
        1,
        ["lies in", "final"],
    ),
    (
        "failed_resume",
        "train",
        ["output_dir={root}/done", "resume_from_checkpoint={root}/done/step_9", "max_new_tokens=3"],
        1,
        ["step_9"],
    ),
    # data
    (
        "empty_jsonl",
        "train",
        ["output_dir={root}/o", "prompts_file={root}/empty.jsonl"],
        1,
        ["empty.jsonl", "is empty"],
    ),
    (
        "broken_jsonl",
        "train",
        ["output_dir={root}/o", "prompts_file={root}/broken.jsonl"],
        1,
        ["broken.jsonl", "row 3", "not valid JSON"],
    ),
    (
        "missing_column",
        "train",
        ["output_dir={root}/o", "prompts_file={root}/nocol.jsonl"],
        1,
        ["nocol.jsonl", "no column 'prompt'", "question"],
    ),
    (
        "sft_empty",
        "sft",
        ["model_name_or_path={root}/policy", "data={root}/empty.jsonl", "output_dir={root}/o"],
        1,
        ["empty.jsonl", "is empty"],
    ),
    (
        "reward_same_pairs",
        "reward",
        ["model_name_or_path={root}/rm", "data={root}/same.jsonl", "output_dir={root}/o"],
        1,
        ["same.jsonl", "chosen equals rejected", "rows 1, 2"],
    ),
]

# Reward functions that fail in the first step (the run has started, in a fresh directory).
REWARD_CASES = [
    ("exits", [], ["'exits'", "sys.exit(3)"]),
    ("hangs", ["reward_timeout_s=1"], ["'hangs'", "reward_timeout_s=1"]),
    ("strings", [], ["'strings'", "'0.5'", "sample 0"]),
    ("huge", [], ["'huge'", "1e+30", "reward_max_abs"]),
    ("nones", [], ["'nones'", "None for all"]),
]


def run_cli(stage: str, args: list[str], capsys) -> tuple[int, str]:
    code = cli_main([stage, *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("stage", "extra", "code", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_refuses_and_changes_nothing(root, capsys, stage, extra, code, fragments):
    args = base(root) if stage == "train" else []
    args = args + [a.replace("{root}", str(root)) for a in extra]
    before = snapshot(root)
    got, err = run_cli(stage, args, capsys)
    assert got == code, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert snapshot(root) == before


@pytest.mark.parametrize(("func", "extra", "fragments"), REWARD_CASES, ids=[c[0] for c in REWARD_CASES])
def test_cli_reward_function_failures_name_the_function(root, capsys, func, extra, fragments):
    out = root / f"fresh-{func}"
    args = base(root) + [f"reward_funcs=[{root / 'rewards.py'}:{func}]", f"output_dir={out}", *extra]
    before = snapshot(root, skip={out.name})
    got, err = run_cli("train", args, capsys)
    assert got == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert snapshot(root, skip={out.name}) == before
    assert not (out / "final").exists() and not list(out.glob("step_*"))


def test_overwrite_replaces_only_the_runs_own_outputs(root, capsys):
    """overwrite=true on a directory that also holds the prompts file and a user's notes: the run
    succeeds, the previous outputs are replaced, the other files are untouched."""
    out = root / "shared"
    out.mkdir()
    prompts = out / "prompts.txt"
    prompts.write_text((root / "prompts.txt").read_text())
    (out / "notes.txt").write_text("mine\n")
    (out / "step_7").mkdir()
    (out / "step_7" / "trainer_state.pt").write_bytes(b"old")
    (out / "metrics.jsonl").write_text('{"step": 7}\n')
    (out / "config.yaml").write_text("seed: 9\n")
    theirs = snapshot(out, skip={"step_7", "metrics.jsonl", "config.yaml"})
    args = base(root) + [f"prompts_file={prompts}", f"output_dir={out}", "overwrite=true"]
    got, err = run_cli("train", args, capsys)
    assert got == 0, err
    assert not (out / "step_7").exists()
    assert [line.count('"step": 7') for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 0]
    assert (out / "final" / "config.json").is_file()
    assert {k: v for k, v in snapshot(out).items() if k in theirs} == theirs
    # Running the identical command again: a finished run is not silently retrained.
    finished = snapshot(out)
    got, err = run_cli("train", args[:-1], capsys)
    assert got == 1 and "finished run" in err
    assert snapshot(out) == finished


# --- Python API ---------------------------------------------------------------------------------


def zeros(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.mark.parametrize(
    ("make", "error", "fragments"),
    [
        (lambda: PPOConfig(batch_size="4"), ConfigError, ["batch_size", "'4'", "int", "str"]),
        (lambda: PPOConfig(top_p=0.0), ConfigError, ["top_p", "(0, 1]", "0.0"]),
        (lambda: PPOConfig(batch_size=2, mini_batch_size=4), ConfigError, ["mini_batch_size", "<= the 2 samples"]),
        (lambda: SFTConfig(num_epochs=0), ConfigError, ["SFTConfig.num_epochs", ">= 1"]),
        (lambda: RewardConfig(learning_rate="1e-5"), ConfigError, ["learning_rate", "'1e-5'", "float"]),
    ],
)
def test_api_configs(make, error, fragments):
    with pytest.raises(error) as caught:
        make()
    assert all(f in str(caught.value) for f in fragments), str(caught.value)


@pytest.mark.parametrize(
    ("returns", "fragments"),
    [
        (lambda n: ["1.0"] * n, ["'bad_reward'", "'1.0'"]),
        (lambda n: [1e5] * n, ["'bad_reward'", "reward_max_abs=10000"]),
        (lambda n: [None] * n, ["'bad_reward'", "None for all 2"]),
        (lambda n: sys.exit(0), ["'bad_reward'", "sys.exit(0)"]),
    ],
)
def test_api_reward_functions_leave_the_policy_alone(tiny_policy, tiny_tokenizer, returns, fragments):
    def bad_reward(completions, **kwargs):
        return returns(len(completions))

    before = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    trainer = PPOTrainer(
        PPOConfig(batch_size=2, max_new_tokens=3, progress_bar=False, ppo_epochs=1),
        tiny_policy,
        tiny_tokenizer,
        reward_funcs=bad_reward,
    )
    with pytest.raises(RewardFunctionError) as caught:
        trainer.step(["w3", "w4"])
    assert all(f in str(caught.value) for f in fragments), str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in tiny_policy.state_dict().items())


def test_api_reward_function_timeout(tiny_policy, tiny_tokenizer):
    import threading

    release = threading.Event()

    def slow_reward(completions, **kwargs):
        release.wait(60)
        return [0.0] * len(completions)

    config = PPOConfig(batch_size=2, max_new_tokens=3, progress_bar=False, ppo_epochs=1, reward_timeout_s=0.5)
    trainer = PPOTrainer(config, tiny_policy, tiny_tokenizer, reward_funcs=slow_reward)
    try:
        with pytest.raises(
            RewardFunctionError, match=r"'slow_reward' did not return within reward_timeout_s=0.5 s.*cannot be killed"
        ):
            trainer.step(["w3", "w4"])
    finally:
        release.set()  # let the abandoned thread end
    trainer.config.reward_timeout_s = 0  # no limit: called in this thread, and it works
    trainer.rewards.timeout_s = 0
    assert trainer.step(["w3", "w4"])["rewards"] == [0.0, 0.0]


def test_api_stages_refuse_their_own_inputs_and_same_pairs(root, tiny_tokenizer):
    from ppo.reward_stage import train_reward_model
    from ppo.sft_stage import train_sft

    before = snapshot(root)
    with pytest.raises(OutputDirError, match="is this run's model_name_or_path"):
        train_sft(
            SFTConfig(
                model_name_or_path=str(root / "policy"),
                output_dir=str(root / "policy"),
                overwrite=True,
                progress_bar=False,
            ),
            rows=[{"prompt": "w1", "completion": "w2"}],
        )
    rows = [{"prompt": "w1", "chosen": "w2", "rejected": "w2"}] * 3
    model = build_reward_model(tiny_tokenizer, TinyModelSpec(), seed=1)
    with pytest.raises(ValueError, match="chosen equals rejected in all 3 rows"):
        train_reward_model(
            RewardConfig(output_dir=str(root / "rm-out"), progress_bar=False), model, tiny_tokenizer, rows=rows
        )
    with pytest.raises(DataFormatError, match="same.jsonl: chosen equals rejected in all 2"):
        load_preference_rows(str(root / "same.jsonl"))
    assert snapshot(root) == before
