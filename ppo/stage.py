"""Plumbing shared by the stage recipes (sft, reward, train, eval): output-directory safety,
the SFT and reward stages' precision, held-out splits, batches and the `--config key=value` CLI,
with the `--key value` spellings of other PPO scripts (the optimizer, schedule and NaN guards are
in `ppo.optim`).

Under torchrun every rank runs the recipe; the helpers here keep file writes on rank 0 (the others
wait at a barrier) and split each optimizer step's rows over the ranks (`rank_micro_batches`).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import sys
from pathlib import Path

import torch

from ppo import distributed as dist
from ppo.config import ConfigError, config_help, config_to_dict, load_config, save_config
from ppo.metrics import main_logger
from ppo.models import quiet_transformers_bars


class OutputDirError(FileExistsError):
    """output_dir holds another run, a finished one, or this run's own inputs (unless `overwrite`)."""


# What a stage writes in output_dir (names or glob patterns). `overwrite` removes these and nothing
# else: a user's own files there (a prompts file, notes) are never touched.
# sft, reward (final/ is published by rename)
OUTPUTS = ("config.yaml", "metrics.jsonl", "run.json", "run.json.tmp", "final", ".tmp-*", ".trash-*")
PPO_OUTPUTS = OUTPUTS + ("final-merged", "step_*", "latest", "latest.tmp", "tensorboard")
EVAL_OUTPUTS = ("config.yaml", "eval.json", "run.json", "run.json.tmp")
# Config keys that name a run's inputs (files or directories it reads).
INPUT_KEYS = (
    "model_name_or_path",
    "reward_model_path",
    "value_model_path",
    "ref_model_path",
    "prompts_file",
    "dataset_name",
    "data",
    "text_file",
)


def check_output_dir(config, outputs: tuple[str, ...] = OUTPUTS, finished: str | None = "final") -> Path:
    """output_dir as a Path, after refusing (OutputDirError) what this run must not write into.
    Reads only: nothing is removed here (`remove_outputs` does that once the run has loaded).

    Refused: an output_dir that is one of the run's inputs, or whose outputs hold one (`overwrite`
    would delete it); unless `overwrite` (or, for PPO, `resume_from_checkpoint`): a directory
    holding a different run (its config.yaml differs or is missing), a finished run of the same
    config (`finished` exists: running again would replace it), or checkpoints of an unfinished one.
    The same config with nothing finished may run again (a run that stopped before any output).
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {str(out)!r} is a file, not a directory; choose another output_dir")
    _check_inputs_outside(out, config, outputs)
    if (
        config.overwrite
        or getattr(config, "resume_from_checkpoint", None)
        or not out.exists()
        or not any(out.iterdir())
    ):
        return out
    if not _same_config(out / "config.yaml", config):
        raise OutputDirError(
            f"output_dir {str(out)!r} is not empty and holds a different run (its config.yaml differs or is missing); "
            f"choose another output_dir or set overwrite=true to replace its outputs ({', '.join(outputs)}; other "
            "files stay)"
        )
    resume = " or resume_from_checkpoint=latest to continue it," if hasattr(config, "resume_from_checkpoint") else ""
    if finished and (out / finished).exists():
        raise OutputDirError(
            f"output_dir {str(out)!r} holds a finished run of this same config ({finished} exists); set "
            f"overwrite=true to run it again (its outputs are replaced),{resume} or choose another output_dir"
        )
    if any(out.glob("step_*")):
        raise OutputDirError(
            f"output_dir {str(out)!r} holds checkpoints of an unfinished run of this config; set "
            f"resume_from_checkpoint=latest to continue it, or overwrite=true to start again"
        )
    return out


def _same_config(path: Path, config) -> bool:
    if not path.is_file():
        return False
    import yaml

    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    ignored = ("overwrite", "resume_from_checkpoint")  # how a run was started, not what it is
    new = config_to_dict(config)
    return isinstance(old, dict) and {k: v for k, v in old.items() if k not in ignored} == {
        k: v for k, v in new.items() if k not in ignored
    }


def input_paths(config) -> dict[str, Path]:
    """The local files and directories `config` reads, by key (hub names and absent paths left out)."""
    found = {key: getattr(config, key, None) for key in INPUT_KEYS}
    for i, spec in enumerate(getattr(config, "reward_funcs", None) or []):
        if isinstance(spec, str) and ".py:" in spec:
            found[f"reward_funcs[{i}]"] = spec.rpartition(":")[0]
    return {
        key: Path(value) for key, value in found.items() if isinstance(value, str) and value and Path(value).exists()
    }


def _check_inputs_outside(out: Path, config, outputs: tuple[str, ...]) -> None:
    """Refuse an output_dir that is an input itself, or whose outputs (which `overwrite` deletes and
    the run replaces) contain one - e.g. output_dir = the policy's own directory, or a PPO run into
    the directory whose final/ is its policy. Inputs elsewhere in output_dir are fine."""
    root = out.resolve()
    for key, path in input_paths(config).items():
        path = path.resolve()
        if path == root:
            raise OutputDirError(f"output_dir {str(out)!r} is this run's {key} ({path}); choose another output_dir")
        if root in path.parents:
            top = path.relative_to(root).parts[0]
            if any(fnmatch.fnmatch(top, pattern) for pattern in outputs):
                raise OutputDirError(
                    f"{key} {str(path)!r} lies in {str(out / top)!r}, an output this run replaces; "
                    "choose another output_dir (or move the input)"
                )


def start_outputs(out: Path, config, model, precision: str):
    """Remove this recipe's previous outputs, write config.yaml and run.json (`ppo.run_record`:
    what `model` runs on, in `precision`), open metrics.jsonl (rank 0; the barrier first lets every
    rank finish `check_output_dir` before anything is removed). Recipes call it once the model and
    data have loaded: a run that cannot start removes nothing."""
    from ppo.run_record import record_start, what_ran

    dist.barrier()
    if dist.is_main():
        remove_outputs(out, OUTPUTS)
        save_config(config, out / "config.yaml")
        device = next(model.parameters()).device
        record_start(out, what_ran(config, device, precision, {"model": dist.unwrap(model)}))
    return main_logger(out)


def remove_outputs(out: Path, names) -> None:
    """Delete what matches `names` (file or directory names, or glob patterns) directly under
    `out`; nothing else. A symbolic link is removed, never what it points to."""
    import shutil

    if not out.is_dir():
        return
    for pattern in names:
        for path in sorted(out.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def finish_outputs(out: Path, config, model, tokenizer, logger, metrics: dict) -> None:
    """Log the summary line and save output_dir/final (weights checked for NaN/inf first), written
    aside and renamed into place: a failed save leaves no half-written final/. Every rank calls;
    rank 0 writes."""
    from ppo.checkpoint import publish_dir, save_model_dir_main

    logger.log(metrics["steps"], {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "steps"})
    logger.close()
    if config.save_final:
        publish_dir(out / "final", lambda tmp: save_model_dir_main(tmp, dist.unwrap(model), tokenizer))


def load_causal_lm(config, model=None, tokenizer=None):
    """(model, tokenizer): the ones given, else loaded from `config.model_name_or_path`."""
    from ppo.models import load_causal_lm as load_model
    from ppo.run_inputs import ready_tokenizer

    source = config.model_name_or_path or getattr(model, "name_or_path", None)
    if model is None:
        if not config.model_name_or_path:
            raise ConfigError("no model: set model_name_or_path=<dir or hub name> or pass model=")
        # fp32 master weights: AdamW steps of ~1e-5 vanish in bf16 rounding.
        model = load_model(config.model_name_or_path, dtype=torch.float32)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = ready_tokenizer(tokenizer, source, "completions need one so the model learns to stop")
    if model.config.pad_token_id is None:  # so the saved model works in batches on its own
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def stage_precision(config, model):
    """(the precision `config.precision` resolves to on `model`'s device, a factory of fresh
    contexts for one forward pass in it). Under bf16 the forwards run in autocast, as PPO's do
    (`ppo.precision`): the model's matmuls in bf16, its weights and AdamW states fp32, losses,
    scores and accuracies computed in fp32 (`ppo.forward`); on a CPU attention runs torch's fp32
    kernel (`ppo.fastpath.fp32_attention`) unless its bf16 one is clearly faster on this machine
    (timed once: with AMX it may be). Backward runs outside it."""
    from ppo.precision import autocast_context, resolve_precision
    from ppo.roles import attend_in_fp32

    device = next(model.parameters()).device
    precision = resolve_precision(config.precision, device)
    attend_in_fp32([dist.unwrap(model)], precision, device, "auto")
    return precision, lambda: autocast_context(precision, device)


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
        order = (
            epoch_order(n, seed, epoch)
            if units is None
            else [i for u in epoch_order(len(units), seed, epoch) for i in units[u]]
        )
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


def run_steps(
    config, model, optimizer, schedule, logger, steps, total_steps: int, accumulate, desc: str, postfix
) -> list[dict[str, float]]:
    """The optimizer steps of an SFT or reward-model stage, in train mode: for each (epoch, row
    indices) of `steps`, `accumulate(group, step, epoch)` runs the backward passes and returns the
    step's numbers ({"loss": ...}), then the clipped, scheduled optimizer step; a metrics line every
    `logging_steps` and at the last step; a progress bar showing `postfix(numbers)`. Returns each
    step's numbers, in order."""
    from tqdm.auto import tqdm

    from ppo.optim import optimizer_step
    from ppo.run_record import complete_start

    records: list[dict[str, float]] = []
    model.train()
    bar = tqdm(total=total_steps, desc=desc, disable=not (config.progress_bar and dist.is_main()), dynamic_ncols=True)
    for epoch, group in steps:
        step = len(records) + 1
        numbers = accumulate(group, step, epoch)
        stats = optimizer_step(model, optimizer, schedule, config.max_grad_norm, step, epoch)
        records.append(numbers)
        if step % config.logging_steps == 0 or step == total_steps:
            logger.log(step, {**numbers, "epoch": epoch + 1, **stats})
        bar.update(1)
        bar.set_postfix(**postfix(numbers))
    bar.close()
    model.eval()
    complete_start(config.output_dir)  # run.json: the fast paths the steps asked for
    return records


def run_cli(stage: str, config_cls, train_fn, argv: list[str] | None, summary) -> int:
    """Parse `--config PATH key=value ...`, run `train_fn(config)`, print errors plainly."""
    fields = "\n".join(f"  {name} (default {default}): {help_}" for name, default, help_ in config_help(config_cls))
    parser = argparse.ArgumentParser(
        prog=f"ppo-rlhf {stage}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Run the {stage} recipe from a YAML config plus key=value overrides.",
        epilog=f"keys:\n{fields}",
    )
    parser.add_argument("--config", help="YAML file of keys (see below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, values parsed as YAML")
    args, extra = parser.parse_known_args(argv)  # `--key=value` is accepted as an override too
    try:
        config = load_config(config_cls, args.config, args.overrides + extra)
        # progress_bar: false means no bars at all, transformers' "Loading weights" ones included.
        quiet = contextlib.nullcontext() if getattr(config, "progress_bar", True) else quiet_transformers_bars()
        with dist.report_failures(f"ppo-rlhf {stage}"), quiet:
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
        steps = f"{metrics['steps']} steps" + (f" in {metrics['precision']}" if "precision" in metrics else "")
        print(f"ppo-rlhf {stage}: {steps}, {summary(metrics)}; outputs in {metrics['output_dir']}")
    return 0


# The flag names users of other PPO scripts type, mapped to our config keys.
ALIASES = {"model_name": "model_name_or_path", "model": "model_name_or_path", "reward_model": "reward_model_path"}


def normalise_argv(argv: list[str]) -> list[str]:
    """`--key value` -> `key=value` (aliases resolved), so every spelling reaches one parser."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and arg not in ("--config", "--help") and "=" not in arg:
            key = arg[2:].replace("-", "_")
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append(f"{ALIASES.get(key, key)}={argv[i + 1]}")
                i += 2
                continue
            out.append(f"{ALIASES.get(key, key)}=true")  # a bare flag: --overwrite
        elif "=" in arg and not arg.startswith("--config"):
            key, _, value = arg.lstrip("-").partition("=")
            out.append(f"{ALIASES.get(key, key)}={value}")
        else:
            out.append(arg)
        i += 1
    return out


def given_or_loaded_rows(rows, data: str | None, keys: tuple[str, ...], load, what: str) -> list[dict[str, str]]:
    """`rows` as given when each is already a dict of `keys` to strings, else `load(rows or data)`
    (a `ppo.formats` reader, which pulls in `datasets` only then); refuses no data and empty data."""
    if rows is None and data is None:
        raise ConfigError(f"no {what}: set data=<file> or pass rows=")
    if isinstance(rows, list) and all(
        isinstance(r, dict) and all(isinstance(r.get(k), str) for k in keys) for r in rows
    ):
        loaded = rows
    else:
        loaded = load(data if rows is None else rows)
    if not loaded:
        raise ValueError(f"no {what} to train on: the data is empty")
    return loaded
