"""Regenerate the README's option tables from the config dataclasses' help strings.

    python tools/readme_options.py          rewrite README.md in place
    python tools/readme_options.py --check  exit 1 when README.md is out of date (run by the tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ppo import config as C  # noqa: E402

SECTIONS = {"ppo": "PPOConfig", "sft": "SFTConfig", "reward": "RewardConfig", "eval": "EvalConfig", "demo": "DemoConfig"}


def table(cls) -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for name, default, help_ in C.config_help(cls):
        lines.append(f"| `{name}` | `{default}` | {help_.replace('|', '/')} |")
    return "\n".join(lines)


def render(text: str) -> str:
    for tag, cls_name in SECTIONS.items():
        cls = getattr(C, cls_name, None)
        start, end = f"<!-- options:{tag} -->", f"<!-- /options:{tag} -->"
        if cls is None or start not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{table(cls)}\n{end}{tail}"
    return text


def main() -> int:
    readme = ROOT / "README.md"
    current = readme.read_text(encoding="utf-8")
    fresh = render(current)
    if "--check" in sys.argv:
        if fresh != current:
            print("README.md option tables are out of date: run python tools/readme_options.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
