"""EasyRef's ``reference-tokens`` aggregator (refcond-easyref), on the tiny Qwen2-VL.

The oracle is built as the official code builds ``mllm_final_layer``: a copy of the decoder with only
its last layer, called as a fresh forward over ``[trunk output, reference tokens]`` (transformers' own
causal mask and positions). Each trap of the official behaviour has a test that fails if it differed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from refcond_easyref import ReferenceTokensAggregator, ReferenceTokensConfig
from refcond_encoders.mllm import EASYREF_INSTRUCTION, MllmEncoder, MllmEncoderConfig

from refcond import BuildContext, ConfigError, ReferenceEncoding
from refcond.plugins import load_plugins
from refcond.testing import check_aggregator, make_encoding, reference_images
from refcond.testing.qwen2vl import (
    MAX_PIXELS,
    MIN_PIXELS,
    tiny_qwen2vl,
    tiny_qwen2vl_processor,
)

K = 8


@pytest.fixture(scope="module")
def parts():
    """(encoder, aggregator, untouched copy of the full model)."""
    model = tiny_qwen2vl()
    full = copy.deepcopy(model)
    image_processor, tokenizer = tiny_qwen2vl_processor()
    config = MllmEncoderConfig(
        model=None, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, dtype="float32"
    )
    encoder = MllmEncoder.from_model(model, image_processor, tokenizer, config)
    torch.manual_seed(1)
    aggregator = ReferenceTokensAggregator.from_config(
        ReferenceTokensConfig(num_tokens=K), BuildContext(encoder=encoder)
    )
    return encoder, aggregator, full


def official_final_layer(
    full: torch.nn.Module, aggregator: ReferenceTokensAggregator
) -> torch.nn.Module:
    """``mllm_final_layer``: the decoder with only its last layer (and its final norm), plus the reference tokens."""
    final = copy.deepcopy(full).model.language_model
    final.layers = final.layers[-1:]
    final.reference_tokens = torch.nn.Parameter(
        aggregator.reference_tokens.detach().clone()
    )
    return final


def official_condition(
    final: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Official step 3-5: append the reference tokens (mask ones), one fresh forward, take the last K."""
    references = final.reference_tokens[None].repeat(hidden.shape[0], 1, 1)
    sequence = torch.cat([hidden, references], dim=1)
    full_mask = torch.cat(
        [
            mask.long(),
            torch.ones(hidden.shape[0], references.shape[1], dtype=torch.long),
        ],
        dim=1,
    )
    if "attention_mask" not in kwargs:
        kwargs["attention_mask"] = full_mask
    return final(inputs_embeds=sequence, **kwargs).last_hidden_state[
        :, -references.shape[1] :
    ]


# -- against the official construction --------------------------------------------------------------


def test_condition_equals_the_official_final_layer(parts):
    """Copy of the last layer + final norm, fresh positions 0..L+K-1, causal mask, the last K tokens."""
    encoder, aggregator, full = parts
    with torch.no_grad():
        encoding = encoder.encode([reference_images(3, seed=1)])
        condition = aggregator(encoding)
        expected = official_condition(
            official_final_layer(full, aggregator), encoding.tokens, encoding.mask
        )
    assert condition.tokens.shape == (1, K, encoder.embedding_dim)
    assert condition.mask.all() and (condition.source == -1).all()
    torch.testing.assert_close(condition.tokens, expected, atol=1e-5, rtol=1e-4)


def test_positions_are_1d_over_trunk_and_reference_tokens(parts):
    """Official: a fresh forward with positions 0..L+K-1 (1-D on all three M-RoPE axes).

    RoPE is relative, so shifting every position by the same amount changes nothing (checked); what
    would change the result is Qwen2-VL's image-aware M-RoPE positions for the trunk part with the
    reference tokens continuing after them (what transformers computes when it sees the image grid),
    or reference tokens numbered from 0 on their own.
    """
    encoder, aggregator, full = parts
    group = reference_images(2, seed=2)
    inputs = encoder.inputs([group], [EASYREF_INSTRUCTION])
    with torch.no_grad():
        encoding = encoder.encode([group])
        condition = aggregator(encoding).tokens
        length = encoding.tokens.shape[1]
        final = official_final_layer(full, aggregator)

        def with_positions(positions: torch.Tensor) -> torch.Tensor:
            return official_condition(
                final,
                encoding.tokens,
                encoding.mask,
                position_ids=positions.reshape(3, 1, length + K),
            )

        one_d = torch.arange(length + K).expand(3, -1)
        mrope, _ = full.model.get_rope_index(
            inputs["input_ids"],
            (inputs["input_ids"] == encoder.image_token_id).int(),
            image_grid_thw=inputs["image_grid_thw"],
        )
        mrope = mrope[:, 0]
        mrope_then_continue = torch.cat(
            [mrope, mrope.max() + 1 + torch.arange(K).expand(3, -1)], dim=1
        )
        separately = torch.cat([torch.arange(length), torch.arange(K)]).expand(3, -1)
        torch.testing.assert_close(
            condition, with_positions(one_d), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            condition, with_positions(one_d + 1000), atol=1e-4, rtol=1e-3
        )
        assert not torch.equal(mrope, torch.arange(length).expand(3, -1))
        assert not torch.allclose(
            condition, with_positions(mrope_then_continue), atol=1e-3
        )
        assert not torch.allclose(condition, with_positions(separately), atol=1e-3)


def test_end_to_end_parity_with_the_official_recipe(parts):
    """§5 of the reference notes, by hand: trunk = copy with layers[:-1] (final norm kept), per-image ViT, final layer copy."""
    encoder, aggregator, full = parts
    group = reference_images(3, seed=3)
    inputs = encoder.inputs([group], [EASYREF_INSTRUCTION])
    trunk = copy.deepcopy(full)
    trunk.model.language_model.layers = trunk.model.language_model.layers[:-1]
    trunk.norm = (
        torch.nn.Identity()
    )  # the official no-op: an attribute on the outer class
    with torch.no_grad():
        embeds = trunk.model.language_model.embed_tokens(inputs["input_ids"])
        patches = inputs["image_grid_thw"].prod(-1).tolist()
        features = torch.cat(
            [
                trunk.model.visual(p, grid_thw=g[None]).pooler_output
                for p, g in zip(
                    inputs["pixel_values"].split(patches), inputs["image_grid_thw"]
                )
            ]
        )
        embeds = embeds.masked_scatter(
            (inputs["input_ids"] == full.config.image_token_id)[..., None], features
        )
        hidden = trunk(
            attention_mask=inputs["attention_mask"],
            inputs_embeds=embeds,
            output_hidden_states=True,
        ).hidden_states[-1]
        expected = official_condition(
            official_final_layer(full, aggregator), hidden, inputs["attention_mask"]
        )
        condition = aggregator(encoder.encode([group])).tokens
    torch.testing.assert_close(condition, expected, atol=1e-5, rtol=1e-4)


# -- attention ------------------------------------------------------------------------------------


def _perturbed(
    aggregator: ReferenceTokensAggregator, encoding: ReferenceEncoding, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        before = aggregator(encoding).tokens
        changed = copy.deepcopy(aggregator)
        changed.reference_tokens[k] += 1.0
        return before, changed(encoding).tokens


def test_attention_is_causal_by_default(parts):
    """Official: ``is_causal = False`` is ignored under sdpa, so token 0 does not see tokens 1..K-1."""
    encoder, aggregator, _ = parts
    encoding = encoder.encode([reference_images(2, seed=4)])
    before, after = _perturbed(aggregator, encoding, k=3)
    torch.testing.assert_close(after[:, :3], before[:, :3], atol=0, rtol=0)
    assert not torch.allclose(after[:, 3:], before[:, 3:], atol=1e-4)


def test_bidirectional_attention_lets_every_token_see_every_other(parts):
    encoder, aggregator, full = parts
    bidirectional = ReferenceTokensAggregator(
        copy.deepcopy(aggregator.layers[0]),
        copy.deepcopy(aggregator.norm),
        aggregator.rotary_emb,
        ReferenceTokensConfig(num_tokens=K, attention="bidirectional"),
    )
    with torch.no_grad():
        bidirectional.reference_tokens.copy_(aggregator.reference_tokens)
    encoding = encoder.encode([reference_images(2, seed=4)])
    before, after = _perturbed(bidirectional, encoding, k=3)
    assert not torch.allclose(after[:, 0], before[:, 0], atol=1e-4)
    length = encoding.tokens.shape[1] + K
    no_mask = {
        "full_attention": torch.zeros(1, 1, length, length)
    }  # transformers takes a prepared mask mapping as is
    with torch.no_grad():
        expected = official_condition(
            official_final_layer(full, aggregator),
            encoding.tokens,
            encoding.mask,
            attention_mask=no_mask,
        )
    torch.testing.assert_close(before, expected, atol=1e-5, rtol=1e-4)


# -- shape, order, batches ------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 5])
def test_condition_has_k_tokens_whatever_the_number_of_references(parts, count):
    encoder, aggregator, _ = parts
    with torch.no_grad():
        condition = aggregator(encoder.encode([reference_images(count, seed=count)]))
    assert condition.tokens.shape == (1, K, encoder.embedding_dim)


def test_reference_order_changes_the_condition(parts):
    """Order sensitivity comes from causal attention + 1-D positions over the concatenated image tokens."""
    encoder, aggregator, _ = parts
    a, b, c = reference_images(3, seed=5)
    with torch.no_grad():
        first = aggregator(encoder.encode([[a, b, c]])).tokens
        second = aggregator(encoder.encode([[c, a, b]])).tokens
    assert not torch.allclose(first, second, atol=1e-4)


def test_groups_of_sizes_1_and_3_give_their_single_results(parts):
    encoder, aggregator, _ = parts
    small, large = reference_images(1, seed=6), reference_images(3, seed=7)
    with torch.no_grad():
        batch = aggregator(encoder.encode([small, large])).tokens
        alone = [
            aggregator(encoder.encode([group])).tokens[0] for group in (small, large)
        ]
        # The same encodings right-padded (as ReferenceEncoding.concat_batches pads) give the same condition.
        right_padded = ReferenceEncoding.concat_batches(
            [encoder.encode([small]), encoder.encode([large])]
        )
        assert not right_padded.mask[0, -1]
        right = aggregator(right_padded).tokens
    for row in range(2):
        torch.testing.assert_close(batch[row], alone[row], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(right[row], alone[row], atol=1e-5, rtol=1e-4)


def test_aggregator_conforms(parts):
    encoder, aggregator, _ = parts
    encoding = encoder.encode(
        [reference_images(2, seed=8), reference_images(1, seed=9)]
    )
    check_aggregator(
        aggregator,
        ReferenceEncoding(encoding.tokens.detach(), encoding.mask, encoding.source),
        fixed_length=K,
    )


def test_unconditional_encoding_aggregates_to_k_tokens(parts):
    encoder, aggregator, _ = parts
    groups = [reference_images(3, seed=10), reference_images(1, seed=11)]
    with torch.no_grad():
        encoding = encoder.encode(groups)
        unconditional = aggregator(encoder.encode_unconditional(encoding, groups))
    assert unconditional.tokens.shape == (2, K, encoder.embedding_dim)
    torch.testing.assert_close(
        unconditional.tokens[0], unconditional.tokens[1], atol=0, rtol=0
    )


# -- weights --------------------------------------------------------------------------------------


def test_state_dict_maps_onto_the_official_mllm_final_layer_keys(parts):
    encoder, aggregator, full = parts
    official = official_final_layer(full, aggregator)
    official.embed_tokens = (
        torch.nn.Identity()
    )  # as the official code: no embedding, vision or head weights
    assert set(aggregator.state_dict()) == set(official.state_dict())
    assert aggregator.reference_tokens.shape == (K, encoder.embedding_dim)
    assert {
        "reference_tokens",
        "norm.weight",
        "layers.0.self_attn.q_proj.bias",
        "layers.0.mlp.down_proj.weight",
    } <= set(aggregator.state_dict())
    # Loading the official tensors into it is a plain prefix rename.
    aggregator_copy = copy.deepcopy(aggregator)
    aggregator_copy.load_state_dict(
        {key: value.clone() for key, value in official.state_dict().items()},
        strict=True,
    )


def test_reference_tokens_start_as_official_small_noise():
    model = tiny_qwen2vl()
    layer, norm = model.model.language_model.layers[-1], model.model.language_model.norm
    torch.manual_seed(0)
    aggregator = ReferenceTokensAggregator(
        layer,
        norm,
        model.model.language_model.rotary_emb,
        ReferenceTokensConfig(num_tokens=256),
    )
    assert 0.08 < float(aggregator.reference_tokens.detach().std()) < 0.12


def test_training_the_aggregator_leaves_the_encoder_and_its_model_alone():
    model = tiny_qwen2vl()
    image_processor, tokenizer = tiny_qwen2vl_processor()
    config = MllmEncoderConfig(model=None, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, dtype="float32")
    encoder = MllmEncoder.from_model(model, image_processor, tokenizer, config)
    last = model.model.language_model.layers[-1]
    last_before = {k: v.clone() for k, v in last.state_dict().items()}
    trained = ReferenceTokensAggregator.from_config(
        ReferenceTokensConfig(num_tokens=K), BuildContext(encoder=encoder)
    )
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoding = encoder.encode([reference_images(1, seed=12)])
    optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)
    trained(
        ReferenceEncoding(encoding.tokens.detach(), encoding.mask, encoding.source)
    ).tokens.pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(trained.norm.weight, encoder.norm.weight)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert all(torch.equal(v, last_before[k]) for k, v in last.state_dict().items())


# -- registration and errors ------------------------------------------------------------------------


def test_registered_by_the_easyref_distribution():
    entry = load_plugins().registry.get("aggregator", "reference-tokens")
    assert entry.config is ReferenceTokensConfig
    assert entry.provenance.distribution == "refcond-easyref"
    assert (
        ReferenceTokensConfig().num_tokens == 64
        and ReferenceTokensConfig().attention == "causal"
    )
    with pytest.raises(ValueError):
        ReferenceTokensConfig(attention="full")


def test_needs_an_mllm_encoder():
    with pytest.raises(ConfigError, match="final_layer"):
        ReferenceTokensAggregator.from_config(
            ReferenceTokensConfig(), BuildContext(encoder=object())
        )


def test_bad_input_is_explained(parts):
    _, aggregator, _ = parts
    encoding = make_encoding(
        [2], tokens_per_reference=3, dim=aggregator.hidden_size, mixed=True
    )
    with pytest.raises(ConfigError, match="takes no reference weights"):
        aggregator(encoding, torch.ones(1, 2))
    with pytest.raises(ConfigError, match="tokens of size 64"):
        aggregator(make_encoding([2], dim=8, mixed=True))
    assert aggregator.output_dim(999) == aggregator.hidden_size


def test_the_number_of_reference_tokens_is_bounded_before_anything_is_allocated():
    plugins = load_plugins()
    entry = plugins.registry.get("aggregator", "reference-tokens")
    from refcond.config import validate_config

    for num_tokens in (10**11, 2**63 - 1, 4097):
        with pytest.raises(ConfigError, match=r"num_tokens: Input should be less than or equal to 4096"):
            validate_config(entry.config, {"num_tokens": num_tokens}, where="aggregator 'reference-tokens'")
    assert ReferenceTokensConfig(num_tokens=4096).num_tokens == 4096
