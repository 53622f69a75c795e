"""The public API is the only API: the built-in plugin distributions import refcond's public names
only, as a third party must; names that moved stay importable from their old place; the test
helpers work without pytest except the fixtures, which say what to install."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import refcond
import refcond.testing

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = ["encoders/refcond_encoders", "injectors/refcond_injectors", "plugins/easyref/refcond_easyref", "plugins/metrics/refcond_metrics", "plugins/example/refcond_example"]
#: The modules of the core a plugin may import from.
PUBLIC_MODULES = {"refcond", "refcond.testing"}


def refcond_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a refcond module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] if node.module.split(".")[0] == "refcond" else []
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names if alias.name.split(".")[0] == "refcond"]
        else:
            continue
        found += [(node.lineno, module) for module in modules]
    return found


def test_the_built_in_plugins_import_only_public_refcond_names():
    private = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for folder in DISTRIBUTIONS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in refcond_imports(path)
        if module not in PUBLIC_MODULES
    ]
    assert not private, "import these from refcond (or refcond.testing) instead:\n" + "\n".join(private)


def test_every_exported_name_exists():
    for module in (refcond, refcond.testing):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ names what it lacks: {missing}"


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("refcond.registry", "Register", refcond.Register),
        ("refcond.aggregators", "split_references", refcond.split_references),
        ("refcond.building", "check_state_dict", refcond.check_state_dict),
        ("refcond.checkpoints.io", "write_safetensors", refcond.write_safetensors),
        ("refcond.errors", "did_you_mean", refcond.did_you_mean),
        ("refcond_injectors.cross_attention.layers", "cross_attention_layers", refcond.cross_attention_layers),
        ("refcond_injectors.cross_attention.projectors", "MLP_OFFICIAL_NAMES", None),
        ("refcond.testing.qwen2vl", "tiny_qwen2vl", refcond.testing.tiny_qwen2vl),
    ],
)
def test_names_plugins_already_use_stay_importable_from_their_old_place(old, name, new):
    module = __import__(old, fromlist=[name])
    assert hasattr(module, name)
    if new is not None:
        assert getattr(module, name) is new


def test_the_fixtures_say_what_to_install_without_pytest():
    code = "import sys; sys.modules['pytest'] = None\nimport refcond.testing\nimport refcond.testing.fixtures"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "pip install 'refcond[test]'" in result.stderr
    assert "Traceback" in result.stderr and result.stderr.count("File ") <= 3  # one short chain, not pytest's internals


def test_importing_the_encoders_prints_no_fallback_warning():
    result = subprocess.run([sys.executable, "-c", "import refcond_encoders"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
