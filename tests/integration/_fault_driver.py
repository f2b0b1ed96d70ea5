"""Fork server for test_faults.py: imports torch, transformers and ppo once, then runs each job (one
JSON line on stdin) in a forked child and answers one JSON line: how the child ended (its exit
status, or minus the signal that killed it), the file-system events it went through, its stderr.

Forking from a process that has imported everything but computed nothing costs milliseconds, where
a fresh interpreter costs seconds of imports: this is what makes dozens of killed-and-resumed runs
fit in a CI job. Each child runs with one intra-op thread, so every run computes the same floats.

Jobs:
    {"kind": "api", "out": DIR, "resume": "latest"|PATH|"", "kill_at": N | [PREFIX, N]}
        the tiny PPO run (6 steps, checkpoints every 2, at most 2 kept) through PPOTrainer.train;
        the child SIGKILLs itself at its N-th event, or its N-th event whose name starts with
        PREFIX ("OUT" stands for the output directory), or never (0). Events are every file-system step
        of a checkpoint (ppo.durable: fsync, rename, tree removal - killed half-way through it),
        every metrics line (killed half-way through writing it) and every reward call (mid-step).
    {"kind": "cli", "argv": [...], "env": {...}}     ppo.train.main(argv) with os.environ updated
    {"kind": "prepare", "dir": DIR}                  a tiny policy directory and the reward file
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)

import transformers  # noqa: E402 - after torch.set_num_threads

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

import ppo.train  # noqa: E402 - after torch.set_num_threads
from ppo import PPOConfig, PPOTrainer, durable  # noqa: E402 - after torch.set_num_threads
from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model, build_tokenizer  # noqa: E402
from ppo.metrics import MetricsLogger  # noqa: E402 - after torch.set_num_threads

PROMPTS = [" ".join(f"w{(i * 5 + j) % 29}" for j in range(1 + i % 3)) for i in range(9)]

# The reward function of the CLI jobs: it raises signals / lowers the file-size limit at the
# reward call (= the step) named by the environment.
REWARD_FILE = """
import os, resource, signal, time
calls = {"n": 0}

def words(completions, **kw):
    calls["n"] += 1
    for item in filter(None, os.environ.get("FAULT_SIGNALS", "").split(",")):
        at, name = item.split(":")
        if int(at) == calls["n"]:
            os.kill(os.getpid(), getattr(signal, "SIG" + name))
            # Reward functions run in a worker thread (reward_timeout_s): the main thread handles the
            # signal while it waits. Two signals sent back to back would reach it as one, as two
            # presses of Ctrl-C never do: give it the moment a person's second press would.
            time.sleep(0.5)
    at, _, limit = os.environ.get("FAULT_FSIZE", "").partition(":")
    if at and int(at) == calls["n"]:
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    return [len(c.split()) / 4 for c in completions]
"""


class Events:
    """Counts events; at the `kill_at`-th, does its partial work (a torn write) and SIGKILLs."""

    def __init__(self, kill_at: int | list, root: str | None):
        self.kill_at, self.root, self.names = kill_at, root, []

    def hit(self, name: str, partial=None) -> None:
        self.names.append(name.replace(self.root, "OUT") if self.root else name)
        if isinstance(self.kill_at, list):  # [prefix, n]: at the n-th event whose name starts with prefix
            prefix, occurrence = self.kill_at
            due = self.names[-1].startswith(prefix) and sum(n.startswith(prefix) for n in self.names) == occurrence
        else:
            due = len(self.names) == self.kill_at
        if due:
            if partial is not None:
                partial()
            os.kill(os.getpid(), signal.SIGKILL)


def instrument(events: Events) -> None:
    for fn in ("fsync_file", "fsync_dir", "rename"):
        real = getattr(durable, fn)

        def hooked(*paths, _real=real, _fn=fn):
            events.hit(" ".join([_fn, *map(str, paths)]))
            return _real(*paths)

        setattr(durable, fn, hooked)
    real_remove = durable.remove_tree

    def remove_tree(path):
        def half():  # a deletion cut short: half the files gone
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for f in files[: len(files) // 2]:
                f.unlink()

        events.hit(f"remove_tree {path}", half)
        real_remove(path)

    durable.remove_tree = remove_tree
    real_log = MetricsLogger.log

    def log(self, step, metrics):
        def torn():
            with self.path.open("a", encoding="utf-8") as f:
                f.write(f'{{"step": {step}, "mean_rew')

        events.hit(f"metrics step {step}", torn)
        real_log(self, step, metrics)

    MetricsLogger.log = log


def api_run(job: dict, events: Events) -> int:
    tok = build_tokenizer([f"w{i}" for i in range(29)])
    policy = build_policy(tok, TinyModelSpec(), seed=0)
    reward_model = build_reward_model(tok, TinyModelSpec(), seed=1)

    def words(completions, **kw):
        events.hit("reward")
        return [len(c.split()) / 4 for c in completions]

    config = PPOConfig(
        batch_size=3,
        mini_batch_size=2,
        max_new_tokens=4,
        learning_rate=1e-3,
        save_steps=2,
        save_total_limit=2,
        precision="fp32",
        fp32_matmul="mkl",
        output_dir=job["out"],
        progress_bar=False,
        seed=7,
        temperature=0.9,
        lam=0.9,
        lr_scheduler="cosine",
        warmup_steps=1,
        resume_from_checkpoint=job.get("resume") or None,
    )
    trainer = PPOTrainer(config, policy, tok, reward_model=reward_model, reward_funcs=words, reward_weights=[0.5, 1.0])
    trainer.train(PROMPTS, num_epochs=2)  # 3 batches per epoch -> 6 steps
    return 0


def prepare(job: dict) -> int:
    directory = Path(job["dir"])
    tok = build_tokenizer([f"w{i}" for i in range(29)])
    build_policy(tok, TinyModelSpec(), seed=0).save_pretrained(directory / "policy")
    tok.save_pretrained(directory / "policy")
    (directory / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    (directory / "rewards.py").write_text(REWARD_FILE, encoding="utf-8")
    return 0


def child(job: dict, log_path: Path) -> None:
    """In the forked child: stderr/stdout to a file, run, exit with the job's status."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives until os._exit
    events = Events(job.get("kill_at", 0), job.get("out"))
    instrument(events)
    try:
        os.environ.update(job.get("env", {}))
        if job["kind"] == "api":
            rc = api_run(job, events)
        elif job["kind"] == "cli":
            rc = ppo.train.main(job["argv"])
        else:
            rc = prepare(job)
    except BaseException:  # noqa: BLE001 - report anything, including KeyboardInterrupt
        traceback.print_exc()
        rc = 99
    Path(str(log_path) + ".events").write_text(json.dumps(events.names))
    sys.stdout.flush()
    os._exit(rc)


def main() -> None:
    for number, line in enumerate(sys.stdin):
        job = json.loads(line)
        log_path = Path(job.get("log") or f"/tmp/fault-job-{os.getpid()}-{number}.log")
        events_file = Path(str(log_path) + ".events")
        events_file.unlink(missing_ok=True)
        pid = os.fork()
        if pid == 0:
            child(job, log_path)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        events = json.loads(events_file.read_text()) if events_file.exists() else None
        answer = {"code": code, "log": log_path.read_text(errors="replace"), "events": events}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
