"""refcond probe: the synthetic groups are what the task says, the encoder is cached by content, every
registered aggregator runs through the same trial, results resume, and the smoke run separates
learned-queries from mean."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import refcond
from refcond import BuildContext, Condition, ConfigError, EmptyConfig, UnknownComponentError, aggregators
from refcond.cli import cli
from refcond.config import validate_config
from refcond.probe import ProbeConfig, run_probe, runner
from refcond.probe import render as r
from refcond.probe.data import EncodedGroups, layout, training_batch
from refcond.probe.encoder import EncoderRecipe, cache_path, load_or_pretrain, recipe_key
from refcond.probe.stats import bootstrap, paired_difference, per_group, resamples

# -- the groups -------------------------------------------------------------------------------------


def objects(scenes: r.Scenes, count: int) -> list[list[set[tuple[int, int]]]]:
    """Per group, per reference: the set of (colour, shape) objects it holds."""
    colour = scenes.colour.view(count, r.MAX_REFERENCES, r.SLOTS)
    shape = scenes.shape.view(count, r.MAX_REFERENCES, r.SLOTS)
    present = scenes.present.view(count, r.MAX_REFERENCES, r.SLOTS)
    return [
        [{(int(c), int(s)) for c, s, p in zip(colour[g, i], shape[g, i], present[g, i]) if p} for i in range(r.MAX_REFERENCES)]
        for g in range(count)
    ]


@pytest.mark.parametrize("variant", r.VARIANTS)
def test_every_group_has_one_answer_the_only_class_all_its_references_hold(variant):
    scenes, target, counts = r.group_scenes(variant, 400, torch.Generator().manual_seed(0))
    assert set(counts.tolist()) == {3, 4, 5}
    for group, t, n in zip(objects(scenes, 400), target.tolist(), counts.tolist()):
        references, padding = group[:n], group[n:]
        assert set.intersection(*references) == {(t // len(r.SHAPES), t % len(r.SHAPES))}
        assert all(2 <= len(reference) <= 4 for reference in references) and not any(padding)


def test_binding_leaves_four_candidates_to_attributes_alone():
    scenes, target, counts = r.group_scenes("binding", 400, torch.Generator().manual_seed(1))
    for group, t, n in zip(objects(scenes, 400), target.tolist(), counts.tolist()):
        colours = set.intersection(*[{c for c, _ in ref} for ref in group[:n]])
        shapes = set.intersection(*[{s for _, s in ref} for ref in group[:n]])
        assert len(colours) >= 2 and len(shapes) >= 2, "C*, C2 and S*, S2 are in every reference"
        assert (t // len(r.SHAPES), t % len(r.SHAPES)) in {(c, s) for c in colours for s in shapes}
        # which common colour goes with which common shape is only in the pairing within references
        assert any((c, s) not in set.union(*group[:n]) for c in colours for s in shapes)


def test_groups_are_rendered_deterministically_and_labels_say_what_is_drawn():
    first = r.sample_groups("plain", 4, torch.Generator().manual_seed(5))
    again = r.sample_groups("plain", 4, torch.Generator().manual_seed(5))
    assert first.images.shape == (4, r.MAX_REFERENCES, 3, r.SIZE, r.SIZE)
    assert torch.equal(first.images, again.images) and torch.equal(first.target, again.target)
    assert 0 <= first.images.min() and first.images.max() <= 1
    for images, count in zip(first.images, first.counts.tolist()):
        assert images[:count].flatten(1).amax(dim=1).gt(0).all() and not images[count:].any()  # padding references are black

    red_circle_and_blue_cross = r.Scenes(torch.tensor([[0, 2, 0, 0]]), torch.tensor([[0, 3, 0, 0]]), torch.tensor([[True, True, False, False]]))
    image = r.render(red_circle_and_blue_cross, torch.Generator().manual_seed(0))[0]
    top_left, top_right, bottom = image[:, :16, :16], image[:, :16, 16:], image[:, 16:]
    assert top_left[0].max() == 1 and top_left[1:].max() == 0  # red, in its quadrant only
    assert top_right[2].max() == 1 and top_right[0].max() < 0.2  # blue
    assert bottom.max() == 0  # nothing where no object is
    assert r.presence_labels(red_circle_and_blue_cross).tolist() == [[1, 0, 1, 0, 0, 0, 1, 0, 0, 1]]
    assert r.class_labels(red_circle_and_blue_cross)[0].nonzero().flatten().tolist() == [0, 2 * 4 + 3]
    assert r.class_name(2 * 4 + 3) == "blue cross"


def test_layout_masks_padding_and_batches_shuffle_only_real_references():
    tokens = torch.randn(2, 5, 3, 4)
    encoding = layout(tokens, torch.tensor([2, 5]))
    assert encoding.tokens.shape == (2, 15, 4)
    assert encoding.mask.sum(dim=1).tolist() == [6, 15]
    assert encoding.source[0].tolist() == [0, 0, 0, 1, 1, 1] + [-1] * 9
    # Reference i of group g holds tokens equal to 10 g + i; references past the count are padding.
    values = (10 * torch.arange(6)[:, None] + torch.arange(5)).float()
    pool = EncodedGroups(values[:, :, None, None].expand(6, 5, 3, 4).clone(), torch.arange(6), torch.tensor([3, 4, 5, 3, 4, 5]))
    batch, target = training_batch(pool, 64, torch.Generator().manual_seed(0))
    for tokens, mask, g in zip(batch.tokens, batch.mask, target.tolist()):
        held = tokens[mask][::3, 0] - 10 * g
        assert sorted(held.tolist()) == list(range(int(pool.counts[g])))  # every real reference, once, no padding
    assert len({tuple(t[m][::3, 0].tolist()) for t, m in zip(batch.tokens, batch.mask)}) > 6  # in varying orders
    single, target = training_batch(pool, 8, torch.Generator().manual_seed(0), single=True)
    assert single.mask.sum(dim=1).tolist() == [3] * 8
    assert ((single.tokens[:, 0, 0] - 10 * target) < pool.counts[target]).all()
    assert pool.pooled().tokens.shape == (6, 5, 1, 4)


# -- statistics -------------------------------------------------------------------------------------


def test_bootstrap_intervals_and_paired_differences():
    draws = resamples(1000, 2000, seed=0)
    scores = (torch.arange(1000) % 4 == 0).double()  # 25 % right
    estimate = bootstrap(scores, draws)
    assert estimate.value == 0.25 and estimate.low < 0.25 < estimate.high and 0.04 < estimate.high - estimate.low < 0.07
    assert paired_difference(scores, scores, draws).as_points() == {"value": 0.0, "low": 0.0, "high": 0.0}
    better = scores.clone()
    better[1::4] = 1  # right on every group the other is, and on a quarter more
    difference = paired_difference(better, scores, draws)
    assert difference.value == pytest.approx(0.25) and difference.low > 0.2  # paired: tighter than two unpaired intervals
    assert per_group(torch.tensor([[True, False], [True, True], [False, False]])).tolist() == pytest.approx([2 / 3, 1 / 3])


# -- the encoder cache ------------------------------------------------------------------------------

TINY_ENCODER = {"width": 8, "steps": 3, "batch_size": 4}


def test_the_encoder_is_cached_by_recipe_and_a_damaged_file_is_made_again(tmp_path):
    recipe = EncoderRecipe(**TINY_ENCODER)
    first, facts = load_or_pretrain(recipe, tmp_path)
    assert not facts["cached"] and cache_path(recipe, tmp_path).is_file()
    again, facts = load_or_pretrain(recipe, tmp_path)
    assert facts["cached"] and all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert recipe_key(recipe) != recipe_key(EncoderRecipe(**{**TINY_ENCODER, "labels": "classes"}))
    cache_path(recipe, tmp_path).write_bytes(b"not a safetensors file")
    said = []
    _, facts = load_or_pretrain(recipe, tmp_path, said.append)
    assert not facts["cached"] and any("unreadable" in line for line in said)
    assert load_or_pretrain(recipe, tmp_path)[1]["cached"]


# -- runs -------------------------------------------------------------------------------------------

TINY = {
    "variants": ["binding"],
    "seeds": [0, 1],
    "steps": 3,
    "batch_size": 8,
    "train_groups": 16,
    "eval_groups": 20,
    "encoder": TINY_ENCODER,
}


class Broken(torch.nn.Module):
    def output_dim(self, input_dim: int) -> int:
        return input_dim

    def forward(self, encoding, weights=None) -> Condition:
        raise RuntimeError("this aggregator is broken")


class ThirdParty:
    """A plugin that registers a working aggregator with weights and a broken one."""

    __name__ = "third-party"

    @refcond.hookimpl
    def refcond_register_aggregators(self, register):
        def scaled(config: EmptyConfig, context: BuildContext) -> torch.nn.Module:
            class Scaled(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.scale = torch.nn.Parameter(torch.ones(context.encoder.embedding_dim))

                def output_dim(self, input_dim: int) -> int:
                    return input_dim

                def forward(self, encoding, weights=None) -> Condition:
                    return Condition(encoding.tokens * self.scale, encoding.mask, encoding.source)

            return Scaled()

        register("scaled", scaled, config=EmptyConfig)
        register("broken", lambda config, context: Broken(), config=EmptyConfig)


@pytest.fixture
def plugins():
    return refcond.from_modules(aggregators, ThirdParty())


def test_every_registered_aggregator_runs_failures_are_reported_and_a_second_run_resumes(plugins, tmp_path, monkeypatch):
    config = {**TINY, "methods": ["single", "mean@pooled", "learned-queries", "scaled", "broken"]}
    result = run_probe(config, tmp_path / "out", plugins, cache=tmp_path / "cache")
    rows = {row["method"]: row for row in result.results["accuracy"]}
    assert list(rows) == ["single", "mean@pooled", "learned-queries", "scaled"]
    assert rows["scaled"]["parameters"] == 8 and rows["learned-queries"]["parameters"] > 0 and rows["single"]["parameters"] == 0
    assert list(rows["scaled"]["per_seed"]) == ["0", "1"]
    assert {(f["method"], f["error"]) for f in result.results["failures"]} == {("broken", "RuntimeError: this aggregator is broken")}
    assert len(result.results["differences"]) == 6  # every pair of the four methods that ran
    for name in ("json", "markdown", "plot"):
        assert result.files[name].is_file()
    table = result.files["markdown"].read_text()
    assert "| binding | learned-queries - single |" in table and "broken (seed 0): RuntimeError" in table
    assert json.loads(result.files["json"].read_text())["accuracy"] == result.results["accuracy"]

    calls = []
    monkeypatch.setattr(runner, "run_trial", lambda *args, **kwargs: calls.append(args[1]) or pytest.fail("a finished trial ran again"))
    said = []
    monkeypatch.setattr(runner, "load_or_pretrain", lambda *args, **kwargs: pytest.fail("the encoder was loaded for nothing"))
    again = run_probe({**config, "methods": ["single", "mean@pooled", "learned-queries", "scaled"]}, tmp_path / "out", plugins, cache=tmp_path / "cache", progress=said.append)
    assert again.results["accuracy"] == result.results["accuracy"] and not calls
    assert said == ["binding: every trial already done"]


def test_changed_settings_rerun_only_what_they_change(plugins, tmp_path, monkeypatch):
    run_probe({**TINY, "methods": ["mean", "learned-queries"]}, tmp_path / "out", plugins, cache=tmp_path / "cache", make_plot=False)
    ran = []
    real = runner.run_trial
    monkeypatch.setattr(runner, "run_trial", lambda *args, **kwargs: ran.append((args[1], args[6])) or real(*args, **kwargs))
    config = {**TINY, "methods": ["mean", "learned-queries"], "aggregator_configs": {"learned-queries": {"layers": 1}}}
    run_probe(config, tmp_path / "out", plugins, cache=tmp_path / "cache", make_plot=False)
    assert ran == [("learned-queries", 0), ("learned-queries", 1)]


def test_unknown_aggregators_and_bad_configs_fail_before_any_work(plugins, tmp_path):
    with pytest.raises(UnknownComponentError, match="unknown aggregator 'maen'"):
        run_probe({**TINY, "methods": ["maen"]}, tmp_path, plugins)
    with pytest.raises(ConfigError, match=r"aggregator 'learned-queries'(.|\n)*heads"):
        run_probe({**TINY, "methods": ["learned-queries"], "aggregator_configs": {"learned-queries": {"heads": 0}}}, tmp_path, plugins)
    with pytest.raises(ConfigError, match="methods are listed twice: mean"):
        validate_config(ProbeConfig, {"methods": ["mean", "mean@tokens"]}, "refcond probe")
    with pytest.raises(ConfigError, match="not a method"):
        validate_config(ProbeConfig, {"methods": ["mean@pixels"]}, "refcond probe")
    with pytest.raises(ConfigError, match="--config names aggregator 'concat', which no method uses"):
        run_probe({**TINY, "methods": ["mean"], "aggregator_configs": {"concat": {}}}, tmp_path, plugins)
    assert not any(tmp_path.iterdir())


def test_the_command_line_runs_the_probe_and_reports_bad_options(tmp_path):
    args = ["probe", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--aggregators", "mean,learned-queries", "--variants", "plain",
            "--seeds", "0", "--steps", "2", "--batch-size", "4", "--train-groups", "8", "--eval-groups", "10", "--encoder-steps", "2",
            "--config", 'learned-queries={"layers": 1}', "--labels", "plain=attributes", "--no-plot", "--json", "--quiet"]
    result = CliRunner().invoke(cli, args, obj=refcond.from_modules(aggregators))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["method"] for row in report["accuracy"]] == ["mean", "learned-queries"]
    assert report["settings"]["aggregator_configs"] == {"learned-queries": {"layers": 1}} and report["settings"]["labels"]["plain"] == "attributes"
    assert not (tmp_path / "out" / "probe.png").exists()
    bad = CliRunner().invoke(cli, ["probe", "--config", "learned-queries=layers:1"], obj=refcond.from_modules(aggregators))
    assert bad.exit_code == 2 and "--config" in bad.output and "not JSON" in bad.output
    bad = CliRunner().invoke(cli, ["probe", "--variants", "sideways", "--out", str(tmp_path / "x")], obj=refcond.from_modules(aggregators))
    assert bad.exit_code == 1 and "Error: invalid configuration for refcond probe" in bad.output and "variants" in bad.output


# -- the smoke run ----------------------------------------------------------------------------------


def test_the_smoke_run_separates_learned_queries_from_mean(tmp_path):
    """The binding variant at the --smoke settings: learned-queries at least 10 points above mean, in under 30 s."""
    started = time.monotonic()
    result = run_probe(runner.SMOKE, tmp_path, refcond.from_modules(aggregators), cache=tmp_path / "cache", make_plot=False)
    seconds = time.monotonic() - started
    accuracy = {row["method"]: row["accuracy"]["value"] for row in result.results["accuracy"]}
    difference = {(d["a"], d["b"]): d["difference"] for d in result.results["differences"]}
    assert accuracy["learned-queries"] >= accuracy["mean@pooled"] + 10, accuracy
    assert accuracy["learned-queries"] >= accuracy["mean"] + 10, accuracy
    assert difference["learned-queries", "mean@pooled"]["low"] > 0
    print(f"smoke probe: {accuracy} in {seconds:.1f} s")
