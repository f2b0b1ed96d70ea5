"""`benchmarks/estimators.py --quick` end to end: the demo's stages once, then PPO per estimator, the
table, the JSON and the plot. No timing or learning thresholds (toy sizes, a possibly busy machine):
it checks the comparison runs and that a critic-free estimator trains only the policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_estimator_comparison_runs_and_critic_free_rows_train_no_critic(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "estimators.py"), "--out", str(tmp_path), "--quick"]
        + ["--estimators", "gae,rloo"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "estimators.json").read_text())
    assert [r["estimator"] for r in rows] == ["gae", "rloo"]
    gae, rloo = rows
    # The same budget of sampled responses per step (quick: 8 prompts x 2 samples for both).
    assert gae["samples"] == rloo["samples"] == "8 x 2" and gae["steps"] == rloo["steps"] > 0
    # GAE trains the policy and a critic of its backbone (a one-output head instead of the tied LM head);
    # RLOO the policy alone.
    critic = gae["trainable_params"] - rloo["trainable_params"]
    assert rloo["trainable_params"] > 0 and abs(critic - rloo["trainable_params"]) < 0.01 * rloo["trainable_params"]
    for r in rows:
        assert r["ppo_s"] > 0 and r["peak_rss_mib"] > 0 and r["sampled_tokens"] > 0
        assert len(r["curve"]) == r["steps"]
    assert "| gae | 8 x 2 |" in (tmp_path / "estimators.md").read_text()
    assert (tmp_path / "estimators.png").stat().st_size > 0
