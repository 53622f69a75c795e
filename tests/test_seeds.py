"""``seed=`` fixes a composition's fresh weights: the same seed gives the same weights in any process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import refcond
from refcond.testing import tiny_sd15_pipeline

#: Builds fresh compositions in a new interpreter and prints a content hash of each one's weights.
SCRIPT = """
import json, sys, torch
import refcond
from refcond.testing import tiny_sd15_pipeline
from refcond_easyref.testing import tiny_easyref_overrides
out = {}
for name, roles in (("ip-adapter", {}), ("easyref", tiny_easyref_overrides(sys.argv[1]))):
    pipe = tiny_sd15_pipeline()
    torch.manual_seed(int(sys.argv[2]))  # the global generator's state must not matter
    rp = refcond.from_pipe(pipe, name, seed=11, **roles)
    out[name] = {role: refcond.content_hash(module) for role, module in rp.components().items() if isinstance(module, torch.nn.Module)}
    out[name]["lora"] = [refcond.content_hash(torch.nn.ParameterList(rp.parameters()))]
    rp.detach()
print(json.dumps(out))
"""


def fingerprints(folder: Path, *global_seeds: int) -> list[dict]:
    """Run SCRIPT in one new process per global seed, side by side."""
    runs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(folder), str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in global_seeds]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def test_the_same_seed_gives_the_same_fresh_weights_in_two_processes(tiny_qwen2vl_dir: Path) -> None:
    first, second = fingerprints(tiny_qwen2vl_dir, 0, 1)
    assert first == second
    assert set(first["easyref"]) == {"encoder", "aggregator", "injector.0", "lora"}


def test_another_seed_gives_other_weights_and_the_global_generator_is_left_alone() -> None:
    pipe = tiny_sd15_pipeline()

    def weights(seed: int | None) -> dict[str, torch.Tensor]:
        rp = refcond.from_pipe(pipe, "ip-adapter", seed=seed)
        state = rp.state_dict()
        rp.detach()
        return state

    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    a = weights(1)
    assert torch.equal(torch.rand(3), expected_next), "building with a seed consumed the global generator"
    b, c = weights(1), weights(2)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_each_role_draws_from_its_own_generator() -> None:
    """Swapping the aggregator leaves the injector's fresh weights as they were: an ablation changes one thing."""
    first, second = tiny_sd15_pipeline(), tiny_sd15_pipeline()
    torch.manual_seed(100)
    mean = refcond.from_pipe(first, "ip-adapter", seed=3)
    torch.manual_seed(200)  # another global state: only the seed may decide
    concat = refcond.from_pipe(second, "ip-adapter", seed=3, aggregator="concat")
    assert all(torch.equal(v, concat.state_dict()[k]) for k, v in mean.state_dict().items())
