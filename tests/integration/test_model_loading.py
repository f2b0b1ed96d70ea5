"""`ppo.models`: every recipe loads from a directory, a .gguf file or a directory holding one, and
refuses a missing path, damaged weights and an unusable GGUF with an error that names it.
Tiny models only (a 1-layer Llama written as GGUF by `tiny_gguf`)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppo import models
from ppo.config import PPOConfig, RewardConfig
from ppo.demo.tiny import (
    TinyModelSpec,
    build_policy,
    build_reward_model,
    build_tokenizer,
)
from ppo.models import ModelLoadError

gguf = pytest.importorskip("gguf")
from tiny_gguf import write_tiny_gguf  # noqa: E402 - after the skip: it imports gguf

WORDS = [f"w{i}" for i in range(29)] + ["user", "assistant", ":"]


@pytest.fixture
def tiny_gguf_file(tmp_path):
    path = tmp_path / "ggufdir" / "tiny.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path)


@pytest.fixture
def policy_dir(tmp_path):
    tokenizer = build_tokenizer(WORDS)
    directory = tmp_path / "policy"
    build_policy(tokenizer, TinyModelSpec(hidden_size=32, num_layers=1)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------------
# GGUF sources
# ------------------------------------------------------------------------------------------------


def test_gguf_file_and_its_directory_load_the_written_weights(tiny_gguf_file):
    path, reference = tiny_gguf_file
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for source in (path, path.parent):
        model = models.load_causal_lm(source)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
        assert getattr(model, "hf_quantizer", None) is None  # a plain model: it can be saved
    tokenizer = models.load_tokenizer(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi 7"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi 7<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_model_saves_as_a_plain_directory(tiny_gguf_file, tmp_path):
    path, reference = tiny_gguf_file
    model, tokenizer = models.load_causal_lm(path), models.load_tokenizer(path)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    assert not list((tmp_path / "saved").glob("*.gguf")) and (tmp_path / "saved" / "model.safetensors").is_file()
    plain, plain_tok = (
        AutoModelForCausalLM.from_pretrained(tmp_path / "saved"),
        AutoTokenizer.from_pretrained(tmp_path / "saved"),
    )
    ids = torch.tensor([plain_tok("hi 7")["input_ids"]])
    torch.testing.assert_close(plain(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert plain_tok("hi 7")["input_ids"] == tokenizer("hi 7")["input_ids"]


def test_reward_model_from_gguf_causal_lm_is_the_backbone_with_a_fresh_head(tiny_gguf_file):
    from ppo.run_inputs import load_reward_model

    path, reference = tiny_gguf_file
    reward, tokenizer = load_reward_model(RewardConfig(model_name_or_path=str(path), init_from_policy=True))
    assert reward.config.num_labels == 1 and reward.score.weight.shape == (1, 32)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(
        reward.model(ids).last_hidden_state, reference.model(ids).last_hidden_state, rtol=0, atol=1e-5
    )
    assert tokenizer.pad_token_id is not None


def test_directory_with_two_gguf_files_asks_which(tiny_gguf_file):
    path, _ = tiny_gguf_file
    shutil.copy(path, path.parent / "other.gguf")
    with pytest.raises(ModelLoadError, match=r"several \.gguf files \(other\.gguf, tiny\.gguf\)"):
        models.load_causal_lm(path.parent)


@pytest.mark.parametrize("keep", [0.5, 0.02])  # cut in the tensor data, cut in the metadata
def test_truncated_gguf_is_named(tiny_gguf_file, keep):
    path, _ = tiny_gguf_file
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=rf"'{path}'.*(truncated|damaged)"):
        models.load_causal_lm(path)


def test_not_a_gguf_file_is_named(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        models.load_causal_lm(path)


def test_unsupported_gguf_architecture_is_named(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, architecture="oddformer")
    with pytest.raises(
        ModelLoadError, match=r"architecture 'oddformer' is not one transformers can load.*supported: .*llama"
    ):
        models.load_causal_lm(path)


def test_gguf_without_tokenizer_says_where_to_put_one(tmp_path, policy_dir):
    path = tmp_path / "bare" / "bare.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"bare\.gguf.*holds no tokenizer.*tokenizer\.json"):
        models.load_tokenizer(path)
    # ... and doing what it says works: the directory's tokenizer files are used.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(policy_dir / name, path.parent / name)
    assert models.load_tokenizer(path).eos_token == "<eos>"


def test_missing_gguf_package_says_what_to_install(tiny_gguf_file, monkeypatch):
    path, _ = tiny_gguf_file
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"tiny\.gguf.*pip install gguf"):
        models.load_causal_lm(path)


def test_package_source_finds_the_gguf_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "fake_model_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('importing this package is not allowed')\n")
    write_tiny_gguf(package / "m.gguf")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = models.resolve_source("pkg:fake_model_pkg")
    assert source.name == str(package) and source.gguf_file == "m.gguf"
    with pytest.raises(ModelLoadError, match="no installed Python package named 'no_such_pkg_xyz'"):
        models.resolve_source("pkg:no_such_pkg_xyz")


# ------------------------------------------------------------------------------------------------
# Missing paths, damaged weights, a reward model too small for its tokenizer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["out/no-such-run/final", "/nonexistent/policy", "./nope", "nope.gguf"])
def test_missing_local_path_is_named(missing):
    for load in (models.load_causal_lm, models.load_sequence_classifier, models.load_tokenizer, models.load_config):
        with pytest.raises(FileNotFoundError, match=rf"model (directory|file) '{missing}' does not exist"):
            load(missing)


@pytest.mark.parametrize("key", ["model_name_or_path", "ref_model_path", "reward_model_path", "value_model_path"])
def test_missing_path_of_every_role_is_named(policy_dir, tmp_path, key):
    from ppo.run_inputs import load_models

    missing = str(tmp_path / "typo" / "final")
    values = {"model_name_or_path": str(policy_dir), "reward_funcs": ["length_penalty"], key: missing}
    with pytest.raises(FileNotFoundError, match=f"model directory '{missing}' does not exist"):
        load_models(PPOConfig(**values))


def test_missing_path_through_create_trainer_and_the_cli(tmp_path, capsys):
    from ppo import create_trainer
    from ppo.train import main

    missing = str(tmp_path / "typo" / "final")
    with pytest.raises(FileNotFoundError, match=f"model directory '{missing}' does not exist"):
        create_trainer(missing, reward_functions=["length_penalty"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2\n")
    out = tmp_path / "run"
    code = main(
        [
            f"model_name_or_path={missing}",
            "reward_funcs=[length_penalty]",
            f"prompts_file={prompts}",
            f"output_dir={out}",
        ]
    )
    assert code == 1
    assert f"model directory '{missing}' does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_weights_are_refused_naming_file_and_tensor(policy_dir):
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 1] = float("nan")
    model.save_pretrained(policy_dir)
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors' holds non-finite weights .* model\.layers\.0\.mlp\.up_proj\.weight"
    ):
        models.load_causal_lm(policy_dir)


def test_reward_model_smaller_than_its_tokenizer_is_refused_at_load(tmp_path):
    from ppo.run_inputs import load_reward_model

    tokenizer = build_tokenizer(WORDS)
    small = build_reward_model(build_tokenizer(WORDS[:10]), TinyModelSpec(hidden_size=32, num_layers=1))
    small.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    with pytest.raises(
        ModelLoadError,
        match=rf"the reward model .*has {len(tokenizer) - 22} embedding rows "
        rf"but its tokenizer has {len(tokenizer)} tokens",
    ):
        load_reward_model(RewardConfig(model_name_or_path=str(tmp_path / "rm")))


def test_gguf_policy_trains_a_ppo_step_and_saves_plainly(tiny_gguf_file, tmp_path):
    """The whole path on the tiny GGUF: load through the CLI's loader, chat-templated prompts,
    pad == EOS, one PPO step, and a final directory plain transformers loads."""
    from ppo.train import main

    path, _ = tiny_gguf_file
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": [{"role": "user", "content": "hi 1"}]}\n{"prompt": [{"role": "user", "content": "hi 2"}]}\n'
    )
    out = tmp_path / "run"
    code = main(
        [
            f"model_name_or_path={path}",
            "reward_funcs=[length_penalty]",
            f"prompts_file={prompts}",
            f"output_dir={out}",
            "batch_size=2",
            "max_new_tokens=4",
            "ppo_epochs=1",
            "progress_bar=false",
            "save_steps=0",
        ]
    )
    assert code == 0
    final = out / "final"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    ids = tokenizer("hi 3", return_tensors="pt")
    out_ids = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] > ids["input_ids"].shape[1]


def test_convert_cli_writes_a_plain_directory_once(tiny_gguf_file, tmp_path, capsys):
    path, reference = tiny_gguf_file
    out = tmp_path / "converted"
    assert models.main(["convert", str(path), str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(plain(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template is not None
    before = sorted(p.name for p in out.iterdir())
    assert models.main(["convert", str(path), str(out)]) == 1  # never over a non-empty directory
    assert "is not empty" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before


def test_self_pairs_from_a_policys_own_samples(policy_dir, tmp_path, monkeypatch):
    """The recipe's pair builder: every pair's chosen response scores higher by the rule."""
    import json

    from ppo.data_tasks.self_pairs import main as self_pairs

    def has_w1(completions, **kwargs):
        return [float("w1" in c.split()) for c in completions]

    rows = "".join(
        json.dumps({"prompt": [{"role": "user", "content": f"w{i} w{i + 1}"}], "answer": "1"}) + "\n" for i in range(6)
    )
    (tmp_path / "p.jsonl").write_text(rows)
    import sys
    import types

    monkeypatch.setitem(sys.modules, "_pairs_rule", types.SimpleNamespace(has_w1=has_w1))  # a `module:function` spec
    out = tmp_path / "pairs.jsonl"
    code = self_pairs(
        [
            "--model",
            str(policy_dir),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--out",
            str(out),
            "--reward",
            "_pairs_rule:has_w1",
            "--samples",
            "8",
            "--max-new-tokens",
            "6",
            "--pairs-per-prompt",
            "3",
        ]
    )
    assert code == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs and all(has_w1([p["chosen"]]) == [1.0] and has_w1([p["rejected"]]) == [0.0] for p in pairs)
    assert all(isinstance(p["prompt"], list) and p["prompt"][0]["role"] == "user" for p in pairs)


@pytest.mark.usefixtures("quiet_bf16_emulation")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_self_pairs_samples_in_the_precision_asked(policy_dir, precision):
    """Under bf16 the sampler runs as PPO's frozen models do (linear weights held in bf16); the
    pairs are valid in either precision."""
    from ppo.data_tasks.self_pairs import build_pairs
    from ppo.models import load_causal_lm, load_tokenizer

    def has_w1(completions, **kwargs):
        return [float("w1" in c.split()) for c in completions]

    tokenizer, model = load_tokenizer(str(policy_dir)), load_causal_lm(str(policy_dir))
    rows = [{"prompt": f"w{i} w{i + 1}"} for i in range(6)]
    pairs, stats = build_pairs(model, tokenizer, rows, has_w1, samples=8, max_new_tokens=6, precision=precision)
    assert stats["precision"] == precision and stats["pairs"] == len(pairs) > 0
    assert all(has_w1([p["chosen"]]) == [1.0] and has_w1([p["rejected"]]) == [0.0] for p in pairs)
    held = {torch.float32: "fp32", torch.bfloat16: "bf16"}[model.model.layers[0].self_attn.q_proj.weight.dtype]
    assert held == precision
    assert not any(p.requires_grad for p in model.parameters())
