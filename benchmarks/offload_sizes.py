"""What CPU offload takes off the GPU for EasyRef on SDXL: the bytes of parameters of every model, by role.

Built on the ``meta`` device (shapes only, no memory, a few seconds): the Qwen2-VL-2B-shaped ``mllm``
encoder and its ``reference-tokens`` aggregator (:mod:`easyref_encoder`'s 2B shape, K = 64), SDXL
base 1.0's UNet, VAE and two text encoders (their published configs, checked against their published
parameter counts), and the ``easyref`` injectors on that UNet: ``cross-attention`` (MLP projector,
``to_k_ip``/``to_v_ip`` per cross-attention layer) and the rank-128 ``lora`` layers. Bytes are at
the dtypes EasyRef runs in: the MLLM and its aggregator in bfloat16 (the encoder's default), the
rest in float16 (an SDXL pipeline's usual dtype, which the injectors follow).

Without offload all of it sits on the GPU. With ``rp.enable_model_cpu_offload()``, while the UNet
runs only the UNet with its LoRA layers does (plus the bound reference keys/values and the MLLM's
caches, not counted here); the encoder is on the GPU only while it encodes.

Run: ``python benchmarks/offload_sizes.py`` (prints one JSON object).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from easyref_encoder import SETTINGS, qwen2vl_2b_config
from refcond_easyref import ReferenceTokensAggregator, ReferenceTokensConfig
from refcond_encoders.mllm import MllmEncoder, MllmEncoderConfig
from refcond_injectors.cross_attention import CrossAttentionConfig, CrossAttentionInjector
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Qwen2VLForConditionalGeneration
from transformers.initialization import no_init_weights

from refcond import cross_attention_layers

#: EasyRef's composition: 64 reference tokens, rank-128 LoRA on to_q/to_k/to_v/to_out.0 of every attention layer.
NUM_TOKENS = 64
LORA_RANK = 128
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: Published parameter counts of SDXL base 1.0's models, to check the configs below.
SDXL_PARAMETERS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def sdxl_unet() -> UNet2DConditionModel:
    """stabilityai/stable-diffusion-xl-base-1.0 ``unet/config.json``."""
    return UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def sdxl_vae() -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024,
    )


def sdxl_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """CLIP ViT-L/14's text tower and OpenCLIP ViT-bigG/14's, with its projection."""
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
    return CLIPTextModel(clip_l), CLIPTextModelWithProjection(big_g)


def lora_parameters(unet: torch.nn.Module, rank: int) -> int:
    """Parameters of rank-``rank`` LoRA layers (A: rank x in, B: out x rank) on every attention layer's targets."""
    total = 0
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for target in LORA_TARGETS:
                linear = module.get_submodule(target)
                total += rank * (linear.in_features + linear.out_features)
    return total


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure() -> dict[str, dict[str, float]]:
    with torch.device("meta"), no_init_weights():
        mllm = Qwen2VLForConditionalGeneration(qwen2vl_2b_config())
        unet, vae = sdxl_unet(), sdxl_vae()
        text_encoder, text_encoder_2 = sdxl_text_encoders()
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for name, model in models.items():
        if parameters(model) != SDXL_PARAMETERS[name]:
            raise SystemExit(f"{name}: {parameters(model)} parameters, SDXL's has {SDXL_PARAMETERS[name]}: the config is off")

    image_processor, tokenizer = SETTINGS["qwen2vl-2b"].processor()
    encoder = MllmEncoder.from_model(mllm, image_processor, tokenizer, MllmEncoderConfig(model=None, dtype="bfloat16"))
    with torch.device("meta"):
        aggregator = ReferenceTokensAggregator(*encoder.final_layer(), ReferenceTokensConfig(num_tokens=NUM_TOKENS))
        cross = CrossAttentionInjector(CrossAttentionConfig(projector="mlp"), encoder.embedding_dim, cross_attention_layers(unet))
    counts = {
        "encoder (mllm, Qwen2-VL-2B shape)": (parameters(encoder), 2),
        "aggregator (reference-tokens, K=64)": (parameters(aggregator), 2),
        "injector cross-attention (projector + to_k_ip/to_v_ip)": (parameters(cross), 2),
        "injector lora (rank 128, inside the UNet)": (lora_parameters(unet, LORA_RANK), 2),
        "unet (SDXL)": (parameters(unet), 2),
        "text encoders (SDXL, both)": (parameters(text_encoder) + parameters(text_encoder_2), 2),
        "vae (SDXL)": (parameters(vae), 2),
    }
    rows = {name: {"parameters": n, "bytes": n * size, "GiB": round(n * size / 2**30, 3)} for name, (n, size) in counts.items()}
    everything = sum(row["bytes"] for row in rows.values())
    during_unet = rows["unet (SDXL)"]["bytes"] + rows["injector lora (rank 128, inside the UNet)"]["bytes"]
    refcond_part = sum(rows[name]["bytes"] for name in list(rows)[:3])
    rows["total on the GPU without offload"] = {"bytes": everything, "GiB": round(everything / 2**30, 3)}
    rows["on the GPU while the UNet runs, with offload"] = {"bytes": during_unet, "GiB": round(during_unet / 2**30, 3)}
    rows["refcond's part that offload moves (encoder, aggregator, cross-attention)"] = {"bytes": refcond_part, "GiB": round(refcond_part / 2**30, 3)}
    return rows


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
