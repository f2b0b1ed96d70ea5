"""LoRA through peft: the reference is the policy with its adapter disabled (no second copy)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from ppo import PPOConfig, PPOTrainer
from ppo.checkpoint import save_checkpoint
from ppo.forward import policy_logprobs
from ppo.resume import restore, trainer_state

peft = pytest.importorskip("peft")

PROMPTS = ["w3 w4", "w5 w6 w7", "w2", "w8 w9 w10"]


def length_reward(completions, **kwargs):
    return [len(c.split()) / 4 for c in completions]


def lora_config(**kw):
    return PPOConfig(
        batch_size=4, max_new_tokens=4, lora_r=4, lora_alpha=8, learning_rate=1e-2, progress_bar=False, **kw
    )


def test_lora_reference_is_the_adapter_disabled_base(tiny_policy, tiny_tokenizer):
    base = copy.deepcopy(tiny_policy)
    trainer = PPOTrainer(lora_config(), tiny_policy, tiny_tokenizer, reward_funcs=length_reward)
    assert trainer.ref_model is None  # no second copy of the weights
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.step(PROMPTS)
    second = trainer.step(PROMPTS)
    assert second["kl"] != 0.0  # the adapter moved the policy away from the reference
    # The reference log-probs are the untouched base model's.
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), trainer.policy.disable_adapter():
        ref, _, _ = policy_logprobs(trainer.policy, ids, mask, 3, 1.0)
    want, _, _ = policy_logprobs(base, ids, mask, 3, 1.0)
    assert torch.allclose(ref, want, atol=1e-6)
    for name, tensor in base.state_dict().items():  # base weights never change
        peft_name = name.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "k_proj.weight", "k_proj.base_layer.weight"
        )
        peft_name = peft_name.replace("v_proj.weight", "v_proj.base_layer.weight").replace(
            "o_proj.weight", "o_proj.base_layer.weight"
        )
        assert torch.equal(trainer.policy.get_base_model().state_dict()[peft_name], tensor)


def test_peft_config_object_and_merged_save(tiny_policy, tiny_tokenizer, tmp_path):
    from peft import LoraConfig

    config = PPOConfig(batch_size=4, max_new_tokens=4, learning_rate=1e-2, save_merged=True, progress_bar=False)
    trainer = PPOTrainer(
        config,
        tiny_policy,
        tiny_tokenizer,
        reward_funcs=length_reward,
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    trainer.step(PROMPTS)
    trainer.save_pretrained(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "merged")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trainer.policy(input_ids=ids).logits, atol=1e-5)


def test_lora_critic_and_checkpoint_round_trip(tiny_policy, tiny_tokenizer, tmp_path):
    trainer = PPOTrainer(
        lora_config(lora_critic=True, output_dir=str(tmp_path)), tiny_policy, tiny_tokenizer, reward_funcs=length_reward
    )
    critic_trainable = {n for n, p in trainer.critic.module.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in critic_trainable) and any("score" in n for n in critic_trainable)
    assert all("lora_" in n or "score" in n for n in critic_trainable)
    trainer.step(PROMPTS)
    save_checkpoint(
        tmp_path, "step_1", trainer.policy, tiny_tokenizer, trainer.critic.module, trainer_state(trainer, 0, 1)
    )
    policy_after = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    critic_after = {k: v.clone() for k, v in trainer.critic.module.state_dict().items()}
    trainer.step(PROMPTS)  # move away, then restore
    restore(trainer, tmp_path / "step_1")
    assert all(torch.equal(policy_after[k], v) for k, v in trainer.policy.state_dict().items())
    assert all(torch.equal(critic_after[k], v) for k, v in trainer.critic.module.state_dict().items())


def test_8bit_adam_without_gpu_is_a_clear_error(tiny_policy, tiny_tokenizer):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="adamw_8bit needs a CUDA GPU"):
        PPOTrainer(PPOConfig(optimizer="adamw_8bit"), tiny_policy, tiny_tokenizer, reward_funcs=length_reward)
