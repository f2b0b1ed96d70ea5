"""The one gate every fast path passes before it may run.

`fast_path_allowed(name, model)` says yes only when
1. the installed releases of the libraries whose internals the fast path reads are inside the
   window the suite was run against (`TESTED_WINDOW`);
2. the model's architecture is one the fast path knows (its module's `architecture_reason`);
3. on a tiny, freshly built model of the same architecture (`tiny_twin`), the fast path gave what
   the stock transformers/torch computation gives, to float rounding (its module's
   `mismatch_with_stock`). The check runs once per process per fast path and architecture, takes
   milliseconds, and leaves the global random state as it found it.
When any of them fails, the caller runs the stock path and one `FastPathWarning` names the fast
path, the model and the reason. Conditions of one call rather than of the architecture (gradient
checkpointing, an adapter, a KV cache passed in) are each fast path's own business: they step
aside silently there, because the stock path is then the only one that applies.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import types
import warnings

import torch
from packaging.version import Version

# The releases the suite has run against (the lock in constraints.txt sits inside it): lower bound
# inclusive, upper bound exclusive. Widen it only after `tools/test-latest` passes on the new release.
TESTED_WINDOW = {
    "transformers": ("4.56", "5.26"),
    "torch": ("2.4", "2.16"),
}

# Fast path -> (its module, the libraries whose internals it reads).
FAST_PATHS = {
    "prune_last_layer": ("ppo.fastpath.last_layer", ("transformers", "torch")),
    "lean_decode": ("ppo.fastpath.lean_decode", ("transformers", "torch")),
    "kv_cache": ("ppo.fastpath.kv_cache", ("transformers",)),
    "onednn_linear": ("ppo.fastpath.onednn_linear", ("torch",)),
    "fused_lm_head": ("ppo.fastpath.fused_head", ("transformers", "torch")),
    "bf16_frozen_weights": ("ppo.fastpath.bf16_weights", ("transformers", "torch")),
    "fused_mlp": ("ppo.fastpath.fused_mlp", ("transformers", "torch")),
    "fused_norm": ("ppo.fastpath.fused_norm", ("transformers", "torch")),
    "fp32_attention": ("ppo.fastpath.fp32_attention", ("transformers", "torch")),
}


class FastPathWarning(UserWarning):
    """A fast path was turned off; the stock computation runs instead (same maths, slower)."""


_verdicts: dict[tuple, str | None] = {}  # (fast path, architecture) -> None (on) or why it is off


def fast_path_allowed(name: str, model=None) -> bool:
    """Whether fast path `name` may run for `model` (a module or its config; None for fast paths
    that do not depend on a model). Warns once per fast path and architecture when it may not."""
    key = (name, architecture_key(model))
    if key not in _verdicts:
        reason = _judge(name, model)
        _verdicts[key] = reason
        if reason is not None:
            what = f" for {key[1][0]}" if key[1] else ""
            warnings.warn(
                f"ppo-rlhf: fast path '{name}' is off{what}: {reason}. The stock computation runs "
                "instead (same maths, slower).",
                FastPathWarning,
                stacklevel=3,
            )
    return _verdicts[key] is None


def verdicts() -> dict[str, str]:
    """What the gate decided so far in this process: 'on' or 'off: why', per fast path and model."""
    out = {}
    for (name, arch), reason in _verdicts.items():
        label = f"{name}[{arch[0]}]" if arch else name
        out[label] = "on" if reason is None else f"off: {reason}"
    return out


def reset() -> None:
    """Forget every verdict (tests; a process that upgraded a library)."""
    _verdicts.clear()


def version_reason(libraries) -> str | None:
    """Why the installed releases are outside `TESTED_WINDOW` (None when they are inside)."""
    for library in libraries:
        low, high = TESTED_WINDOW[library]
        try:
            installed = Version(Version(importlib.metadata.version(library)).base_version)
        except importlib.metadata.PackageNotFoundError:
            return f"{library} is not installed"
        if not Version(low) <= installed < Version(high):
            return f"{library} {installed} is outside the tested window (>= {low}, < {high})"
    return None


def _judge(name: str, model) -> str | None:
    module_name, libraries = FAST_PATHS[name]
    reason = version_reason(libraries)
    if reason is not None:
        return reason
    module = importlib.import_module(module_name)
    config = _config_of(model)
    if model is not None:
        if config is None:
            return f"{type(model).__name__} is not a transformers model (it has no config)"
        reason = module.architecture_reason(config)
        if reason is not None:
            return reason
    try:
        with _isolated():
            twin = tiny_twin(config) if model is not None else None
            error = module.mismatch_with_stock(twin)
    except Exception as exc:  # noqa: BLE001 - any failure of the check means: do not trust the fast path
        return f"its self-check against the stock computation failed to run ({type(exc).__name__}: {exc})"
    if error is not None:
        return f"it disagreed with the stock computation on a tiny model of the same architecture ({error})"
    return None


def _config_of(model):
    if model is None or not isinstance(model, torch.nn.Module):
        return model
    config = getattr(model, "config", None)
    if config is None:  # a bare decoder stack inside a wrapper
        for module in model.modules():
            if getattr(module, "config", None) is not None:
                return module.config
    return config


def architecture_key(model) -> tuple:
    """What a verdict depends on besides the installed versions: the model type, the attention
    implementation and the layer kinds (empty for fast paths without a model)."""
    config = _config_of(model)
    if config is None:
        return () if model is None else (type(model).__name__,)
    return (
        getattr(config, "model_type", type(config).__name__),
        getattr(config, "_attn_implementation", None),
        tuple(getattr(config, "layer_types", None) or ()),
        bool(getattr(config, "use_sliding_window", False)),
    )


@contextlib.contextmanager
def _isolated():
    """The check sees fp32 on the CPU, outside the caller's inference mode (each check picks its
    own grad mode), and leaves the caller's random state and autocast as they were."""
    with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False), torch.inference_mode(False):
        torch.manual_seed(0)
        yield


# Sizes of the tiny twin, under every name the transformers configs use for them.
_TINY = {
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "intermediate_size": 128,
    "n_inner": 128,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "head_dim": 16,
    "vocab_size": 96,
    "max_window_layers": 2,
}


def tiny_twin(config):
    """A freshly initialised fp32 causal LM of `config`'s architecture, 2 layers of width 64: the
    same classes, attention implementation, rotary settings and layer kinds, small enough that a
    forward takes a millisecond."""
    from transformers import AutoModelForCausalLM

    tiny = copy.deepcopy(config)
    for key, value in _TINY.items():
        if hasattr(tiny, key) and getattr(tiny, key) is not None:
            setattr(tiny, key, value)
    heads, kv_heads = getattr(config, "num_attention_heads", 1), getattr(config, "num_key_value_heads", None)
    if kv_heads is not None:  # keep grouped-query attention grouped, multi-head multi-head
        tiny.num_key_value_heads = 2 if kv_heads < heads else 4
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers < 2:  # a one-layer model gets a one-layer twin
        tiny.num_hidden_layers = layers
    if getattr(tiny, "layer_types", None):
        tiny.layer_types = list(config.layer_types[: getattr(tiny, "num_hidden_layers", 2)])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tiny, key, None)
        if isinstance(value, int) and value >= tiny.vocab_size:
            setattr(tiny, key, 1)
        elif isinstance(value, list):
            setattr(tiny, key, [v if v < tiny.vocab_size else 1 for v in value])
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    model = AutoModelForCausalLM.from_config(tiny, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def tiny_batch(width: int = 10, vocab: int = 96):
    """Two rows of token ids `[2, width]`, the first left-padded by 3, their attention mask and
    position ids: what the fast paths' checks feed both computations."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, width), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


def replace_forwards(name: str, model, modules, forward) -> int:
    """For fast paths that replace modules' forwards: `forward` bound to each of `modules` (of
    `model`) that has no forward of its own yet, where fast path `name` may run; returns how many."""
    todo = [module for module in modules if "forward" not in vars(module)]
    if not todo or not fast_path_allowed(name, model):
        return 0
    for module in todo:
        module.forward = types.MethodType(forward, module)
    return len(todo)


def patched_twin_mismatch(twin, find_modules, forward) -> str | None:
    """For fast paths that replace modules' forwards: logits and every parameter's gradient of
    `twin` against a copy of it whose `find_modules(copy)` run `forward` (fp32), or None when they agree."""
    patched = copy.deepcopy(twin)
    for module in find_modules(patched):
        module.forward = types.MethodType(forward, module)
    ids, mask, positions = tiny_batch()
    results = []
    for model in (twin, patched):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            (logits.float().pow(2).mean()).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (stock_logits, stock_grads), (fast_logits, fast_grads) = results
    error = max_error(fast_logits, stock_logits)
    if error is not None:
        return f"logits: {error}"
    if stock_grads.keys() != fast_grads.keys():
        return "different parameters received gradients"
    for name, grad in stock_grads.items():
        error = max_error(fast_grads[name], grad)
        if error is not None:
            return f"gradient of {name}: {error}"
    return None


def one_process() -> bool:
    """Not under a multi-rank torchrun: fast paths that replace a module's forward step aside
    there, where FSDP2's parameter handling must see the module's own forward."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_world_size() == 1


def max_error(fast: torch.Tensor, stock: torch.Tensor, rtol: float = 1e-4) -> str | None:
    """None when `fast` equals `stock` to fp32 rounding (relative to `stock`'s largest value), else
    a description of the largest difference."""
    if fast.shape != stock.shape:
        return f"shape {tuple(fast.shape)} vs {tuple(stock.shape)}"
    scale = max(1.0, float(stock.abs().max()))
    diff = float((fast.float() - stock.float()).abs().max())
    if not diff <= rtol * scale:  # NaN fails too
        return f"max |difference| {diff:.3g} at scale {scale:.3g}"
    return None
