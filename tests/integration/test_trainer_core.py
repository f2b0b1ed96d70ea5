"""The PPO core on tiny Qwen3 models built locally: rollout, scoring, update, statistics."""

from __future__ import annotations

import copy

import pytest
import torch

from ppo import PPOConfig, PPOTrainer
from ppo.demo.tiny import TinyModelSpec, build_policy, build_tokenizer
from ppo.update import micro_batch_loss, policy_loss, value_loss

PROMPTS = ["w3 w4", "w5 w6 w7 w8 w9", "w2", "w8 w9 w10"]


def count_w1(completions, **kwargs):
    return [float(c.split().count("w1")) for c in completions]


def small_config(tmp_path=None, **overrides):
    # fp32 on one kernel whatever the machine: these tests compare numbers to 1e-5 or bit for bit.
    values = dict(batch_size=4, max_new_tokens=6, progress_bar=False, seed=0, precision="fp32", fp32_matmul="mkl")
    if tmp_path is not None:
        values["output_dir"] = str(tmp_path)
    values.update(overrides)
    return PPOConfig(**values)


def scored_batch(trainer, prompts):
    """A rollout of `prompts`, scored by the trainer."""
    from ppo.data import collate_prompts

    batch_prompts = collate_prompts(trainer.tokenizer, prompts)
    rollout = trainer.engine.generate(batch_prompts, trainer.sampling)
    completions = trainer.tokenizer.batch_decode(rollout.completion_ids(), skip_special_tokens=True)
    return trainer.score(rollout, batch_prompts, completions)[0]


def first_minibatch_ratio(trainer, prompts, temperature):
    """Score a rollout, then compute the update's loss on it before any optimizer step."""
    batch = scored_batch(trainer, prompts)
    index = torch.tensor([2, 0, 3, 1])  # shuffled, as the update does
    _, stats = micro_batch_loss(batch.select(index).trim_padding(), trainer.policy, trainer.critic, trainer.config)
    return stats


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("value_head", ["separate", "shared"])
def test_first_minibatch_ratio_is_one(tiny_policy, tiny_tokenizer, temperature, value_head):
    trainer = PPOTrainer(
        small_config(temperature=temperature, value_head=value_head), tiny_policy, tiny_tokenizer, reward_funcs=count_w1
    )
    stats = first_minibatch_ratio(trainer, PROMPTS, temperature)
    assert abs(stats["ratio_mean"].item() - 1.0) < 1e-5
    assert abs(stats["ratio_max"].item() - 1.0) < 1e-5
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() < 1e-10


def test_policy_then_critic_backward_gives_the_summed_losses_gradients(tiny_policy, tiny_tokenizer):
    """The update sends the policy's loss backward (and steps it) before the critic's forward (less
    peak memory); every gradient must be the one the summed loss gives, bit for bit."""
    trainer = PPOTrainer(small_config(entropy_coef=0.01), tiny_policy, tiny_tokenizer, reward_funcs=count_w1)
    mb = scored_batch(trainer, PROMPTS).trim_padding()
    # Make the advantages and returns differ from what the models predict, so no gradient is 0.
    mb.advantages.add_(torch.linspace(-1, 1, mb.advantages.numel()).view_as(mb.advantages))
    mb.returns.add_(1.0)
    models = (trainer.policy, trainer.critic.module)

    def gradients():
        grads = [p.grad.clone() for m in models for p in m.parameters() if p.grad is not None]
        for m in models:
            m.zero_grad(set_to_none=True)
        return grads

    loss, joint_stats = micro_batch_loss(mb, trainer.policy, trainer.critic, trainer.config)
    (loss * 0.5).backward()
    joint = gradients()
    pg_loss, pg_stats, _ = policy_loss(mb, trainer.policy, trainer.critic, trainer.config)
    (pg_loss * 0.5).backward()
    vf_loss, vf_stats = value_loss(mb, trainer.critic, trainer.config)
    (vf_loss * 0.5).backward()
    split = gradients()
    assert len(joint) == len(split) == sum(1 for m in models for _ in m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(joint, split))
    assert any(a.abs().sum() > 0 for a in split)
    split_stats = {**pg_stats, **vf_stats}
    assert joint_stats.keys() == split_stats.keys()
    assert all(torch.equal(joint_stats[k], split_stats[k]) for k in joint_stats)
    assert torch.equal(loss, pg_loss + vf_loss)


def joint_update(batch, trainer, plan):
    """The straightforward schedule: per mini-batch, both losses of every micro-batch as one graph,
    then clip and step both models."""
    from ppo import distributed as dist

    config, models = trainer.config, {"policy": trainer.policy, "critic": trainer.critic.module}
    losses = []
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(batch), generator=trainer.shuffle_generator)
        for start in range(0, len(batch), plan.mini_batch):
            mini = order[start : start + plan.mini_batch]
            for opt in trainer.optimizers.values():
                opt.zero_grad(set_to_none=True)
            for micro in mini.split(plan.micro_batch):
                loss, _ = micro_batch_loss(batch.select(micro).trim_padding(), trainer.policy, trainer.critic, config)
                (loss * len(micro) / len(mini)).backward()
                losses.append(loss.detach())
            for name, opt in trainer.optimizers.items():
                dist.clip_grad_norm(list(models[name].parameters()), config.max_grad_norm)
                opt.step()
    return torch.stack(losses).mean()


@pytest.mark.parametrize("value_head", ["separate", "shared"])
def test_update_steps_each_model_as_the_joint_schedule_does(tiny_policy, tiny_tokenizer, value_head):
    """The update runs the policy's pass (and step) before the critic's: the trained weights and the
    mean loss must be the ones the straightforward joint schedule gives, and no gradient outlives
    the update."""
    from ppo.config import plan_batches
    from ppo.update import ppo_update

    config = small_config(
        value_head=value_head, ppo_epochs=2, mini_batch_size=2, gradient_accumulation_steps=2, entropy_coef=0.01
    )
    results = []
    for schedule in ("ppo_update", "joint"):
        trainer = PPOTrainer(config, copy.deepcopy(tiny_policy), tiny_tokenizer, reward_funcs=count_w1)
        batch = scored_batch(trainer, PROMPTS)
        batch.advantages.add_(torch.linspace(-1, 1, batch.advantages.numel()).view_as(batch.advantages))
        plan = plan_batches(config, n_prompts=len(PROMPTS))
        assert plan.micro_batch < plan.mini_batch < len(batch)  # micro-batches, mini-batches, epochs
        if schedule == "ppo_update":
            loss = ppo_update(
                batch, trainer.policy, trainer.critic, trainer.optimizers, plan, config, trainer.shuffle_generator
            )["loss"]
            assert all(p.grad is None for m in (trainer.policy, trainer.critic.module) for p in m.parameters())
        else:
            loss = joint_update(batch, trainer, plan)
        results.append(
            (loss, [p.detach().clone() for m in (trainer.policy, trainer.critic.module) for p in m.parameters()])
        )
    (loss_a, weights_a), (loss_b, weights_b) = results
    assert torch.allclose(torch.as_tensor(loss_a), loss_b, atol=1e-6)
    assert len(weights_a) == len(weights_b)
    assert all(torch.allclose(a, b, atol=1e-7, rtol=0) for a, b in zip(weights_a, weights_b))
    initial = list(tiny_policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(weights_a[: len(initial)], initial))  # it trained


def count_words(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


@pytest.mark.parametrize("top_k", [None, 3])
def test_rollout_logprobs_match_a_second_forward(tiny_policy, tiny_tokenizer, top_k):
    """The optimised path (pi_old from the sampling pass) against the straightforward one (a full
    forward of the policy over the rollout): same log-probs, entropies and scored batch, on ragged
    responses, at a temperature, with top-k (which must not leak into the log-probs)."""
    from ppo.data import collate_prompts

    scored = {}
    for reuse in (True, False):
        config = small_config(temperature=0.7, top_k=top_k, rollout_logprobs=reuse, max_new_tokens=8)
        trainer = PPOTrainer(config, tiny_policy, tiny_tokenizer, reward_funcs=count_words)
        prompts = collate_prompts(tiny_tokenizer, PROMPTS)
        prompts.seeds = [11, 12, 13, 14]
        rollout = trainer.engine.generate(prompts, trainer.sampling)
        assert rollout.logprobs is not None and trainer.scorer.reuses_rollout_logprobs(rollout) == reuse
        completions = tiny_tokenizer.batch_decode(rollout.completion_ids(), skip_special_tokens=True)
        scored[reuse] = trainer.score(rollout, prompts, completions)
    (fast, fast_stats), (slow, slow_stats) = scored[True], scored[False]
    assert torch.equal(fast.response_mask, slow.response_mask)
    mask = slow.response_mask.bool()
    assert (fast.logprobs[mask] - slow.logprobs[mask]).abs().max() < 1e-5
    assert (fast.advantages - slow.advantages).abs().max() < 1e-4
    assert abs(fast_stats["entropy"] - slow_stats["entropy"]) < 1e-5
    assert abs(fast_stats["kl"] - slow_stats["kl"]) < 1e-5


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_a_step_on_onednn_fp32_kernels_matches_the_default_kernels(tiny_tokenizer):
    """fp32_matmul=onednn swaps the kernel, not the arithmetic: one whole step (rollout, scoring,
    update) gives the same responses, statistics and new weights to float rounding."""
    results = {}
    for kernel in ("mkl", "onednn"):
        policy = build_policy(tiny_tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=0)
        trainer = PPOTrainer(
            small_config(fp32_matmul=kernel, learning_rate=1e-3), policy, tiny_tokenizer, reward_funcs=count_w1
        )
        assert trainer.fp32_kernel == kernel
        results[kernel] = (trainer.step(PROMPTS), policy.state_dict())
    (mkl, mkl_weights), (onednn, onednn_weights) = results["mkl"], results["onednn"]
    assert mkl["generated_texts"] == onednn["generated_texts"]
    for key in ("policy_loss", "value_loss", "kl", "entropy", "mean_reward"):
        assert onednn[key] == pytest.approx(mkl[key], abs=1e-5), key
    for name, weight in mkl_weights.items():
        torch.testing.assert_close(onednn_weights[name], weight, atol=1e-5, rtol=1e-4)
    assert any(
        not torch.equal(
            w, build_policy(tiny_tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=0).state_dict()[n]
        )
        for n, w in onednn_weights.items()
    )  # the step did move the weights


def test_dropout_is_off_in_rollout_and_update(tiny_tokenizer):
    policy = build_policy(tiny_tokenizer, TinyModelSpec(), seed=0)
    for layer in policy.model.layers:
        layer.self_attn.attention_dropout = 0.5  # would make log-probs random in train mode
    policy.train()
    trainer = PPOTrainer(small_config(gradient_checkpointing=True), policy, tiny_tokenizer, reward_funcs=count_w1)
    stats = first_minibatch_ratio(trainer, PROMPTS, 1.0)
    assert abs(stats["ratio_max"].item() - 1.0) < 1e-5


def test_step_returns_api_stats_and_changes_only_the_policy_and_critic(tiny_policy, tiny_tokenizer, tiny_reward_model):
    before = copy.deepcopy(tiny_policy.state_dict())
    reward_before = copy.deepcopy(tiny_reward_model.state_dict())
    trainer = PPOTrainer(
        small_config(),
        tiny_policy,
        tiny_tokenizer,
        reward_model=tiny_reward_model,
        reward_funcs=count_w1,
        reward_weights=[0.5, 2.0],
    )
    critic_before = copy.deepcopy(trainer.critic.module.state_dict())
    stats = trainer.step(PROMPTS)
    for key in [
        "generated_texts",
        "rewards",
        "mean_reward",
        "policy_loss",
        "value_loss",
        "kl",
        "kl_coef",
        "entropy",
        "clipfrac",
        "response_length",
        "advantages/mean",
        "advantages/std",
        "returns/mean",
        "explained_variance",
        "approx_kl",
        "vf_clipfrac",
        "eos_fraction",
        "time/generate_s",
        "time/score_s",
        "time/update_s",
        "time/update_tokens_per_s",
    ]:
        assert key in stats, key
    assert len(stats["generated_texts"]) == len(stats["rewards"]) == 4
    assert stats["mean_reward"] == pytest.approx(sum(stats["rewards"]) / 4, abs=1e-6)
    # The weighted sum: 0.5 * reward model + 2.0 * count_w1.
    assert stats["mean_reward"] == pytest.approx(
        0.5 * stats["rewards/reward_model"] + 2.0 * stats["rewards/count_w1"], abs=1e-5
    )
    assert all(isinstance(t, str) for t in stats["generated_texts"])
    assert any(not torch.equal(before[k], v) for k, v in tiny_policy.state_dict().items())
    assert any(not torch.equal(critic_before[k], v) for k, v in trainer.critic.module.state_dict().items())
    assert all(torch.equal(reward_before[k], v) for k, v in tiny_reward_model.state_dict().items())
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())
    assert all(p.grad is None for p in tiny_reward_model.parameters())
    assert all(torch.equal(before[k], v) for k, v in trainer.ref_model.state_dict().items())


def response_words(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def test_kl_is_zero_then_positive_and_adaptive_coef_moves(tiny_policy, tiny_tokenizer):
    trainer = PPOTrainer(
        small_config(learning_rate=1e-3, kl_horizon=100), tiny_policy, tiny_tokenizer, reward_funcs=response_words
    )
    first = trainer.step(PROMPTS)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    second = trainer.step(PROMPTS)
    assert second["kl"] != 0.0
    assert second["kl_coef"] != first["kl_coef"]


def test_missing_eos_penalty_and_masks_from_lengths_when_pad_is_eos(tiny_policy):
    # A tokenizer whose pad token is its EOS: masks must come from lengths, not ids.
    tokenizer = build_tokenizer([f"w{i}" for i in range(29)] + ["user", "assistant", ":"])
    tokenizer.pad_token = tokenizer.eos_token
    trainer = PPOTrainer(
        small_config(max_new_tokens=4, missing_eos_penalty=3.0),
        tiny_policy,
        tokenizer,
        reward_funcs=lambda completions, **k: [0.0] * len(completions),
    )
    from ppo.data import collate_prompts

    prompts = collate_prompts(tokenizer, PROMPTS)
    rollout = trainer.engine.generate(prompts, trainer.sampling)
    lengths = rollout.response_mask.sum(dim=1)
    for row, length, ended in zip(rollout.response_ids, lengths, rollout.ended):
        ids = row[: int(length)].tolist()
        if ended:
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
        else:
            assert int(length) == 4 and tokenizer.eos_token_id not in ids
    stats = trainer.step(PROMPTS)
    ended = round(stats["eos_fraction"] * 4)
    assert stats["mean_reward"] == pytest.approx(-3.0 * (4 - ended) / 4, abs=1e-6)


def test_top_k_one_is_greedy(tiny_policy, tiny_tokenizer):
    trainer = PPOTrainer(small_config(top_k=1), tiny_policy, tiny_tokenizer, reward_funcs=count_w1)
    from ppo.data import collate_prompts

    prompts = collate_prompts(tiny_tokenizer, ["w3 w4"])
    rollout = trainer.engine.generate(prompts, trainer.sampling)
    ids = prompts.input_ids
    expected = []
    with torch.no_grad():
        for _ in range(int(rollout.response_mask.sum())):
            token = tiny_policy(ids).logits[0, -1].argmax()
            expected.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    assert rollout.completion_ids()[0] == expected


def test_stop_strings_end_a_response(tiny_policy, tiny_tokenizer):
    trainer = PPOTrainer(
        small_config(max_new_tokens=12, stop_strings=["w5"], temperature=3.0),
        tiny_policy,
        tiny_tokenizer,
        reward_funcs=count_w1,
    )
    from ppo.data import collate_prompts

    rollout = trainer.engine.generate(collate_prompts(tiny_tokenizer, PROMPTS * 4), trainer.sampling)
    texts = tiny_tokenizer.batch_decode(rollout.completion_ids(), skip_special_tokens=True)
    for text, ended in zip(texts, rollout.ended.tolist()):
        words = text.split()
        if "w5" in words:
            assert words.index("w5") == len(words) - 1 and ended


def test_num_generations_repeats_prompts(tiny_policy, tiny_tokenizer):
    seen = {}

    def record(prompts, completions, **kwargs):
        seen["prompts"] = prompts
        return [0.0] * len(completions)

    trainer = PPOTrainer(small_config(num_generations=3), tiny_policy, tiny_tokenizer, reward_funcs=record)
    stats = trainer.step(["w3", "w4"])
    assert len(stats["generated_texts"]) == 6
    assert seen["prompts"] == ["w3"] * 3 + ["w4"] * 3


def test_reward_funcs_get_extra_columns_and_unpadded_ids(tiny_policy, tiny_tokenizer):
    seen = {}

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(answer=answer, ids=completion_ids, completions=completions)
        return [1.0] * len(completions)

    trainer = PPOTrainer(small_config(), tiny_policy, tiny_tokenizer, reward_funcs=[reward])
    trainer.step(PROMPTS, extras={"answer": ["a", "b", "c", "d"]})
    assert seen["answer"] == ["a", "b", "c", "d"]
    eos = tiny_tokenizer.eos_token_id
    for ids, text in zip(seen["ids"], seen["completions"]):
        assert 1 <= len(ids) <= 6  # the real tokens only: never padded to the batch's width
        assert eos not in ids[:-1]  # nothing after the first EOS
        assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_a_samples_draw_depends_on_its_seed_not_its_batch(tiny_policy, tiny_tokenizer):
    from ppo.data import collate_prompts

    trainer = PPOTrainer(small_config(), tiny_policy, tiny_tokenizer, reward_funcs=count_w1)
    pair = collate_prompts(tiny_tokenizer, ["w3 w4 w5", "w4"])
    pair.seeds = [11, 12]
    alone = collate_prompts(tiny_tokenizer, ["w4"])
    alone.seeds = [12]
    together = trainer.engine.generate(pair, trainer.sampling).completion_ids()
    assert together[1] == trainer.engine.generate(alone, trainer.sampling).completion_ids()[0]


def test_gumbel_sampling_matches_the_softmax(tiny_policy, tiny_tokenizer):
    from dataclasses import replace

    from ppo.data import collate_prompts

    trainer = PPOTrainer(small_config(temperature=0.8), tiny_policy, tiny_tokenizer, reward_funcs=count_w1)
    n = 4000
    batch = collate_prompts(tiny_tokenizer, ["w3 w4"] * n)
    batch.seeds = list(range(n))
    first = trainer.engine.generate(batch, replace(trainer.sampling, max_new_tokens=1)).response_ids[:, 0]
    with torch.no_grad():
        probs = torch.softmax(tiny_policy(batch.input_ids[:1]).logits[0, -1] / 0.8, dim=-1)
    freq = torch.bincount(first, minlength=probs.numel()).float() / n
    assert (freq - probs).abs().max() < 0.03  # ~4 standard errors at p=0.1


def test_host_release_memory_changes_nothing_but_the_allocator(tiny_policy, tiny_tokenizer, monkeypatch):
    """Large blocks are mapped from the trainer's construction on, the memory releaser runs before
    sampling, after sampling, after scoring and after each model's pass, and the step's numbers are
    the same with and without it."""
    import ppo.fastpath.host_memory as host_memory
    from ppo.config import plan_batches

    calls = []
    monkeypatch.setattr(host_memory, "release_free_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(host_memory, "_glibc", lambda: object())  # a glibc whatever the platform
    mapped = []  # mapping large blocks is process-wide: recorded, not done, in the test process
    monkeypatch.setattr(host_memory, "map_large_blocks", lambda: mapped.append(1) or True)
    results = {}
    for release in (False, True):
        config = small_config(host_release_memory=release, ppo_epochs=2, mini_batch_size=2)
        trainer = PPOTrainer(config, copy.deepcopy(tiny_policy), tiny_tokenizer, reward_funcs=count_w1)
        stats = trainer.step(PROMPTS)
        results[release] = (stats, [p.detach().clone() for p in trainer.policy.parameters()])
    plan = plan_batches(config, n_prompts=len(PROMPTS))
    assert len(calls) == 3 + 2 * config.ppo_epochs * plan.steps_per_epoch
    assert mapped == [1]  # once, when the trainer was built
    (off, weights_off), (on, weights_on) = results[False], results[True]
    assert off["generated_texts"] == on["generated_texts"]
    assert all(off[k] == on[k] for k in ("mean_reward", "kl", "loss", "policy_loss", "value_loss"))
    assert all(torch.equal(a, b) for a, b in zip(weights_off, weights_on))


def test_pruned_last_layer_step_matches_the_whole_layer(tiny_policy, tiny_tokenizer, tiny_reward_model):
    """A PPO step (reward model, separate critic, two epochs of two mini-batches) gives the same
    statistics and weights with the last layer pruned as with it whole, to float rounding."""
    results = {}
    for prune in (False, True):
        config = small_config(prune_last_layer=prune, ppo_epochs=2, mini_batch_size=2)
        trainer = PPOTrainer(
            config, copy.deepcopy(tiny_policy), tiny_tokenizer, reward_model=copy.deepcopy(tiny_reward_model)
        )
        stats = trainer.step(PROMPTS)
        results[prune] = (
            stats,
            [p.detach().clone() for p in [*trainer.policy.parameters(), *trainer.critic.module.parameters()]],
        )
    (whole, weights_whole), (pruned, weights_pruned) = results[False], results[True]
    assert whole["generated_texts"] == pruned["generated_texts"]
    for key in ("mean_reward", "kl", "loss", "policy_loss", "value_loss"):
        assert pruned[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(weights_whole, weights_pruned):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
