"""Reference encoders for refcond, registered through the ``refcond`` entry-point group."""

from __future__ import annotations

from refcond import hookimpl
from refcond.registry import Register
from refcond_encoders.clip import ClipEncoder, ClipEncoderConfig

__all__ = ["ClipEncoder", "ClipEncoderConfig"]


@hookimpl
def refcond_register_encoders(register: Register) -> None:
    register("clip", ClipEncoder.from_config, config=ClipEncoderConfig, description=ClipEncoder.__doc__.splitlines()[0])
