"""The runs the distributed tests compare, as a script: under torchrun (2 ranks, gloo) or alone.

    python tests/distributed/_worker.py all OUT            # 1 process: the reference runs
    torchrun --nproc_per_node=2 tests/distributed/_worker.py all OUT    # the same runs on 2 ranks
    python tests/distributed/_worker.py resume OUT SRC     # continue SRC's step_2 checkpoints in OUT
    torchrun --nproc_per_node=2 tests/distributed/_worker.py crash OUT  # rank 1 raises in step 2
    torchrun --nproc_per_node=2 tests/distributed/_worker.py hang OUT   # rank 1 stops answering
    torchrun --nproc_per_node=2 tests/distributed/_worker.py attention OUT  # fp32_attention: auto's choice

`all` runs, one after the other in the same processes: PPO with DDP and a shared value head, PPO
with FSDP2, a separate critic and gradient checkpointing (both checkpointing at step 2), GRPO with
DDP (no critic), SFT and reward-model training.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # other jobs share the machine; results do not depend on it

import transformers

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

from ppo import PPOConfig, PPOTrainer
from ppo import distributed as dist
from ppo.config import RewardConfig, SFTConfig
from ppo.demo.tiny import (
    TinyModelSpec,
    build_policy,
    build_reward_model,
    build_tokenizer,
)

WORDS = [f"w{i}" for i in range(29)]
TIMEOUT_S = float(os.environ.get("TEST_DIST_TIMEOUT_S", "30"))


def words_reward(completions, **kwargs):
    return [len(c.split()) / 4 for c in completions]


def failing_reward(completions, **kwargs):
    """Rank 1 fails in step 2: it raises (`crash`) or stops answering (`hang`)."""
    failing_reward.calls += 1
    if dist.rank() == 1 and failing_reward.calls == 2:
        if failing_reward.mode == "hang":
            time.sleep(600)
        raise RuntimeError("reward server unreachable (injected failure on rank 1)")
    return words_reward(completions)


failing_reward.calls, failing_reward.mode = 0, "crash"


def ppo(
    out: Path, strategy: str, value_head: str, resume: str | None = None, reward=words_reward, estimator: str = "gae"
) -> None:
    """3 PPO iterations of 4 prompts x 2 samples; 2 optimizer steps of 4 samples per epoch, 2 epochs.

    Why 1 process and 2 ranks compute the same thing: both draw the same responses (per-row seeds
    in the global batch), gather the same global batch (so rewards, whitening and GAE are those of
    the whole batch), and walk the same permutation. A mini-batch of 4 is split into micro-batches
    of 2 either way: 1 process with gradient_accumulation_steps=2, 2 ranks each taking 2 of the 4
    with gradient_accumulation_steps=1. The per-micro-batch losses are identical and their weighted
    gradient sum is the same; only float summation order (and kernel blocking over different
    padding widths) differs, hence a tolerance of 1e-5 rather than bit equality.
    """
    tok = build_tokenizer(WORDS)
    policy = build_policy(tok, TinyModelSpec(), seed=0)
    reward_model = build_reward_model(tok, TinyModelSpec(), seed=1)
    config = PPOConfig(
        batch_size=4,
        num_generations=2,
        mini_batch_size=4,
        gradient_accumulation_steps=2 // dist.world_size(),
        ppo_epochs=2,
        max_new_tokens=4,
        learning_rate=1e-3,
        temperature=0.9,
        save_steps=2,
        output_dir=str(out),
        progress_bar=False,
        seed=5,
        value_head=value_head,
        gradient_checkpointing=value_head == "separate",  # as the shipped configs (a shared head cannot)
        strategy=strategy,
        dist_timeout_s=TIMEOUT_S,
        resume_from_checkpoint=resume,
        # grpo: each rank samples its prompts' groups; the gathered batch must keep them together
        advantage_estimator=estimator,
        whiten_rewards=estimator == "gae",
        # pi_old from a full forward: the KV-cache decode's rounding depends on how many rows share a
        # rank, which would add batch-dependent noise to a 1-process/2-rank comparison at 1e-5
        # (the sampling-pass log-probs have their own test against this forward).
        rollout_logprobs=False,
        precision="fp32",  # compared at 1e-5 whatever the machine
        fp32_matmul="mkl",  # and on the same kernel in every process
        fused_norm=False,  # it steps aside under torchrun, and its gradients differ from stock by rounding
    )
    trainer = PPOTrainer(config, policy, tok, reward_model=reward_model, reward_funcs=reward, reward_weights=[0.5, 1.0])
    prompts = [" ".join(f"w{(i * 5 + j) % 29}" for j in range(1 + i % 3)) for i in range(12)]
    trainer.train(prompts, num_epochs=1)


def sft(out: Path) -> None:
    from ppo.sft_stage import train_sft

    tok = build_tokenizer(WORDS)
    rows = [
        {"prompt": f"w{i} w{i + 1}", "completion": " ".join(f"w{(i * 3 + j) % 29}" for j in range(1 + i % 4))}
        for i in range(11)
    ]
    # 9 training rows in steps of 4, 4, 1: the last leaves rank 1 nothing but a zero-weight batch.
    config = SFTConfig(
        batch_size=2,
        gradient_accumulation_steps=2,
        num_epochs=2,
        learning_rate=1e-3,
        eval_fraction=0.2,
        output_dir=str(out),
        progress_bar=False,
        overwrite=True,
        fused_norm=False,  # as in ppo(): the 2-rank run takes the stock norm
        fused_lm_head=False,  # and the model's own logits
        precision="fp32",  # as in ppo(): compared at 1e-5 whatever the machine
        dist_timeout_s=TIMEOUT_S,
    )
    train_sft(config, build_policy(tok, TinyModelSpec(), seed=0), tok, rows)


def reward(out: Path) -> None:
    from ppo.reward_stage import train_reward_model

    tok = build_tokenizer(WORDS)
    rows = [
        {"prompt": f"w{i}", "chosen": f"w{i % 3} w1", "rejected": f"w{(i * 7) % 29} w{i % 5 + 9}"} for i in range(11)
    ]
    config = RewardConfig(
        batch_size=2,
        gradient_accumulation_steps=2,
        num_epochs=2,
        learning_rate=1e-3,
        eval_fraction=0.2,
        output_dir=str(out),
        progress_bar=False,
        overwrite=True,
        fused_norm=False,  # as in ppo(): the 2-rank run takes the stock norm
        precision="fp32",  # as in ppo(): compared at 1e-5 whatever the machine
        dist_timeout_s=TIMEOUT_S,
    )
    train_reward_model(config, build_reward_model(tok, TinyModelSpec(), seed=2), tok, rows)


def attention_choice(out: Path) -> None:
    """`fp32_attention: auto` where the ranks' timings disagree: rank 0 finds torch's bf16 kernel
    faster for the forwards (not for decoding), rank 1 finds fp32 faster for both."""
    from ppo.fastpath import fp32_attention
    from ppo.roles import attend_in_fp32

    ratios = (0.5, 3.0) if dist.rank() == 0 else (1.7, 3.0)
    fp32_attention.kernel_speedups = lambda *shape: ratios
    policy = build_policy(build_tokenizer(WORDS), TinyModelSpec(), seed=0)
    attend_in_fp32([policy], "bf16", torch.device("cpu"), "auto")
    (out / f"attention_rank{dist.rank()}.json").write_text(json.dumps(policy.config._attn_implementation))


def main(job: str, out: str, source: str | None = None) -> None:
    out = Path(out)
    dist.init_from_env(TIMEOUT_S)  # before world_size() is read (the trainer would do it later)
    if job == "all":
        ppo(out / "ppo_ddp", "ddp", "shared")
        ppo(out / "ppo_fsdp", "fsdp", "separate")
        ppo(out / "ppo_grpo", "ddp", "separate", estimator="grpo")
        sft(out / "sft")
        reward(out / "reward")
    elif job == "resume":  # a 2-rank run's step_2 checkpoint, finished on this run's ranks
        for name, strategy, value_head in (("ppo_ddp", "ddp", "shared"), ("ppo_fsdp", "fsdp", "separate")):
            if dist.is_main():
                shutil.copytree(Path(source) / name, out / name)
            dist.barrier()
            ppo(out / name, strategy, value_head, resume="latest")
    elif job in ("crash", "hang"):
        failing_reward.mode = job
        ppo(out / job, "ddp", "separate", reward=failing_reward)
    elif job == "attention":
        attention_choice(out)
    rank = dist.rank()
    dist.teardown()
    # What still runs after teardown: a gloo thread here would run into interpreter shutdown.
    tasks = Path("/proc/self/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()] if tasks.is_dir() else None
    (out / f"threads_after_teardown_rank{rank}.json").write_text(json.dumps(names))


if __name__ == "__main__":
    main(*sys.argv[1:])
