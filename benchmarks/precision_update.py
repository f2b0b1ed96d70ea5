"""Does bf16 autocast change what a PPO update does? One real rollout batch, then from the same
weights the policy-loss gradient and the whole update in fp32 and under bf16 autocast
(docs/real-models.md, "(a) in fp32 against bf16").

    python benchmarks/precision_update.py --config configs/smollm2-135m-ppo.yaml [--seed 0] [key=value ...]

The trainer samples and scores its first batch (of `batch_size` prompts from the config's prompts
file) and the update is intercepted, so both precisions start from the same batch and weights.
Printed: the gradients' norms and cosine (all parameters at once, and the least aligned tensors),
the cosine of AdamW's first-step directions (`g / (|g| + eps)`: what the first step moves each
parameter by, in units of the learning rate), and for the update itself (the config's epochs and
mini-batches, fresh AdamW) how far it moved the policy: the change of the sampled tokens' log-probs,
computed in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ppo.trainer as trainer_module  # noqa: E402
from ppo.config import PPOConfig  # noqa: E402
from ppo.config_io import load_config  # noqa: E402
from ppo.fastpath.fused_head import fusing  # noqa: E402
from ppo.fastpath.last_layer import pruning  # noqa: E402
from ppo.forward import policy_logprobs  # noqa: E402
from ppo.optim import build_adamw  # noqa: E402
from ppo.precision import autocast_context  # noqa: E402
from ppo.run_inputs import load_models, load_prompts  # noqa: E402
from ppo.update import policy_loss, ppo_update  # noqa: E402

PRECISIONS = ("fp32", "bf16")


class _Captured(Exception):
    """Raised in place of the update, once the batch it would train on is in hand."""


def first_batch(config: PPOConfig):
    """The trainer and the scored batch of its first step (sampled under the config's precision)."""
    models = load_models(config)
    rows = load_prompts(config, models["tokenizer"])[: config.batch_size]
    trainer = trainer_module.PPOTrainer(config=config, **models)
    captured = {}

    def capture(batch, *args, **kwargs):
        captured["batch"] = batch
        raise _Captured

    real_update, trainer_module.ppo_update = trainer_module.ppo_update, capture
    extras = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    try:
        trainer.step([row["prompt"] for row in rows], extras)
    except _Captured:
        pass
    finally:
        trainer_module.ppo_update = real_update
    return trainer, captured["batch"]


def precision_context(trainer, precision: str):
    """A factory of fresh contexts for `precision`, as the trainer makes its own (device, fp32 kernel)."""
    return lambda: autocast_context(precision, trainer.device, trainer.fp32_kernel)


@contextlib.contextmanager
def trainer_fast_paths(config: PPOConfig):
    """The fast paths the trainer's scoring and update run under."""
    with pruning(config.prune_last_layer), fusing(config.fused_lm_head):
        yield


def gradient(trainer, batch, precision: str) -> dict[str, torch.Tensor]:
    policy, config = trainer.policy, trainer.config
    policy.zero_grad(set_to_none=True)
    with trainer_fast_paths(config):
        with precision_context(trainer, precision)():
            loss = policy_loss(batch.trim_padding(), policy, None, config)[0]
        loss.backward()
    # A parameter that got no gradient counts as a zero one: a path cut in one precision shows as such.
    grads = {
        name: p.grad.detach().double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
        for name, p in policy.named_parameters()
        if p.requires_grad
    }
    policy.zero_grad(set_to_none=True)
    return grads


def cosine(a: dict, b: dict) -> float:
    dot = sum((a[k] * b[k]).sum() for k in a)
    return float(dot / max(norm(a) * norm(b), 1e-30))


def norm(grads: dict) -> float:
    return float(torch.sqrt(sum((g**2).sum() for g in grads.values())))


def sampled_logprobs(trainer, batch, precision: str) -> torch.Tensor:
    """Log-probs `[B, R]` of the batch's sampled tokens under the policy as it is now."""
    config = trainer.config
    with torch.no_grad(), trainer_fast_paths(config), precision_context(trainer, precision)():
        logprobs, _, _ = policy_logprobs(
            trainer.policy, batch.input_ids, batch.attention_mask, batch.response_width, config.temperature
        )
    return logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value for the config")
    args = parser.parse_args()
    overrides = ["output_dir=/tmp/ppo-precision-update", "progress_bar=false", f"seed={args.seed}", *args.overrides]
    config = load_config(PPOConfig, args.config, overrides)
    trainer, batch = first_batch(config)
    policy = trainer.policy
    print(f"sampled and scored in {trainer.precision}; {len(batch)} samples, mean reward {batch.scores.mean():.3f}")

    # pi_old as each precision computes it at these weights (the trainer's choice in each: in fp32
    # the sampler's log-probs equal this forward's to 1e-6); a pi_old of the other precision would
    # put its rounding into the ratio and clip tokens that the run itself would not clip.
    batches = {p: dataclasses.replace(batch, logprobs=sampled_logprobs(trainer, batch, p)) for p in PRECISIONS}
    grads = {p: gradient(trainer, batches[p], p) for p in PRECISIONS}
    print(
        f"gradient norm fp32 {norm(grads['fp32']):.4f}, bf16 {norm(grads['bf16']):.4f}; "
        f"cosine {cosine(grads['fp32'], grads['bf16']):.5f}"
    )
    per_tensor = sorted((cosine({k: grads["fp32"][k]}, {k: grads["bf16"][k]}), k) for k in grads["fp32"])
    print("least aligned tensors:", ", ".join(f"{name} {c:.4f}" for c, name in per_tensor[:4]))
    adam_eps = trainer.optimizers["policy"].defaults["eps"]
    steps = {p: {k: g / (g.abs() + adam_eps) for k, g in grads[p].items()} for p in PRECISIONS}
    print(f"first AdamW step direction, cosine fp32/bf16: {cosine(steps['fp32'], steps['bf16']):.5f}")

    start = copy.deepcopy(policy.state_dict())
    before = batches["fp32"].logprobs  # the start's log-probs, in fp32
    mask = batch.response_mask.bool()
    for precision in PRECISIONS:
        policy.load_state_dict(start)
        optimizers = {"policy": build_adamw(policy, config.learning_rate, config.weight_decay, config.optimizer)}
        with trainer_fast_paths(config):
            stats = ppo_update(
                batches[precision],
                policy,
                None,
                optimizers,
                trainer.plan_step(config.batch_size),
                config,
                torch.Generator().manual_seed(args.seed),
                precision_context(trainer, precision),
            )
        change = (sampled_logprobs(trainer, batch, "fp32") - before)[mask]
        print(
            f"update in {precision}: sampled tokens' log-prob change {change.mean():+.4f} "
            f"(mean |.| {change.abs().mean():.4f}) nats/token; approx-KL {stats['approx_kl']:.4f}, "
            f"clip fraction {stats['clipfrac']:.4f}"
        )
    policy.load_state_dict(start)


if __name__ == "__main__":
    main()
