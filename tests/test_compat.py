"""Private names of torch, diffusers, PEFT, accelerate and transformers live in refcond/compat.py only.

The scan reads every shipped source file (the core, the built-in plugins; not the tests) with ``ast``
and fails with ``file:line`` on

- an import of a private module or name from one of those libraries (``from peft.utils import
  _get_submodules``, ``import torch._dynamo``);
- a private attribute of one of their modules or of a name imported from them
  (``torch._C``, ``PartialState._shared_state``, ``getattr(torch, "_foo")``);
- a private attribute of any other object that refcond does not define itself
  (``pipeline._progress_bar_config``, ``tensor._version``, ``vars(model)["_hf_peft_config_loaded"]``):
  "refcond defines it" means some shipped file defines or assigns that name (``def _fail``,
  ``self._saved = ...``, ``self.__dict__["_last_layer"] = ...``).

refcond/compat.py is the one place allowed to use them; its helpers raise a clear error naming the
library and versions when a private name is gone, which the second half of this file checks.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refcond import RefcondError, compat

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = {"torch", "diffusers", "peft", "accelerate", "transformers"}
SHIPPED = [
    ROOT / "refcond",
    ROOT / "encoders" / "refcond_encoders",
    ROOT / "injectors" / "refcond_injectors",
    *sorted(ROOT.glob("plugins/*/refcond_*")),
]
COMPAT = ROOT / "refcond" / "compat.py"
_REFLECTION = {"getattr", "hasattr", "setattr", "delattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _shipped_files() -> list[Path]:
    return sorted(p for folder in SHIPPED for p in folder.rglob("*.py"))


def _own_private_names(trees: dict[Path, ast.Module]) -> set[str]:
    """Private attribute names of refcond's own objects: class members, ``self.x = ...``, ``self.__dict__["x"] = ...``."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for member in node.body:
                    if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        names.add(member.name)
                    elif isinstance(member, (ast.Assign, ast.AnnAssign)):
                        targets = member.targets if isinstance(member, ast.Assign) else [member.target]
                        names.update(t.id for t in targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Attribute) and _is_self(target.value):
                        names.add(target.attr)
                    elif isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
                        owner = _dict_of(target.value)
                        if owner is not None and _is_self(owner) and isinstance(target.slice.value, str):
                            names.add(target.slice.value)
    return {name for name in names if _private(name)}


def _library_bindings(tree: ast.Module) -> set[str]:
    """Local names bound to a library module or to a name imported from one (``torch``, ``nn``, ``PartialState``)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in LIBRARIES:
            bound.update(alias.asname or alias.name for alias in node.names)
    return bound


def _refcond_bindings(tree: ast.Module) -> set[str]:
    """Local names bound to refcond's own modules or names imported from them."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update(alias.asname or alias.name.split(".")[0] for alias in node.names if alias.name.split(".")[0].startswith("refcond"))
        elif isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0].startswith("refcond")):
            bound.update(alias.asname or alias.name for alias in node.names)
    return bound


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _is_self(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _dict_of(node: ast.expr) -> ast.expr | None:
    """``x`` for ``x.__dict__`` or ``vars(x)``, else None."""
    if isinstance(node, ast.Attribute) and node.attr == "__dict__":
        return node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "vars" and node.args:
        return node.args[0]
    return None


def private_uses(path: Path, tree: ast.Module, own: set[str]) -> list[tuple[int, str, str]]:
    """``(line, private name, what)`` for every use of a library's private name in one file."""
    libraries, refcond_names = _library_bindings(tree), _refcond_bindings(tree)
    found: list[tuple[int, str, str]] = []

    def foreign(line: int, owner: ast.expr, name: str) -> None:
        """A private ``name`` read from, written to or looked up on ``owner``."""
        if not _private(name) or _is_self(owner):
            return
        root = _root(owner)
        if isinstance(root, ast.Name) and root.id in libraries:
            found.append((line, name, f"private attribute of {ast.unparse(owner)} (from a library)"))
        elif name not in own and not (isinstance(root, ast.Name) and root.id in refcond_names):
            found.append((line, name, f"private attribute of {ast.unparse(owner)}, which refcond does not define"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIBRARIES and any(_private(p) for p in parts):
                    found.append((node.lineno, alias.name, "import of a private module"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in LIBRARIES:
            private_module = [p for p in node.module.split(".") if _private(p)]
            for alias in node.names:
                if private_module or _private(alias.name):
                    found.append((node.lineno, f"{node.module}.{alias.name}", "import of a private name"))
        elif isinstance(node, ast.Attribute):
            foreign(node.lineno, node.value, node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _REFLECTION and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                foreign(node.lineno, node.args[0], name.value)
        elif isinstance(node, ast.Subscript) and (owner := _dict_of(node.value)) is not None:
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                foreign(node.lineno, owner, node.slice.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop", "setdefault"):
            owner = _dict_of(node.func.value)
            if owner is not None and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                foreign(node.lineno, owner, node.args[0].value)
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            owner = _dict_of(node.comparators[0])
            if owner is not None and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
                foreign(node.lineno, owner, node.left.value)
    return found


def _scan() -> list[str]:
    trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in _shipped_files()}
    own = _own_private_names(trees)
    problems = []
    for path, tree in trees.items():
        if path == COMPAT:
            continue
        relative = path.relative_to(ROOT).as_posix()
        for line, name, what in sorted(set(private_uses(path, tree, own))):
            problems.append(f"{relative}:{line}: {name}: {what}")
    return problems


# -- the scan --------------------------------------------------------------------------------------


def test_private_names_of_libraries_are_used_in_refcond_compat_only():
    assert len(_shipped_files()) > 30, "the scan found too few shipped files: check SHIPPED"
    problems = _scan()
    assert not problems, (
        "private names of torch/diffusers/peft/accelerate/transformers outside refcond/compat.py (use a public API, "
        "or add a helper to refcond/compat.py that raises LibraryVersionError when the name is gone):\n  " + "\n  ".join(problems)
    )


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("from peft.utils import _get_submodules", "peft.utils._get_submodules"),
        ("from torch._dynamo import config", "torch._dynamo.config"),
        ("import torch._C", "torch._C"),
        ("import torch\nx = torch.nn.modules._functions", "_functions"),
        ("from accelerate.state import PartialState\nPartialState._shared_state.clear()", "_shared_state"),
        ("import diffusers as d\ngetattr(d, '_internal')", "_internal"),
        ("def f(pipe):\n    return pipe._progress_bar_config", "_progress_bar_config"),
        ("def f(p):\n    return p._version", "_version"),
        ("def f(m):\n    return getattr(m, '_lora_loadable_modules', None)", "_lora_loadable_modules"),
        ("def f(m):\n    return m.__dict__.get('_hf_peft_config_loaded')", "_hf_peft_config_loaded"),
        ("def f(m):\n    return '_merged_adapters' in vars(m)", "_merged_adapters"),
    ],
)
def test_the_scan_catches(source, name):
    found = private_uses(Path("x.py"), ast.parse(source), own=set())
    assert [n for _, n, _ in found] == [name]


def test_the_scan_lets_refcond_own_private_names_and_dunders_pass():
    source = (
        "import torch\n"
        "class A:\n"
        "    def _fail(self):\n        self._saved = torch.__version__\n"
        "    def g(self, other):\n        other._fail(); return self._saved, other._saved, getattr(other, '_saved')\n"
    )
    tree = ast.parse(source)
    assert private_uses(Path("x.py"), tree, own=_own_private_names({Path("x.py"): tree})) == []


# -- the helpers -----------------------------------------------------------------------------------


def _assert_clear(error: compat.LibraryVersionError, library: str, name: str) -> None:
    message = str(error)
    installed = importlib.metadata.version(library)
    tested = compat.TESTED_VERSIONS[library]
    assert isinstance(error, RefcondError)
    assert (error.library, error.installed, error.tested) == (library, installed, tested)
    assert name in message and f"{library} {installed}" in message and f"pip install '{library}=={tested}'" in message


def test_accelerate_state_helper_names_accelerate_when_its_shared_state_is_gone(monkeypatch):
    from accelerate.state import PartialState

    monkeypatch.delattr(PartialState, "_shared_state")
    with pytest.raises(compat.LibraryVersionError) as caught, compat.separate_accelerate_state():
        pass
    _assert_clear(caught.value, "accelerate", "PartialState._shared_state")


def test_accelerate_state_helper_sets_the_callers_state_aside_and_gives_it_back():
    from accelerate.state import AcceleratorState, PartialState

    before = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)
    with compat.separate_accelerate_state() as processes:
        assert processes == before[0].get("num_processes", 1)
        assert PartialState._shared_state == {} and AcceleratorState._shared_state == {}
        PartialState(cpu=True)
    assert (dict(PartialState._shared_state), dict(AcceleratorState._shared_state)) == before


def test_hook_helper_names_torch_when_modules_keep_hooks_elsewhere():
    layer = torch.nn.Linear(2, 2)
    handle = layer.register_forward_hook(lambda *args: None)
    assert compat.forward_hook_ids(layer) == ((), (handle.id,))
    del layer._forward_hooks
    with pytest.raises(compat.LibraryVersionError) as caught:
        compat.forward_hook_ids(layer)
    _assert_clear(caught.value, "torch", "Module._forward_pre_hooks / Module._forward_hooks")


def test_lora_components_helper_names_diffusers_when_the_list_is_gone(monkeypatch):
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.lora_base import LoraBaseMixin

    pipe = StableDiffusionPipeline.__new__(StableDiffusionPipeline)  # the class is what matters
    assert compat.lora_loadable_modules(pipe) == ["unet", "text_encoder"]
    assert compat.lora_loadable_modules(object()) is None
    monkeypatch.delattr(StableDiffusionLoraLoaderMixin, "_lora_loadable_modules")
    monkeypatch.delattr(LoraBaseMixin, "_lora_loadable_modules")
    with pytest.raises(compat.LibraryVersionError) as caught:
        compat.lora_loadable_modules(pipe)
    _assert_clear(caught.value, "diffusers", "LoraBaseMixin._lora_loadable_modules")


def test_progress_bar_helper_gives_the_settings_back_and_names_diffusers_when_they_move():
    from diffusers import DiffusionPipeline

    class Pipe:  # diffusers' own setter, without building a pipeline
        set_progress_bar_config = DiffusionPipeline.set_progress_bar_config

    pipe, fresh = Pipe(), Pipe()
    pipe.set_progress_bar_config(leave=False)
    settings = pipe.__dict__["_progress_bar_config"]
    with compat.progress_bar_disabled(pipe):
        assert pipe.__dict__["_progress_bar_config"] == {"disable": True}
    assert pipe.__dict__["_progress_bar_config"] is settings
    with compat.progress_bar_disabled(fresh):
        pass
    assert "_progress_bar_config" not in fresh.__dict__

    class Moved:  # a diffusers that keeps the settings under another name
        def set_progress_bar_config(self, **kwargs):
            self.bar_settings = kwargs

    with pytest.raises(compat.LibraryVersionError) as caught, compat.progress_bar_disabled(Moved()):
        pass
    _assert_clear(caught.value, "diffusers", "DiffusionPipeline._progress_bar_config")


def test_importing_refcond_and_compat_imports_no_peft_or_accelerate():
    code = "import sys, refcond, refcond.compat; print(sorted(m for m in ('peft', 'accelerate') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_readme_states_the_tested_versions():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Requirements", 1)[1].split("\n## ", 1)[0]
    for library, version in compat.TESTED_VERSIONS.items():
        assert re.search(rf"\b{library}\W+{re.escape(version)}\b", section), f"README's Requirements lack {library} {version}"
