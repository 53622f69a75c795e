"""The offline demo: the ``ip-adapter`` composition end to end on tiny random-weight models.

Nothing is downloaded. A tiny SD1.5-like pipeline and three synthetic references come from
:mod:`refcond.testing`; the composition is looked up by name in the plugin registry, exactly as a
user's would be, and its injector is freshly initialised from ``seed`` (there is no checkpoint), so
two runs with the same arguments write the same image. The pictures are noise, since the weights are
random: the demo shows that every stage runs and how long each takes, not what a trained model draws.

>>> from refcond.demo import run_demo
>>> report = run_demo("refcond-demo", steps=2)  # doctest: +SKIP
>>> report["outputs"]["image"]  # doctest: +SKIP
'/.../refcond-demo/demo.png'
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import refcond
from refcond.files import write_image, write_json
from refcond.plugins import Plugins, get_plugins
from refcond.testing import reference_images, tiny_sd15_pipeline

COMPOSITION = "ip-adapter"
PROMPT = "a photo of a cat"
NUM_REFERENCES = 3


def run_demo(
    out_dir: str | Path = "refcond-demo",
    steps: int = 2,
    seed: int = 0,
    *,
    prompt: str = PROMPT,
    guidance_scale: float = 7.5,
    reference_scale: float = 1.0,
    plugins: Plugins | None = None,
    status: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate one image from three synthetic references and write it with a report.

    Writes ``demo.png``, ``reference_0.png`` ... and ``report.json`` into ``out_dir`` (created if
    needed) and returns the report: versions, plugins, the composition, the condition's shape,
    timings per stage in seconds, the seed and the output paths.

    :param steps: denoising steps (the tiny UNet takes a fraction of a second per step on a CPU).
    :param seed: seeds the models, the injector's fresh weights and the initial noise.
    :param plugins: the plugins to build from; default the installed ones.
    :param status: called with a one-line message as each stage starts (the CLI prints them).
    :param progress: show diffusers' denoising progress bar.
    """
    # Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning
    # threads make every small operation many times slower: run single-threaded, then restore.
    # fork_rng: the seeding below leaves the caller's global RNG as it was.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return _run(Path(out_dir), steps, seed, prompt, guidance_scale, reference_scale, plugins or get_plugins(), status, progress)
    finally:
        torch.set_num_threads(threads)


def _run(
    out: Path,
    steps: int,
    seed: int,
    prompt: str,
    guidance_scale: float,
    reference_scale: float,
    plugins: Plugins,
    status: Callable[[str], None] | None,
    progress: bool,
) -> dict[str, Any]:
    say = status or (lambda message: None)
    plugins.registry.get("composition", COMPOSITION)  # unknown -> error listing the available ones, before any work
    timings: dict[str, float] = {}
    started = time.perf_counter()

    say("Building tiny random-weight models...")
    t = time.perf_counter()
    pipe = tiny_sd15_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=not progress)
    references = reference_images(NUM_REFERENCES, seed=seed)
    timings["models"] = time.perf_counter() - t

    say(f"Building composition {COMPOSITION!r} (injector initialised from seed {seed})...")
    t = time.perf_counter()
    rp = refcond.from_pipe(pipe, COMPOSITION, plugins=plugins, seed=seed)  # the injector's fresh weights
    timings["build"] = time.perf_counter() - t

    say(f"Encoding {len(references)} references...")
    t = time.perf_counter()
    condition, unconditional = rp.encode([references])
    timings["encode"] = time.perf_counter() - t

    say(f"Generating ({steps} steps)...")
    t = time.perf_counter()
    image = rp(
        prompt,
        references=references,
        reference_scale=reference_scale,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    timings["generate"] = time.perf_counter() - t
    rp.detach()

    t = time.perf_counter()
    image_path = write_image(out / "demo.png", image).resolve()
    reference_paths = [write_image(out / f"reference_{i}.png", ref).resolve() for i, ref in enumerate(references)]
    report_path = (out / "report.json").resolve()
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    report = {
        "refcond_version": refcond.__version__,
        "versions": _versions(),
        "plugins": [{"name": p.name, "distribution": p.distribution, "version": p.version} for p in plugins.plugins()],
        "plugin_failures": [str(failure) for failure in plugins.failures],
        "composition": rp.composition.model_dump(mode="json"),
        "backbone": rp.backbone.name,
        "prompt": prompt,
        "steps": steps,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "reference_scale": reference_scale,
        "num_references": len(references),
        "condition_shape": list(condition.tokens.shape),
        "unconditional_shape": list(unconditional.tokens.shape),
        "image_size": [image.width, image.height],
        "image_sha256": hashlib.sha256(image.tobytes()).hexdigest(),
        "timings": {stage: round(seconds, 4) for stage, seconds in timings.items()},
        "outputs": {
            "dir": str(out.resolve()),
            "image": str(image_path),
            "references": [str(p) for p in reference_paths],
            "report": str(report_path),
        },
    }
    write_json(report_path, report)
    return report


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
