"""Memory of LoRA against full fine-tuning on the same model and workload.

    python benchmarks/lora_memory.py [--workload W2] [--lora-r 16] [--iters 2]

Each variant runs in its own process (so peak RSS is its own): full fine-tuning with a separate
reference copy, and LoRA (adapter on the attention and MLP projections) whose reference is the
same weights with the adapter disabled. Printed: peak RSS, trainable parameters, optimizer-state
bytes, and what the accounting predicts (the reference copy and full AdamW state saved).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def child(workload_name: str, lora_r: int, iters: int) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(2)
    from workloads import WORKLOADS, build_models, build_prompts, build_tokenizer

    from ppo import PPOConfig, PPOTrainer

    w = WORKLOADS[workload_name]
    tokenizer = build_tokenizer(w)
    policy, reference, reward_model, value_model = build_models(w, tokenizer)
    models = {"model": policy, "reward_model": reward_model, "value_model": value_model}
    if not lora_r:
        models["ref_model"] = reference  # LoRA: the adapter-disabled policy is the reference
    del reference
    config = PPOConfig(
        batch_size=w.batch,
        mini_batch_size=w.mini_batch_size,
        ppo_epochs=w.ppo_epochs,
        learning_rate=3e-6,
        temperature=0.7,
        kl_coef=0.05,
        adap_kl_ctrl=False,
        max_new_tokens=w.response_len,
        progress_bar=False,
        lora_r=lora_r,
        lora_alpha=2 * max(lora_r, 1),
        lora_critic=bool(lora_r),
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        output_dir="/tmp/lora_memory",
    )
    trainer = PPOTrainer(config, tokenizer=tokenizer, **models)
    trainer.sampling = dataclasses.replace(trainer.sampling, stop_token_ids=())
    for prompts in build_prompts(w, tokenizer, iters):
        trainer.step(prompts)
    modules = [trainer.policy, trainer.critic.module]
    trainable = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    optim_bytes = sum(
        t.numel() * t.element_size()
        for opt in trainer.optimizers.values()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    weights = {
        id(p): p.numel() * p.element_size()
        for m in [*modules, trainer.ref_model, models.get("reward_model")]
        if m is not None
        for p in m.parameters()
    }
    return {
        "variant": f"LoRA r={lora_r}" if lora_r else "full",
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": trainable,
        "optimizer_state_mib": optim_bytes / 2**20,
        "weights_mib": sum(weights.values()) / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W2")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.workload, args.child, args.iters)))
        return 0
    rows = []
    for r in (0, args.lora_r):
        cmd = [sys.executable, __file__, "--workload", args.workload, "--iters", str(args.iters), "--child", str(r)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.split("RESULT ", 1)[1]))
    full = rows[0]
    print(f"| {args.workload} | peak RSS MiB | trainable params | optimizer state MiB | weights held MiB |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['variant']} | {row['peak_rss_mib']:.0f} ({row['peak_rss_mib'] / full['peak_rss_mib']:.2f}x) | "
            f"{row['trainable_params']:,} | {row['optimizer_state_mib']:.1f} | {row['weights_mib']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
