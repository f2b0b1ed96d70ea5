"""Plumbing shared by the stage recipes (sft, reward, train, eval): output-directory safety,
held-out splits, batches and the `--config key=value` CLI (the optimizer, schedule and NaN guards
are in `ppo.optim`).

Under torchrun every rank runs the recipe; the helpers here keep file writes on rank 0 (the others
wait at a barrier) and split each optimizer step's rows over the ranks (`rank_micro_batches`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ppo import distributed as dist
from ppo.config import ConfigError, config_help, config_to_dict, load_config, save_config
from ppo.metrics import main_logger


class OutputDirError(FileExistsError):
    """output_dir already holds the outputs of a different run and `overwrite` is off."""


OUTPUTS = ("config.yaml", "metrics.jsonl", "final")  # what a stage run writes in output_dir


def check_output_dir(config) -> Path:
    """output_dir as a Path, after refusing one that holds a different run (unless `overwrite`).

    "The same run" means its config.yaml equals this config (so re-running a command is allowed);
    a non-empty directory without a config.yaml could be anything and is refused too.
    """
    out = Path(config.output_dir)
    if config.overwrite or not out.exists() or not any(out.iterdir()):
        return out
    previous = out / "config.yaml"
    if previous.is_file():
        import yaml

        old = yaml.safe_load(previous.read_text(encoding="utf-8")) or {}
        new = config_to_dict(config)
        if {k: v for k, v in old.items() if k != "overwrite"} == {k: v for k, v in new.items() if k != "overwrite"}:
            return out
    raise OutputDirError(
        f"output_dir {str(out)!r} is not empty and holds a different run (its config.yaml differs or is missing); "
        "choose another output_dir or set overwrite=true to replace its outputs"
    )


def start_outputs(out: Path, config):
    """Remove this recipe's previous outputs, write config.yaml, open metrics.jsonl (rank 0; the
    barrier first lets every rank finish `check_output_dir` before anything is removed)."""
    dist.barrier()
    if dist.is_main():
        remove_outputs(out, OUTPUTS)
        save_config(config, out / "config.yaml")
    return main_logger(out)


def remove_outputs(out: Path, names) -> None:
    """Delete the files and directories `names` under `out` (those that exist)."""
    import shutil

    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def finish_outputs(out: Path, config, model, tokenizer, logger, metrics: dict) -> None:
    """Log the summary line and save output_dir/final (weights checked for NaN/inf first).
    Every rank calls; rank 0 writes."""
    from ppo.checkpoint import save_model_dir_main

    logger.log(metrics["steps"], {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "steps"})
    logger.close()
    if config.save_final:
        save_model_dir_main(out / "final", dist.unwrap(model), tokenizer)


def load_causal_lm(config, model=None, tokenizer=None):
    """(model, tokenizer): the ones given, else loaded from `config.model_name_or_path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppo.data import ensure_pad_token

    source = config.model_name_or_path or getattr(model, "name_or_path", None)
    if model is None:
        if not config.model_name_or_path:
            raise ConfigError("no model: set model_name_or_path=<dir or hub name> or pass model=")
        # fp32 master weights: AdamW steps of ~1e-5 vanish in bf16 rounding.
        model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    if tokenizer is None:
        if not source:
            raise ConfigError("no tokenizer: set model_name_or_path= or pass tokenizer=")
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: completions need one so the model learns to stop")
    ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:  # so the saved model works in batches on its own
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def split_rows(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) rows: a seeded random `eval_fraction` held out (at least one row when > 0)."""
    if eval_fraction <= 0 or len(rows) < 2:
        return list(rows), []
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_fraction)))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def step_groups(n: int, per_step: int, num_epochs: int, seed: int, units: list[list[int]] | None = None):
    """(epoch, row indices of one optimizer step) in training order; each epoch reshuffled from
    `seed` (the same order as PPO's loop), the last short group kept. With `units` (lists of row
    indices covering the n rows) the shuffle moves whole units, whose rows stay next to each other."""
    from ppo.loop import epoch_order

    for epoch in range(num_epochs):
        order = epoch_order(n, seed, epoch) if units is None else [i for u in epoch_order(len(units), seed, epoch) for i in units[u]]
        for start in range(0, n, per_step):
            yield epoch, order[start : start + per_step]


def rank_micro_batches(items: list, batch_size: int) -> list[tuple[list, float]]:
    """This rank's share of one optimizer step's `items` as (micro-batch, weight) pairs.

    Every rank gets the same number of micro-batches of at most `batch_size` (DDP and FSDP2 need
    matching collectives): a rank short of rows repeats `items[:1]` with weight 0, which adds
    exactly nothing to the gradient. One process: `items` in chunks of `batch_size`, weight 1.
    """
    share = items[dist.shard_slice(len(items))]
    longest = -(-len(items) // dist.world_size())
    count = -(-longest // batch_size)
    micros = [share[i * batch_size : (i + 1) * batch_size] for i in range(count)]
    return [(micro, 1.0) if micro else (items[:1], 0.0) for micro in micros]


def run_cli(stage: str, config_cls, train_fn, argv: list[str] | None, summary) -> int:
    """Parse `--config PATH key=value ...`, run `train_fn(config)`, print errors plainly."""
    fields = "\n".join(f"  {name} (default {default}): {help_}" for name, default, help_ in config_help(config_cls))
    parser = argparse.ArgumentParser(
        prog=f"ppo-rlhf {stage}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Run the {stage} recipe from a YAML config plus key=value overrides.",
        epilog=f"keys:\n{fields}",
    )
    parser.add_argument("--config", help="YAML file of keys (see below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, values parsed as YAML")
    args, extra = parser.parse_known_args(argv)  # `--key=value` is accepted as an override too
    try:
        config = load_config(config_cls, args.config, args.overrides + extra)
        with dist.report_failures(f"ppo-rlhf {stage}"):
            metrics = train_fn(config)
    except ConfigError as err:
        print(f"ppo-rlhf {stage}: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"ppo-rlhf {stage}: error: {err}", file=sys.stderr)
        return 1  # no teardown after a failure: the launcher ends the other ranks
    main = dist.is_main()
    dist.teardown()
    if main:
        print(f"ppo-rlhf {stage}: {metrics['steps']} steps, {summary(metrics)}; outputs in {metrics['output_dir']}")
    return 0


def given_or_loaded_rows(rows, data: str | None, keys: tuple[str, ...], load, what: str) -> list[dict[str, str]]:
    """`rows` as given when each is already a dict of `keys` to strings, else `load(rows or data)`
    (a `ppo.formats` reader, which pulls in `datasets` only then); refuses no data and empty data."""
    if rows is None and data is None:
        raise ConfigError(f"no {what}: set data=<file> or pass rows=")
    if isinstance(rows, list) and all(isinstance(r, dict) and all(isinstance(r.get(k), str) for k in keys) for r in rows):
        loaded = rows
    else:
        loaded = load(data if rows is None else rows)
    if not loaded:
        raise ValueError(f"no {what} to train on: the data is empty")
    return loaded
