"""Recipes are leaves (STYLE.md, habit 9): no module of the package, benchmark or tool imports one,
and no recipe imports another, so what two of them share has to live once, in a shared module.

Read from the source with `ast` (nothing is imported), so an import inside a function counts too.
`ppo.cli` reaches each recipe's main() through `importlib` by name, which is its job and not seen here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("ppo.train", "ppo.sft", "ppo.train_reward", "ppo.evaluate", "ppo.demo.run")
CHECKED = ("ppo", "benchmarks", "tools")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` may import: `import a.b`, `from a import b` (b may be a module: a.b
    counts too) and relative imports resolved against the file's package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def recipe_imports(paths, root: Path = ROOT) -> list[str]:
    return [
        f"{path.relative_to(root)} imports the recipe {recipe}"
        for path in paths
        for recipe in sorted(imported_modules(path, root) & set(RECIPES))
        if recipe != module_name(path, root)
    ]


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_listed_recipe_exists(recipe):
    assert (ROOT / Path(*recipe.split("."))).with_suffix(".py").is_file(), recipe


def test_no_module_imports_a_recipe():
    paths = sorted(p for top in CHECKED for p in (ROOT / top).rglob("*.py"))
    assert len(paths) > 50  # the package itself was found
    assert recipe_imports(paths) == []


def test_the_check_sees_every_spelling_of_an_import(tmp_path):
    spellings = [
        "from ppo.sft import main",
        "import ppo.train",
        "from ppo import evaluate",
        "from ppo.demo import run as demo",
        "def f():\n    from ppo.train_reward import main",
        "from .run import main",  # inside ppo/demo/
        "from .. import sft",  # inside ppo/demo/
    ]
    (tmp_path / "ppo" / "demo").mkdir(parents=True)
    paths = []
    for i, text in enumerate(spellings):
        path = tmp_path / "ppo" / "demo" / f"m{i}.py"
        path.write_text(text + "\n")
        paths.append(path)
    assert len(recipe_imports(paths, tmp_path)) == len(spellings)
