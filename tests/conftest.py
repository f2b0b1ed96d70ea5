"""Shared fixtures: tiny Qwen3 models and a word-level tokenizer built locally (no download)."""

from __future__ import annotations

import pytest
import torch

from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model, build_tokenizer

WORDS = [f"w{i}" for i in range(29)] + ["user", "assistant", ":"]


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-model runs: they gain nothing from intra-op threads, and threads thrash
    when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quiet_bf16_emulation():
    """precision=bf16 on a CPU without AVX512-BF16/AMX warns that it is slow: expected in these tests."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="precision=bf16 on a CPU")
        yield


@pytest.fixture
def fresh_gate():
    """The fast-path gate with no verdicts before and after the test (its checks run again)."""
    from ppo.fastpath import gate

    gate.reset()
    yield
    gate.reset()


@pytest.fixture
def tiny_tokenizer():
    return build_tokenizer(WORDS)


@pytest.fixture
def tiny_policy(tiny_tokenizer):
    return build_policy(tiny_tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=0)


@pytest.fixture
def tiny_reward_model(tiny_tokenizer):
    return build_reward_model(tiny_tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=1)
