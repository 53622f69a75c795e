"""The ``learned-queries`` aggregator: K tokens for any number of references, blind to their order
and to padding, every parameter trained, conformance-checked like every aggregator."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import refcond
from refcond import MIXED_SOURCE, BuildContext, ConfigError, ReferenceEncoding, aggregators
from refcond.building import seeded
from refcond.config import validate_config
from refcond.learned_queries import LearnedQueriesAggregator, LearnedQueriesConfig
from refcond.testing import check_aggregator, make_encoding

DIM = 8


def build(dim: int = DIM, seed: int = 0, **config: Any) -> LearnedQueriesAggregator:
    """Build it as refcond does: through the registry, in a context whose encoder has ``embedding_dim``."""
    entry = refcond.from_modules(aggregators).registry.get("aggregator", "learned-queries")
    typed = validate_config(entry.config, {"num_tokens": 4, "heads": 2, **config}, where="aggregator 'learned-queries'")
    torch.manual_seed(seed)
    aggregator = entry.obj(typed, BuildContext(encoder=SimpleNamespace(embedding_dim=dim)))
    # Fresh output layers are small; random ones make every output depend visibly on every input.
    with torch.no_grad():
        for parameter in aggregator.parameters():
            parameter.normal_(0, 0.3)
    return aggregator.eval()


def group(references: list[torch.Tensor]) -> ReferenceEncoding:
    """One group from per-reference ``[T, D]`` tokens, sources by position."""
    tokens = torch.cat(references)[None]
    source = torch.cat([torch.full((len(r),), i) for i, r in enumerate(references)])[None]
    return ReferenceEncoding(tokens, torch.ones_like(source, dtype=torch.bool), source)


@pytest.mark.parametrize("mixed", [False, True], ids=["per-reference", "mixed-tokens"])
def test_it_conforms_and_promises_k_tokens(mixed):
    encoding = make_encoding((3, 1, 2), tokens_per_reference=3, dim=DIM, mixed=mixed)
    condition = check_aggregator(build(), encoding, fixed_length=4)
    assert condition.tokens.shape == (3, 4, DIM)
    assert condition.mask.all() and (condition.source == MIXED_SOURCE).all()


@pytest.mark.parametrize("count", [1, 2, 5, 9])
def test_k_tokens_of_output_dim_whatever_the_number_of_references(count):
    aggregator = build(width=6, output_dim=5, num_tokens=3)
    references = [torch.randn(2, DIM) for _ in range(count)]
    condition = aggregator(group(references))
    assert condition.tokens.shape == (1, 3, 5) and aggregator.output_dim(DIM) == 5


def test_the_references_order_does_not_matter():
    aggregator = build(layers=2)
    references = [torch.randn(3, DIM) for _ in range(4)]
    with torch.no_grad():
        forward = aggregator(group(references)).tokens
        backward = aggregator(group(references[::-1])).tokens
        shuffled = aggregator(group([references[2], references[0], references[3], references[1]])).tokens
    assert torch.allclose(forward, backward, atol=1e-5) and torch.allclose(forward, shuffled, atol=1e-5)
    assert not torch.allclose(forward, aggregator(group(references[:3])).tokens, atol=1e-3)  # but which references does


def test_a_padded_group_gives_what_it_gives_alone_whatever_the_padding_holds():
    aggregator = build(layers=2)
    big = [torch.randn(2, DIM) for _ in range(5)]
    small = [torch.randn(2, DIM) for _ in range(2)]
    batch = ReferenceEncoding.concat_batches([group(big), group(small)])
    garbage = batch.tokens.clone()
    garbage[~batch.mask] = torch.tensor([1e4, float("nan")]).repeat(DIM // 2)  # large values and NaN where mask is False
    with torch.no_grad():
        together = aggregator(ReferenceEncoding(garbage, batch.mask, batch.source)).tokens
        alone = aggregator(group(small)).tokens
    assert torch.isfinite(together).all()
    assert torch.allclose(together[1], alone[0], atol=1e-5)
    assert torch.allclose(together[0], aggregator(group(big)).tokens[0], atol=1e-5)


def test_gradients_reach_every_parameter_and_the_encoding():
    aggregator = build(layers=3, output_dim=6).train()
    encoding = make_encoding((3, 2), tokens_per_reference=2, dim=DIM)
    tokens = encoding.tokens.clone().requires_grad_(True)
    condition = aggregator(ReferenceEncoding(tokens, encoding.mask, encoding.source))
    (condition.tokens * torch.randn_like(condition.tokens)).sum().backward()
    silent = [name for name, p in aggregator.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"no gradient reaches {silent}"
    assert tokens.grad[encoding.mask].abs().sum(dim=-1).gt(0).all() and not tokens.grad[~encoding.mask].any()


def test_the_layout_of_its_weights():
    aggregator = build(dim=10, width=6, output_dim=12, num_tokens=3, layers=2, ff_mult=2)
    shapes = {k: tuple(v.shape) for k, v in aggregator.state_dict().items()}
    assert shapes["queries"] == (3, 6) and shapes["input.weight"] == (6, 10) and shapes["output.weight"] == (12, 6)
    assert shapes["layers.1.qkv.weight"] == (18, 6) and shapes["layers.1.feedforward.0.weight"] == (12, 6)
    assert sum(p.numel() for p in aggregator.parameters()) == aggregator.config.parameter_count(10)


def test_fresh_weights_follow_the_build_seed_and_the_backbones_dtype():
    config = LearnedQueriesConfig(num_tokens=2, heads=2)
    context = BuildContext(encoder=SimpleNamespace(embedding_dim=DIM), backbone=SimpleNamespace(device=torch.device("cpu"), dtype=torch.float64))
    with seeded(7, "aggregator"):
        first = LearnedQueriesAggregator.from_config(config, context)
    with seeded(7, "aggregator"):
        second = LearnedQueriesAggregator.from_config(config, context)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert first.queries.dtype == torch.float64
    condition = first(make_encoding((2,), dim=DIM))  # float32 tokens are read in the weights' dtype
    assert condition.tokens.dtype == torch.float64


@pytest.mark.parametrize(
    ("config", "context", "message"),
    [
        ({"heads": 3}, {"embedding_dim": 8}, r"width 8 \(the encoder's embedding_dim\) is not divisible by heads=3"),
        ({"width": 10, "heads": 4}, {"embedding_dim": 8}, r"width 10 is not divisible by heads=4"),
        ({}, None, r"sizes its input layer from the encoder's embedding_dim .* built with no encoder"),
        ({"width": 16384, "layers": 64}, {"embedding_dim": 8}, r"would have \d+(\.\d+)? billion parameters"),
    ],
    ids=["heads-do-not-divide-the-encoder-dim", "heads-do-not-divide-width", "no-encoder", "too-many-parameters"],
)
def test_what_cannot_be_built_is_a_config_error(config, context, message):
    encoder = None if context is None else SimpleNamespace(**context)
    with pytest.raises(ConfigError, match=message):
        LearnedQueriesAggregator.from_config(LearnedQueriesConfig(**config), BuildContext(encoder=encoder))


@pytest.mark.parametrize("field", ["num_tokens", "layers", "heads", "width", "output_dim", "ff_mult"])
def test_sizes_are_bounded(field):
    entry = refcond.from_modules(aggregators).registry.get("aggregator", "learned-queries")
    for bad in (0, 10**9):
        with pytest.raises(ConfigError, match=field):
            validate_config(entry.config, {field: bad}, where="aggregator 'learned-queries'")
    with pytest.raises(ConfigError, match="dropout"):
        validate_config(entry.config, {"dropout": 1.0}, where="aggregator 'learned-queries'")


def test_weights_wrong_sizes_and_empty_groups_are_refused():
    aggregator = build()
    encoding = make_encoding((2,), dim=DIM)
    with pytest.raises(ConfigError, match="takes no reference weights"):
        aggregator(encoding, weights=torch.ones(1, 2))
    with pytest.raises(ConfigError, match="built for tokens of size 8 .* got 4"):
        aggregator(make_encoding((2,), dim=4))
    with pytest.raises(ConfigError, match="group 0 has no reference tokens"):
        aggregator(ReferenceEncoding(encoding.tokens, torch.zeros_like(encoding.mask), encoding.source))


def test_it_trains_in_an_ip_adapter_like_composition(tmp_path):
    """CLIP hidden states -> learned-queries -> cross-attention: two steps of `refcond train` change its weights."""
    import json

    from refcond.testing import reference_images, tiny_sd15_pipeline
    from refcond.training import train

    for i, image in enumerate(reference_images(4, size=48)):
        image.save(tmp_path / f"{i}.png")
    lines = [{"references": [f"{(i + 1) % 4}.png", f"{(i + 2) % 4}.png"], "image": f"{i}.png", "caption": f"thing {i}"} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    composition = {
        "encoder": {"name": "clip", "config": {"output": "hidden_states"}},
        "aggregator": {"name": "learned-queries", "config": {"num_tokens": 4, "layers": 1, "heads": 2}},
        "injectors": [{"name": "cross-attention", "config": {"projector": "mlp"}}],
    }
    pipe = tiny_sd15_pipeline()
    fresh = refcond.from_pipe(pipe, composition, seed=3)  # what training starts from: the same seed
    start = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("aggregator.")}
    fresh.detach()
    run = {
        "composition": composition,
        "data": {"path": str(tmp_path / "train.jsonl"), "resolution": 64},
        "output": str(tmp_path / "run"),
        "seed": 3,
        "stages": [{"name": "lq", "train": ["aggregator", "injector.0"], "steps": 2, "batch_size": 2, "optimizer": {"learning_rate": 1e-3}}],
    }
    result = train(run, pipeline=pipe, progress=False)

    end = refcond.load(result.checkpoint, tiny_sd15_pipeline()).state_dict()
    assert set(start) == {k for k in end if k.startswith("aggregator.")} and "aggregator.queries" in start
    unchanged = [k for k in start if torch.equal(start[k], end[k])]
    assert not unchanged, f"trained aggregator weights did not change: {unchanged}"
