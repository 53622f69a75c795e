"""refcond: condition text-to-image diffusion models on a group of reference images.

>>> import refcond
>>> rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint="ip-adapter_sd15.safetensors")  # doctest: +SKIP
>>> image = rp("a dog", references=["a.png", "b.png"]).images[0]  # doctest: +SKIP
"""

from refcond.config import ComponentConfig, ComponentSpec, Composition, EmptyConfig
from refcond.contracts import (
    MIXED_SOURCE,
    Aggregator,
    Attachment,
    Backbone,
    BuildContext,
    CheckpointFormat,
    Condition,
    Encoder,
    ImportedCheckpoint,
    Injector,
    ReferenceAdapter,
    ReferenceEncoding,
)
from refcond.errors import (
    CheckpointError,
    ConfigError,
    DuplicateComponentError,
    IncompatibleBackboneError,
    OutputError,
    PluginError,
    RefcondError,
    ReferenceImageError,
    UnknownComponentError,
)
from refcond.hookspecs import hookimpl
from refcond.images import load_references
from refcond.pipeline import RefcondPipeline, from_pipe, load
from refcond.plugins import Plugins, from_modules, get_plugins, load_plugins

__version__ = "0.1.0"

__all__ = [
    "MIXED_SOURCE",
    "Aggregator",
    "Attachment",
    "Backbone",
    "BuildContext",
    "CheckpointError",
    "CheckpointFormat",
    "ComponentConfig",
    "ComponentSpec",
    "Composition",
    "Condition",
    "ConfigError",
    "DuplicateComponentError",
    "EmptyConfig",
    "Encoder",
    "ImportedCheckpoint",
    "IncompatibleBackboneError",
    "Injector",
    "OutputError",
    "PluginError",
    "Plugins",
    "RefcondError",
    "RefcondPipeline",
    "ReferenceAdapter",
    "ReferenceEncoding",
    "ReferenceImageError",
    "UnknownComponentError",
    "from_modules",
    "from_pipe",
    "get_plugins",
    "hookimpl",
    "load",
    "load_plugins",
    "load_references",
]
