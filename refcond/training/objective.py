"""The training objective: one micro-batch through the composition's conditioning path and the UNet, to a loss.

:class:`Objective` is the ``torch.nn.Module`` accelerate prepares (and wraps in DDP / DeepSpeed /
FSDP across processes). Its submodules are the composition's components and the UNet (whose
PEFT LoRA layers may train); the VAE and text encoders are held outside the module tree, frozen.
The training state saved every K steps holds only the trained weights, not a copy of the backbone
(the trainer's accelerate hooks, :func:`trained_weights` and :func:`restore_trained_weights`).

The loss is EasyRef's and IP-Adapter's: the VAE latents of the target image, noise and a timestep
from the backbone's scheduler, conditioning dropout per sample (references → the encoder's
unconditional input, caption → "", or both), and the MSE between the UNet's prediction and the
scheduler's target (the noise, or the velocity for v-prediction), optionally min-SNR weighted.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from refcond.contracts import Condition
from refcond.training.config import DropoutConfig, LossConfig

if TYPE_CHECKING:
    from refcond.training.encoding_cache import EncodingCache

#: What :meth:`Objective.forward` returns besides the loss, for logs and the dropout test.
DROPOUT_KINDS = ("references", "text", "both")



class Objective(torch.nn.Module):
    """The denoising loss of a :class:`refcond.RefcondPipeline` on a batch (see the module docstring)."""

    def __init__(self, rp: Any, dropout: DropoutConfig, loss: LossConfig, encodings: EncodingCache | None = None):
        """``encodings``: the stage's on-disk cache of the frozen encoder's outputs (``None``: run the encoder every time)."""
        super().__init__()
        self.encodings = encodings
        self.__dict__["rp"] = rp  # the pipeline wrapper is not a module; its parts are registered below
        self.dropout = dropout
        self.loss_config = loss
        self.parts = torch.nn.ModuleDict(
            {role.replace(".", "_"): component for role, component in rp.components().items() if isinstance(component, torch.nn.Module)}
        )
        self.unet = rp.pipeline.unet  # frozen base weights; trainable PEFT LoRA layers live inside it
        self.__dict__["scheduler"] = DDPMScheduler.from_config(rp.pipeline.scheduler.config)
        self.is_xl = getattr(rp.backbone, "name", "") == "sdxl" or hasattr(rp.pipeline, "text_encoder_2")
        self.__dict__["_binding"] = ExitStack()

    def release(self) -> None:
        """Unbind the condition of the last forward pass (call it after that pass's backward)."""
        self._binding.close()

    # -- the loss -----------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(loss, stats)`` for one micro-batch; all randomness (noise, timesteps, dropout) from ``generator``.

        With gradients enabled the condition stays bound to the UNet until :meth:`release` (or the
        next forward pass): activations recomputed in the backward pass (gradient checkpointing)
        must read the same condition as the forward pass did.
        """
        self.release()
        rp = self.rp
        size = batch["pixel_values"].shape[0]
        if size == 0:  # every sample of the micro-batch was skipped: a zero loss that still reaches the parameters
            trainable = [p for p in self.parameters() if p.requires_grad]
            return sum((p.sum() for p in trainable), torch.zeros(())) * 0.0, {"samples": 0, **{k: 0 for k in DROPOUT_KINDS}}
        # Where the UNet and the VAE are, read once: diffusers' .device / .dtype walk every submodule at each read.
        unet, vae = _where(self.unet), _where(self.rp.pipeline.vae)
        device = unet.device
        latents = self._latents(batch["pixel_values"], generator, vae, unet)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if self.loss_config.noise_offset:
            noise = noise + self.loss_config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator).to(device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (size,), generator=generator).to(device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)

        drops = self._dropout(size, generator)
        captions = ["" if drops["text"][b] or drops["both"][b] else caption for b, caption in enumerate(batch["captions"])]
        text, added = self._text(captions, batch, latents, unet)
        condition = self._condition(batch["references"], captions, drops["references"] | drops["both"])
        with ExitStack() as binding:
            binding.enter_context(rp.bind(condition))
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
            if torch.is_grad_enabled():
                self.__dict__["_binding"] = binding.pop_all()
        target = noise if self.scheduler.config.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.loss_config.snr_gamma is not None:
            per_sample = per_sample * self._snr_weights(timesteps)
        stats = {"samples": size, **{k: int(v.sum()) for k, v in drops.items()}}
        return per_sample.mean(), stats

    def _latents(self, pixels: torch.Tensor, generator: torch.Generator, at: torch.Tensor, unet: torch.Tensor) -> torch.Tensor:
        vae = self.rp.pipeline.vae
        # The VAE runs outside mixed precision, in its own dtype, as diffusers' and EasyRef's training scripts run it.
        with torch.no_grad(), torch.autocast(device_type=at.device.type, enabled=False):
            latents = vae.encode(pixels.to(device=at.device, dtype=at.dtype)).latent_dist.sample(generator)
        return (latents * vae.config.scaling_factor).to(device=unet.device, dtype=unet.dtype)

    def _dropout(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Exclusive per-sample events, as the official data loader draws them: references, then text, then both."""
        u = torch.rand(size, generator=generator)
        r, t, b = self.dropout.references, self.dropout.text, self.dropout.both
        return {"references": u < r, "text": (u >= r) & (u < r + t), "both": (u >= r + t) & (u < r + t + b)}

    def _text(
        self, captions: list[str], batch: Mapping[str, Any], latents: torch.Tensor, unet: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        pipe = self.rp.pipeline
        device, dtype = unet.device, unet.dtype
        with torch.no_grad():
            if not self.is_xl:
                embeds = pipe.encode_prompt(captions, device, 1, False)[0]
                return embeds.to(dtype), None
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        height, width = latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor
        target = torch.tensor([[height, width]] * len(captions))
        time_ids = torch.cat([batch["original_sizes"], batch["crops_top_left"], target], dim=1).to(device=device, dtype=embeds.dtype)
        return embeds.to(dtype), {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}

    def _condition(self, references: list[list[Any]], captions: list[str], dropped: torch.Tensor) -> Condition | None:
        rp = self.rp
        if rp.encoder is None:
            return None
        with self.encodings.serving() if self.encodings is not None else nullcontext():
            condition, unconditional = rp.encode(references, prompts=captions)
        if not bool(dropped.any()):
            return condition
        both = Condition.concat_batches([condition, unconditional])  # one length for both, padding masked
        rows = len(references)
        pick = torch.arange(rows) + torch.where(dropped, rows, 0)
        device = both.tokens.device
        return Condition(both.tokens[pick.to(device)], both.mask[pick.to(both.mask.device)], both.source[pick.to(both.source.device)])

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights (Hang et al. 2023): ``min(SNR, γ) / SNR`` for ε, ``/ (SNR + 1)`` for v-prediction."""
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=float(self.loss_config.snr_gamma))
        return clipped / (snr + 1 if self.scheduler.config.prediction_type == "v_prediction" else snr)


def _where(module: torch.nn.Module) -> torch.Tensor:
    """A parameter of ``module``: its ``.device`` and ``.dtype`` are the module's (diffusers' models hold one of each)."""
    return next(module.parameters())


def trained_weights(rp: Any) -> dict[str, torch.Tensor]:
    """What a training state stores: the composition's own weights (``rp.state_dict()``), copied."""
    return {key: value.detach().clone().contiguous() for key, value in rp.state_dict().items()}


def restore_trained_weights(rp: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Copy weights saved by :func:`trained_weights` back in place (optimizers keep their parameter objects)."""
    from refcond.errors import CheckpointError

    live = dict(rp.named_parameters())
    own = rp.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"the training state does not fit this composition: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    with torch.no_grad():
        for key, value in state.items():
            target = live.get(key, own[key])
            target.copy_(value.to(device=target.device, dtype=target.dtype))
