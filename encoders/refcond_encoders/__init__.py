"""Reference encoders for refcond, registered through the ``refcond`` entry-point group."""

from __future__ import annotations

from refcond import Register, hookimpl
from refcond_encoders.clip import ClipEncoder, ClipEncoderConfig
from refcond_encoders.mllm import MllmEncoder, MllmEncoderConfig, run_decoder

__all__ = ["ClipEncoder", "ClipEncoderConfig", "MllmEncoder", "MllmEncoderConfig", "run_decoder"]


@hookimpl
def refcond_register_encoders(register: Register) -> None:
    register("clip", ClipEncoder.from_config, config=ClipEncoderConfig, description=ClipEncoder.__doc__.splitlines()[0])
    register("mllm", MllmEncoder.from_config, config=MllmEncoderConfig, description=MllmEncoder.__doc__.splitlines()[0])
