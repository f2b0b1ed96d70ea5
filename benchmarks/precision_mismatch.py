"""The rollout/training mismatch of one PPO step, in fp32 and under bf16 autocast, for each way of
getting pi_old (docs/precision.md has the numbers).

    python benchmarks/precision_mismatch.py [--sharpness 1,20] [--steps 1] [--threads 2]

For each precision, model and choice (`rollout_logprobs` true / false, and false with `tis_cap`), a
fresh tiny Qwen3 policy takes `--steps` PPO steps on the same prompts; printed per step: the
`mismatch/*` metrics (first mini-batch: mean |log pi_rollout - log pi_train|, ratio mean, approx-KL
and clip fraction), the step's KL to the reference (the policy *is* the reference at step 0, so any KL there
is rounding), and max |log pi_old - log pi_rollout| over the batch (what `tis_cap` corrects).

A randomly initialised model is nearly uniform over its vocabulary, which hides rounding in the
logits; `--sharpness` multiplies the final norm's weight, so the logits grow like a trained model's
and the entropy falls (the table prints it).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppo import PPOConfig, PPOTrainer  # noqa: E402
from ppo.demo.tiny import TinyModelSpec, build_policy, build_tokenizer  # noqa: E402

MODELS = {  # name: (words in the vocabulary, spec)
    "h64-l2-v35": (32, TinyModelSpec(hidden_size=64, num_layers=2)),
    "h256-l4-v2k": (2000, TinyModelSpec(hidden_size=256, num_layers=4)),
}
CHOICES = {  # label: config overrides
    "sampling pass (rollout_logprobs=true)": {"rollout_logprobs": True},
    "scoring forward (rollout_logprobs=false)": {"rollout_logprobs": False},
    "scoring forward + tis_cap=2": {"rollout_logprobs": False, "tis_cap": 2.0},
}


def word_reward(completions, **kwargs):
    return [float(len(set(c.split()))) / 10 for c in completions]


def run(model_name: str, precision: str, overrides: dict, sharpness: float, steps: int) -> list[dict]:
    n_words, spec = MODELS[model_name]
    tokenizer = build_tokenizer([f"w{i}" for i in range(n_words)])
    policy = build_policy(tokenizer, spec, seed=0)
    with torch.no_grad():
        policy.model.norm.weight.mul_(sharpness)
    config = PPOConfig(
        batch_size=16, mini_batch_size=8, gradient_accumulation_steps=2, ppo_epochs=2, max_new_tokens=24,
        learning_rate=1e-4, temperature=1.0, progress_bar=False, seed=0, precision=precision, fp32_matmul="mkl",
        **overrides,
    )
    trainer = PPOTrainer(config, policy, tokenizer, reward_funcs=word_reward)
    prompts = [" ".join(f"w{(7 * i + j) % n_words}" for j in range(1 + i % 5)) for i in range(16)]
    out = []
    for _ in range(steps):
        stats = trainer.step(prompts)
        out.append({k: stats[k] for k in ("mismatch/logprob_abs_diff", "mismatch/first_ratio_mean", "mismatch/first_clipfrac",
                                           "mismatch/first_approx_kl", "kl", "entropy")}
                   | {"tis_weight_mean": stats.get("tis_weight_mean", float("nan"))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sharpness", default="1,20", help="comma-separated multipliers of the final norm's weight")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print("| model | sharpness | precision | pi_old from | step | entropy | logprob_abs_diff | first_ratio_mean - 1 | first_approx_kl | first_clipfrac | KL to ref | tis weight |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model_name in args.models.split(","):
        for sharpness in (float(s) for s in args.sharpness.split(",")):
            for precision in args.precisions.split(","):
                for label, overrides in CHOICES.items():
                    start = time.time()
                    for step, s in enumerate(run(model_name, precision, overrides, sharpness, args.steps)):
                        print(f"| {model_name} | {sharpness:g} | {precision} | {label} | {step} | {s['entropy']:.2f} "
                              f"| {s['mismatch/logprob_abs_diff']:.2e} | {s['mismatch/first_ratio_mean'] - 1:+.1e} | {s['mismatch/first_approx_kl']:.1e} "
                              f"| {s['mismatch/first_clipfrac']:.4f} | {s['kl']:+.2e} | {s['tis_weight_mean']:.5f} |", flush=True)
                    print(f"<!-- {time.time() - start:.1f} s -->", file=sys.stderr)


if __name__ == "__main__":
    main()
