"""ppo.host_cpu: the check the demo uses to pick OpenMP's wait policy (is another process keeping a core busy?)."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux /proc/stat")
def test_a_process_spinning_on_a_core_counts_as_busy():
    from ppo.host_cpu import others_keep_a_core_busy

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert others_keep_a_core_busy(0.5)
    finally:
        spinner.kill()
        spinner.wait()
