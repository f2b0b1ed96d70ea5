#!/usr/bin/env python3
"""One benchmark process for ppo-rlhf: K warm-up + N measured PPO iterations on one workload.

`run.py` starts one of these per (workload, precision) so that every run has its own memory peak,
its own thread pinning and a fresh allocator. Prints one line `RESULT_JSON {...}` at the end, the
same shape of record as the TRL anchor's bench prints.

    python benchmarks/ppo_bench.py --workload W1 --iters 3 --warmup 1 --precision fp32
    python benchmarks/ppo_bench.py --workload W4 --model-dir DIR --prompts-json FILE --iters 1 --warmup 0
"""

from __future__ import annotations

import os
import sys

# Offline and thread counts pinned before torch / transformers are imported.
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, however we are started
import machine
import real_model
from workloads import (
    SMOKE,
    WORKLOADS,
    build_models,
    build_prompts,
    build_tokenizer,
    flop_params,
    workload_flops,
)

PHASES = ("generate", "score", "update")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=[*WORKLOADS, "smoke"], default="W1")
    p.add_argument("--iters", type=int, default=3, help="measured iterations (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up iterations (not measured)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--fp32-matmul", choices=["auto", "mkl", "onednn"], default="auto", help="PPOConfig.fp32_matmul")
    p.add_argument(
        "--release-memory", action="store_true", help="PPOConfig.host_release_memory: less peak RSS, more time"
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="PPOConfig.gradient_accumulation_steps: each mini-batch's forward/backward in N pieces (less activation "
        "memory; same optimizer steps)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="PPOConfig.gradient_checkpointing: activations recomputed in backward (less memory, more time)",
    )
    add_compile_layers_option(p, "(compiling falls in the warm-up)")
    p.add_argument(
        "--bf16-attention",
        action="store_true",
        help="PPOConfig.fp32_attention=false: under bf16, attention on torch's bf16 CPU kernels (default: auto)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--peak-seconds", type=float, default=2.0, help="seconds per dtype for the matmul-peak timing (0: skip)"
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after the measured iterations, profile one more with torch.profiler: DIR/phases.txt, ops.txt, trace.json",
    )
    p.add_argument(
        "--split-matmul",
        action="store_true",
        help="after the measured iterations, run one more with every matrix product timed: per phase, matmul vs other",
    )
    p.add_argument(
        "--model-dir",
        default=None,
        help="W4: the model directory (default: SmolLM2 converted once into benchmarks/.cache/smollm2-135m)",
    )
    p.add_argument(
        "--prompts-json",
        default=None,
        help="W4: the prompts file (texts, ids) the anchor reads too; default: made here",
    )
    return p.parse_args(argv)


def add_compile_layers_option(parser: argparse.ArgumentParser, note: str) -> None:
    """`--compile-layers [auto|true|false]`, PPOConfig.compile_layers (here and in run.py, which passes it on)."""
    parser.add_argument(
        "--compile-layers",
        nargs="?",
        const="true",
        default="auto",
        choices=["auto", "true", "false"],
        help="PPOConfig.compile_layers: decoder layers through torch.compile; alone: true; default auto (on under "
        f"bf16 on an AMX CPU for layers of >= 10M parameters) {note}",
    )


def system_label(
    micro_batches: int, gradient_checkpointing: bool, compiled_layers: str = "", attention: str = ""
) -> str:
    """The row's name: "ppo-rlhf", plus each memory or speed switch that is on (or off by request),
    and `attention`: which bf16 attention kernels ran where they are not the fp32 ones."""
    switches = [f"{micro_batches} micro-batches"] if micro_batches != 1 else []
    switches += ["gradient checkpointing"] if gradient_checkpointing else []
    switches += [compiled_layers] if compiled_layers else []
    switches += [attention] if attention else []
    return ", ".join(["ppo-rlhf", *switches])


def compile_switch(compiled: bool, asked: str) -> str:
    """What the row's name says about compile_layers: nothing where the layers ran eagerly."""
    return ("compiled layers (auto)" if asked == "auto" else "compiled layers") if compiled else ""


def attention_switch(precision: str, implementation: str | None, asked_bf16: bool) -> str:
    """What the row's name says about attention under bf16: nothing where it ran in fp32 (the
    default's choice on CPUs without AMX), else whether `auto` or the command line chose bf16."""
    from ppo.fastpath import fp32_attention

    if precision != "bf16" or implementation == fp32_attention.NAME:
        return ""
    how = "" if asked_bf16 else " (auto)"
    if implementation == fp32_attention.DECODE_NAME:
        return f"bf16 attention outside sampling{how}"
    return f"bf16 attention{how}"


def build_trainer(
    w,
    precision: str,
    seed: int,
    output_dir: str,
    fp32_matmul: str = "auto",
    release_memory: bool = False,
    micro_batches: int = 1,
    gradient_checkpointing: bool = False,
    model_dir: str | None = None,
    compile_layers: bool | str = "auto",
    fp32_attention: bool | str = "auto",
):
    """The trainer on workload `w` (a real-model workload: from `model_dir`), sampling exactly R
    tokens per response (no stop token)."""
    from ppo import PPOConfig, PPOTrainer

    if w.real_model:
        tokenizer, policy, reference, reward_model, value_model = real_model.build_models(model_dir, seed)
    else:
        tokenizer = build_tokenizer(w)
        policy, reference, reward_model, value_model = build_models(w, tokenizer, seed)
    config = PPOConfig(
        batch_size=w.batch,
        mini_batch_size=w.mini_batch_size,
        gradient_accumulation_steps=micro_batches,
        gradient_checkpointing=gradient_checkpointing,
        compile_layers=compile_layers,
        fp32_attention=fp32_attention,
        ppo_epochs=w.ppo_epochs,
        learning_rate=3e-6,
        temperature=0.7,
        kl_coef=0.05,
        adap_kl_ctrl=False,
        max_new_tokens=w.response_len,
        top_k=None,
        top_p=None,
        precision=precision,
        fp32_matmul=fp32_matmul,
        host_release_memory=release_memory,
        progress_bar=False,
        seed=seed,
        output_dir=output_dir,
    )
    trainer = PPOTrainer(
        config,
        model=policy,
        tokenizer=tokenizer,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model,
    )
    # The anchor has no stop token: every response runs to exactly R tokens (a chat model's
    # end-of-turn ids, SmolLM2's included, would otherwise end them).
    trainer.sampling = dataclasses.replace(trainer.sampling, stop_token_ids=(), stop_strings=())
    return trainer, tokenizer, flop_params(policy, value_model)


def run_iteration(trainer, prompts, response_len: int) -> dict:
    busy0, own0, t0 = machine.machine_busy_s(), machine.own_cpu_s(), time.perf_counter()
    stats = trainer.step(prompts)
    total = time.perf_counter() - t0
    busy1, own1 = machine.machine_busy_s(), machine.own_cpu_s()
    lengths = {len(text.split()) for text in stats["generated_texts"]}
    if stats["response_length"] != response_len:
        raise RuntimeError(
            f"responses did not run to {response_len} tokens: mean length {stats['response_length']} ({lengths})"
        )
    record = {"total_s": total, **{f"{name}_s": stats[f"time/{name}_s"] for name in PHASES}}
    record["rollout_s"] = record["generate_s"] + record["score_s"]
    record["own_cpu_s"] = own1 - own0
    # CPU time other processes used meanwhile: how much the machine's noise touched this iteration.
    record["other_cpu_s"] = max(0.0, (busy1 - busy0) - (own1 - own0))
    record["rss_mib"] = machine.peak_rss_mib()
    return record


def prompt_batches(w, tokenizer, iterations: int, args, scratch: str) -> list[list[str]]:
    """`iterations` batches of B prompts: the seeded random tokens, or W4's prompts file (made in
    `scratch` when none is given)."""
    if not w.real_model:
        return build_prompts(w, tokenizer, iterations, args.seed)
    path = args.prompts_json
    if path is None:
        path = Path(scratch) / "w4_prompts.json"
        path.write_text(json.dumps(real_model.make_prompts(tokenizer, w.batch * iterations, w.prompt_len)))
    return real_model.prompt_batches(tokenizer, path, w.batch, w.prompt_len, iterations)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch
    import transformers

    from ppo.fastpath.compat import is_activation_checkpointing

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    w = SMOKE if args.workload == "smoke" else WORKLOADS[args.workload]
    model_dir = real_model.ensure_model_dir(args.model_dir) if w.real_model else None
    if model_dir is not None:
        w = real_model.resolve_workload(w, model_dir)
    # The machine's matmul peak, measured here with the same thread pinning as the run.
    peaks = (
        {d: machine.matmul_peak(d, args.peak_seconds) for d in ("float32", "float32-onednn", "bfloat16")}
        if args.peak_seconds > 0
        else {}
    )

    t_setup = time.perf_counter()
    split = None
    with tempfile.TemporaryDirectory(prefix="ppo_bench_") as output_dir:
        trainer, tokenizer, (n_lm, n_cls) = build_trainer(
            w,
            args.precision,
            args.seed,
            output_dir,
            args.fp32_matmul,
            args.release_memory,
            args.micro_batches,
            args.gradient_checkpointing,
            model_dir,
            {"true": True, "false": False}.get(args.compile_layers, "auto"),
            False if args.bf16_attention else "auto",
        )
        n_measured = args.warmup + args.iters
        batches = prompt_batches(w, tokenizer, n_measured + bool(args.profile) + args.split_matmul, args, output_dir)
        setup_s = time.perf_counter() - t_setup
        records = [run_iteration(trainer, prompts, w.response_len) for prompts in batches[:n_measured]]
        extra = iter(batches[n_measured:])  # the instrumented iterations, after the measured ones
        if args.profile:
            from profile_phases import profile_step

            print(profile_step(trainer, next(extra), args.profile), flush=True)
        if args.split_matmul:
            from profile_phases import split_step

            split = split_step(trainer, next(extra))
    measured = records[args.warmup :]

    def med(key):
        return statistics.median(r[key] for r in measured)

    flops = workload_flops(w, n_lm, n_cls)
    iter_s = med("total_s")
    if split is not None:
        from profile_phases import add_remainder
        from report import split_summary

        split = add_remainder(split, {name: med(f"{name}_s") for name in PHASES})
        print(split_summary(split), flush=True)
    result = {
        "bench": "ppo_rlhf",
        # Micro-batching and checkpointing are their own rows: the same maths and optimizer steps,
        # another memory (and time) figure.
        "system": system_label(
            args.micro_batches,
            args.gradient_checkpointing,
            compile_switch(trainer.compiles_layers, args.compile_layers),
            attention_switch(args.precision, trainer.policy.config._attn_implementation, args.bf16_attention),
        ),
        "workload": w.name,
        "workload_params": w.as_dict(),
        # fp32 on oneDNN is its own row: another kernel, measured against another peak.
        "precision": "fp32-onednn" if args.precision == "fp32" and trainer.fp32_kernel == "onednn" else args.precision,
        "host_release_memory": args.release_memory,
        "micro_batches": args.micro_batches,
        # Read back from the model, so the record says what ran, not what was asked.
        "gradient_checkpointing": is_activation_checkpointing(trainer.policy),
        "compile_layers": trainer.compiles_layers,  # what ran; asked: compile_layers_asked
        "compile_layers_asked": args.compile_layers,
        # What `auto` chose on this machine: the policy's attention implementation (sdpa: bf16 kernels).
        "attention": trainer.policy.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "warmup_iters": args.warmup,
        "measured_iters": args.iters,
        "iter_s": [r["total_s"] for r in measured],
        "iter_s_median": iter_s,
        "iter_s_min": min(r["total_s"] for r in measured),
        "iter_s_max": max(r["total_s"] for r in measured),
        **{f"{name}_s_median": med(f"{name}_s") for name in (*PHASES, "rollout")},
        "other_cpu_s_per_iter_median": med("other_cpu_s"),
        "own_cpu_util_median": statistics.median(r["own_cpu_s"] / r["total_s"] for r in measured),
        "tokens_per_iter": w.tokens_per_iter,
        "tokens_per_s": w.tokens_per_iter / iter_s,
        "peak_rss_mib": machine.peak_rss_mib(),
        "params": {"n_lm_flop": n_lm, "n_cls_flop": n_cls},
        "flops_per_iter": flops["total"],
        "flops_by_phase": flops,
        "achieved_gflops": flops["total"] / iter_s / 1e9,
        "matmul_peak": peaks,
        "setup_s": setup_s,
        "iters": records,
        # --split-matmul: per phase, seconds inside matrix products and attention kernels (timed
        # in one extra iteration) and the rest of the measured phase time (profile_phases.py).
        "matmul_split": split,
        "model_dir": str(model_dir) if model_dir else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "loadavg_end": machine.loadavg(),
    }
    print("RESULT_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
