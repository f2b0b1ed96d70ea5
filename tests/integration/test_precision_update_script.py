"""`benchmarks/precision_update.py` on a tiny model: it runs from a config, and what it prints says
that a policy-loss gradient under bf16 autocast is the fp32 one to bf16's rounding and that the two
updates move the policy alike (the measurement behind docs/real-models.md's fp32/bf16 comparison)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from ppo.demo.tiny import TinyModelSpec, build_policy, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
WORDS = [f"w{i}" for i in range(29)] + ["user", "assistant", ":"]


def test_precision_update_reports_matching_gradients_and_updates(tmp_path):
    tokenizer = build_tokenizer(WORDS)
    model_dir = tmp_path / "policy"
    build_policy(tokenizer, TinyModelSpec(hidden_size=64, num_layers=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(4)))
    (tmp_path / "rewards.py").write_text(
        "def count_w3(completions, **kwargs):\n    return [float(c.split().count('w3')) for c in completions]\n"
    )
    config = tmp_path / "ppo.yaml"
    config.write_text(
        f"model_name_or_path: {model_dir}\nprompts_file: {prompts}\n"
        f"reward_funcs: ['{tmp_path / 'rewards.py'}:count_w3']\n"
        "advantage_estimator: grpo\nnum_generations: 4\nbatch_size: 2\nmini_batch_size: 4\n"
        "max_new_tokens: 12\nlearning_rate: 1.0e-3\ntemperature: 1.0\n"
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "precision_update.py"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    norms = re.search(r"gradient norm fp32 ([\d.]+), bf16 ([\d.]+); cosine ([\d.]+)", out)
    assert norms, out
    fp32_norm, bf16_norm, cosine = map(float, norms.groups())
    assert fp32_norm > 0 and abs(bf16_norm - fp32_norm) < 0.05 * fp32_norm
    assert cosine > 0.99
    moves = dict(re.findall(r"update in (fp32|bf16): sampled tokens' log-prob change ([-+][\d.]+)", out))
    assert set(moves) == {"fp32", "bf16"}, out
    fp32_move, bf16_move = float(moves["fp32"]), float(moves["bf16"])
    assert fp32_move != 0.0  # the update moved the policy at all
    assert abs(bf16_move - fp32_move) < 0.25 * abs(fp32_move) + 1e-3
