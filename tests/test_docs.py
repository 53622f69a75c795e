"""The documentation is tested (as datasette does): every hook is documented under its exact
signature; the examples of the hook reference, the plugin-author guide and the user guide run;
the README's example runs (against tiny offline models standing in for the downloads); the CLI
reference covers every command and option; links resolve; the README's quickstart is what CI runs.

Code blocks are fenced with a language. A ``python`` block runs unless its first line is
``# not run``; a block whose first line is ``# file: <path>`` is a file of the example project a
page builds, written to a temporary folder instead of executed.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import refcond
from refcond import hookspecs
from refcond.config import Composition
from refcond.registry import HOOK_KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"

QUICKSTART = [
    "pip install torch==2.13.0 -e . -e ./encoders -e ./injectors -e ./plugins/easyref -e ./plugins/metrics -e ./plugins/example && refcond demo",
    "pip install torch==2.13.0 -e '.[test]' -e ./encoders -e ./injectors -e ./plugins/easyref -e ./plugins/metrics -e ./plugins/example && python -m pytest",
]


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, code, line number and the ``##`` section it is in."""

    lang: str
    code: str
    line: int
    section: str

    @property
    def first_line(self) -> str:
        return self.code.split("\n", 1)[0].strip()

    @property
    def file(self) -> str | None:
        match = re.fullmatch(r"# file: (\S+)", self.first_line)
        return match.group(1) if match else None

    @property
    def runs(self) -> bool:
        return self.lang == "python" and not self.first_line.startswith("# not run") and self.file is None


def code_blocks(path: Path) -> list[Block]:
    blocks, section, lines = [], "", path.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1, section))
            i = end
        i += 1
    return blocks


def code_blocks_from_text(text: str) -> list[Block]:
    return [Block(lang, code, 0, "") for lang, code in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)]


def hook_specs() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, "refcond_spec")
    }


def heading(name: str, signature: inspect.Signature) -> str:
    return f"{name}({', '.join(signature.parameters)})"


def run_module(code: str, name: str, where: str) -> types.ModuleType:
    """Execute ``code`` as the source of a fresh module (so ``@hookimpl`` functions register from it)."""
    module = types.ModuleType(name)
    module.__file__ = where
    sys.modules[name] = module
    try:
        exec(compile(code, where, "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


# -- hook reference -------------------------------------------------------------------------------


def test_every_hook_is_documented_under_its_exact_signature():
    text = (DOCS / "hooks.md").read_text(encoding="utf-8")
    documented = re.findall(r"^## (refcond_\w+\(.*\))$", text, flags=re.MULTILINE)
    specs = hook_specs()
    assert set(specs) == set(HOOK_KINDS), "the registry's hook table and hookspecs.py disagree"
    for name, signature in specs.items():
        assert heading(name, signature) in documented, f"docs/hooks.md lacks a heading '## {heading(name, signature)}'"
        assert (inspect.getdoc(getattr(hookspecs, name)) or "").strip(), f"hook {name} has no docstring"
    stale = [h for h in documented if h.split("(")[0] not in specs]
    assert not stale, f"docs/hooks.md documents hooks that do not exist: {stale}"


@pytest.mark.parametrize("hook", sorted(HOOK_KINDS))
def test_hook_example_registers_what_it_documents(hook):
    signature = heading(hook, hook_specs()[hook])
    blocks = [b for b in code_blocks(DOCS / "hooks.md") if b.section == signature and b.runs]
    assert blocks, f"docs/hooks.md has no runnable python example under '## {signature}'"
    for block in blocks:
        module = run_module(block.code, f"hooks_md_{hook}", f"docs/hooks.md:{block.line}")
        plugins = refcond.from_modules(module)
        entries = [e for e in plugins.registry.entries(HOOK_KINDS[hook]) if e.provenance.plugin == module.__name__]
        assert not plugins.failures, plugins.failures
        assert hook in plugins.plugins()[0].hooks
        assert entries, f"the example at docs/hooks.md:{block.line} registers no {HOOK_KINDS[hook]}"


# -- plugin author guide -------------------------------------------------------------------------


def test_plugin_author_guide_builds_a_working_plugin(monkeypatch, tmp_path):
    """Follow the guide: write its files, run its snippets, "pip install" it, run its tests."""
    import refcond_injectors  # noqa: F401 - the guide's examples use the ip-adapter composition
    from refcond.testing import reference_images, tiny_sd15_pipeline

    guide = DOCS / "plugin-author-guide.md"
    blocks = code_blocks(guide)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(refcond.plugins, "_default", None)  # the guide's tests load plugins afresh
    written: list[str] = []
    try:
        for block in blocks:
            if block.file:
                path = tmp_path / block.file
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.code, encoding="utf-8")
                written.append(block.file)
            elif block.runs:
                exec(compile(block.code, f"{guide.name}:{block.line}", "exec"), {"__name__": "guide_snippet"})

        # "pip install -e .": a dist-info on sys.path, with the entry points the guide's pyproject declares.
        project = tomllib.loads((tmp_path / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        entry_points = project["entry-points"]["refcond"]
        assert all(importlib.import_module(target) for target in entry_points.values())
        dist_info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
        (dist_info / "entry_points.txt").write_text("[refcond]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
        importlib.invalidate_caches()
        installed = refcond.load_plugins()
        assert not installed.failures, installed.failures

        for block in blocks:  # the compositions it shows validate against the installed plugins
            if block.lang == "toml" and not block.file:
                Composition.parse(tomllib.loads(block.code), where=f"{guide.name}:{block.line}").validate_components(installed.registry)

        conftest = (tmp_path / "tests" / "conftest.py").read_text(encoding="utf-8")
        assert 'pytest_plugins = ["refcond.testing.fixtures"]' in conftest
        fixtures = {"sd15_pipe": tiny_sd15_pipeline, "references": lambda: reference_images(3)}
        ran = []
        for test_file in [f for f in written if Path(f).name.startswith("test_")]:
            module = run_module((tmp_path / test_file).read_text(encoding="utf-8"), Path(test_file).stem, str(tmp_path / test_file))
            for name, test in vars(module).items():
                if name.startswith("test_") and callable(test):
                    test(**{arg: fixtures[arg]() for arg in inspect.signature(test).parameters})
                    ran.append(name)
        assert "test_plugin_is_installed" in ran and len(ran) >= 4, ran
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in {"refcond_trimmed_mean"}]:
            del sys.modules[name]


# -- user guide ----------------------------------------------------------------------------------


def test_user_guide_examples_run(monkeypatch, tmp_path):
    """docs/index.md's examples, in order, on the tiny SD1.5 pipeline with a fabricated IP-Adapter file."""
    import refcond_injectors  # noqa: F401 - the user guide's examples use the ip-adapter composition
    from diffusers import StableDiffusionPipeline
    from refcond_injectors.testing import fabricate_ip_adapter_state_dict
    from safetensors.torch import save_file

    from refcond.testing import reference_images, tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline()
    checkpoint = tmp_path / "ip-adapter_sd15.safetensors"
    save_file(fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant="base"), str(checkpoint))
    for seed, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        reference_images(1, seed=seed)[0].save(tmp_path / name)
    monkeypatch.chdir(tmp_path)

    denoise = StableDiffusionPipeline.__call__

    def two_steps(self, *args, **kwargs):  # the examples' defaults (50 steps) would only cost time here
        return denoise(self, *args, **{**kwargs, "num_inference_steps": 2})

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", two_steps)
    processors = dict(pipe.unet.attn_processors)
    guide = DOCS / "index.md"
    namespace = {"pipe": pipe, "checkpoint": str(checkpoint)}
    ran = 0
    for block in code_blocks(guide):
        if block.file:
            (tmp_path / block.file).write_text(block.code, encoding="utf-8")
        elif block.runs:
            exec(compile(block.code, f"{guide.name}:{block.line}", "exec"), namespace)
            ran += 1
    assert ran >= 6
    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items()), "the guide's examples left the UNet changed"
    (loop,) = [b for b in code_blocks(guide) if b.section == "Train your own loop" and b.runs]
    assert loop.code.count("\n") < 30, "the training example should stay under 30 lines"
    losses = namespace["losses"]
    assert losses[-1] < 0.97 * losses[0], f"the training example's loss did not go down: {losses}"


def test_user_guide_compositions_validate(plugins):
    blocks = [b for b in code_blocks(DOCS / "index.md") if b.lang == "toml"]
    assert blocks
    for block in blocks:
        Composition.parse(tomllib.loads(block.code), where=f"docs/index.md:{block.line}").validate_components(plugins.registry)


# -- CLI reference --------------------------------------------------------------------------------


def test_cli_reference_covers_every_command_and_option():
    from refcond.cli import cli

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## refcond (\S+)\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL))
    assert set(sections) == set(cli.commands), f"docs/cli.md sections {sorted(sections)} != commands {sorted(cli.commands)}"
    for name, command in cli.commands.items():
        for param in command.params:
            for option in [o for o in param.opts if o.startswith("--") and o != "--help"]:
                assert option in sections[name], f"docs/cli.md does not document {option} of `refcond {name}`"


# -- links ----------------------------------------------------------------------------------------


def slug(heading_text: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading_text.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    missing = []
    for page in [README, *sorted(DOCS.glob("*.md")), ROOT / "plugins" / "example" / "README.md", ROOT / "plugins" / "metrics" / "README.md"]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            path = (page.parent / target) if target else page
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
            elif anchor:
                anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)}
                if anchor not in anchors:
                    missing.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not missing, f"links to nothing: {missing}"


# -- README ---------------------------------------------------------------------------------------


def test_readme_example_runs(monkeypatch, tmp_path):
    """The README's example, verbatim, with the three downloads replaced by tiny offline stand-ins."""
    import refcond_injectors  # noqa: F401 - the README's composition needs refcond-injectors
    import huggingface_hub
    from diffusers import StableDiffusionPipeline
    from refcond_injectors.testing import fabricate_ip_adapter_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    from refcond.testing import (
        reference_images,
        tiny_image_encoder,
        tiny_sd15_pipeline,
        tiny_unet,
    )

    calls = []

    def image_encoder_from_pretrained(cls, repo, subfolder=None, **kwargs):
        calls.append(("image_encoder", repo, subfolder))
        return tiny_image_encoder()

    def pipeline_from_pretrained(cls, repo, **kwargs):
        calls.append(("pipeline", repo))
        components = tiny_sd15_pipeline(image_encoder=False).components
        components.update({k: kwargs[k] for k in ("image_encoder",) if k in kwargs})
        return cls(**components, requires_safety_checker=False)

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("download", repo_id, filename))
        path = tmp_path / Path(filename).name
        save_file(fabricate_ip_adapter_state_dict(tiny_unet(), tiny_image_encoder(), variant="base"), str(path))
        return str(path)

    monkeypatch.setattr(CLIPVisionModelWithProjection, "from_pretrained", classmethod(image_encoder_from_pretrained))
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(pipeline_from_pretrained))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    denoise = StableDiffusionPipeline.__call__

    def two_steps(self, *args, **kwargs):  # record what reaches diffusers, then denoise briefly
        calls.append(("generate", kwargs["num_inference_steps"], kwargs["guidance_scale"]))
        return denoise(self, *args, **{**kwargs, "num_inference_steps": 2})

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", two_steps)
    monkeypatch.chdir(tmp_path)

    example = next(b for b in code_blocks(README) if b.lang == "python")
    listed = re.search(r"references=\[(.*?)\]", example.code).group(1)
    for seed, name in enumerate(re.findall(r'"([^"]+)"', listed)):
        reference_images(1, seed=seed)[0].save(name)  # stand-ins for the user's photos
    namespace: dict = {}
    exec(compile(example.code, f"README.md:{example.line}", "exec"), namespace)

    assert calls == [
        ("image_encoder", "h94/IP-Adapter", "models/image_encoder"),
        ("pipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("download", "h94/IP-Adapter", "models/ip-adapter_sd15.safetensors"),
        ("generate", 30, 7.5),
    ]
    assert (tmp_path / "dog.png").is_file()
    rp, pipe = namespace["rp"], namespace["pipe"]
    assert rp.composition.name == "ip-adapter" and rp.pipeline is pipe
    assert all(type(p).__module__.startswith("diffusers") for p in pipe.unet.attn_processors.values()), "detach() left refcond processors"


def test_readme_quickstart_is_exactly_the_two_commands():
    text = README.read_text(encoding="utf-8")
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    shell = [b for b in code_blocks_from_text(quickstart) if b.lang in ("bash", "sh", "shell")]
    assert len(shell) == 1, "the Quickstart has one shell block"
    assert [line for line in shell[0].code.splitlines() if line.strip()] == QUICKSTART


def test_ci_runs_the_readme_quickstart_verbatim():
    if not CI_SCRIPT.exists():
        pytest.skip(".ci/run does not exist yet")
    lines = [line.strip() for line in CI_SCRIPT.read_text(encoding="utf-8").splitlines()]
    for command in QUICKSTART:
        assert any(line == command or line.startswith(command + " ") for line in lines), f".ci/run does not run: {command}"


def test_the_user_guide_lists_every_error_type():
    """docs/index.md's error table names every RefcondError subclass refcond defines."""
    from refcond import compat, errors

    text = (DOCS / "index.md").read_text(encoding="utf-8")
    table = text[text.index("## Errors") : text.index("### Limits")]
    defined = {
        cls.__name__
        for module in (errors, compat)
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, refcond.RefcondError) and cls is not refcond.RefcondError
    }
    missing = sorted(name for name in defined if f"| `{name}`" not in table)
    assert not missing, f"docs/index.md's error table lacks {missing}"
