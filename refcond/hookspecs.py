"""The hook specifications of refcond: one registration hook per kind of extension.

Each hook receives a ``register`` callback and returns nothing. A plugin implements any subset of
them with :data:`refcond.hookimpl`; refcond calls every implementation once when it builds its
registry, recording which plugin (and distribution version) registered each name.
"""

from __future__ import annotations

import pluggy

from refcond.registry import Register

#: Marks refcond's hook specifications (used by this module only).
hookspec = pluggy.HookspecMarker("refcond")
#: Marks a plugin's implementation of a refcond hook: decorate each ``refcond_register_*`` function with it.
hookimpl = pluggy.HookimplMarker("refcond")


@hookspec
def refcond_register_backbones(register: Register) -> None:
    """Register diffusion backbones.

    Call ``register(name, factory, config=ConfigModel, description=...)`` once per backbone.
    ``factory(config, context)`` returns an object satisfying :class:`refcond.Backbone`: it wraps a
    diffusers pipeline and describes its UNet's attention layout.

    :param register: the registration callback.
    """


@hookspec
def refcond_register_encoders(register: Register) -> None:
    """Register reference encoders.

    Call ``register(name, factory, config=ConfigModel, description=...)`` once per encoder.
    ``factory(config, context)`` returns an :class:`refcond.Encoder`: it turns a batch of reference
    groups into a :class:`refcond.ReferenceEncoding`.

    :param register: the registration callback.
    """


@hookspec
def refcond_register_aggregators(register: Register) -> None:
    """Register aggregators.

    Call ``register(name, factory, config=ConfigModel, description=...)`` once per aggregator.
    ``factory(config, context)`` returns an :class:`refcond.Aggregator`: it turns a
    :class:`refcond.ReferenceEncoding` into a :class:`refcond.Condition`.

    :param register: the registration callback.
    """


@hookspec
def refcond_register_injectors(register: Register) -> None:
    """Register injectors.

    Call ``register(name, factory, config=ConfigModel, description=...)`` once per injector.
    ``factory(config, context)`` returns an :class:`refcond.Injector`: it attaches to a UNet,
    feeds a :class:`refcond.Condition` into it, and detaches restoring the UNet exactly.

    :param register: the registration callback.
    """


@hookspec
def refcond_register_compositions(register: Register) -> None:
    """Register named compositions (recipes such as ``ip-adapter``).

    Call ``register(name, composition, description=...)`` where ``composition`` is a
    :class:`refcond.Composition` or a dict that validates as one. The components it names may come
    from other plugins; they are resolved when the composition is built, not when it is registered.

    :param register: the registration callback.
    """


@hookspec
def refcond_register_checkpoint_formats(register: Register) -> None:
    """Register importers of checkpoint formats.

    Call ``register(name, importer, description=...)`` where ``importer`` satisfies
    :class:`refcond.CheckpointFormat`: ``detect(state_dict, metadata)`` says whether a file is in
    this format, and ``convert(state_dict, metadata, backbone)`` returns an
    :class:`refcond.ImportedCheckpoint` (composition settings the file implies, and the weights
    namespaced by role).

    :param register: the registration callback.
    """


@hookspec
def refcond_register_metrics(register: Register) -> None:
    """Register evaluation metrics.

    Call ``register(name, factory, config=ConfigModel, description=...)`` once per metric.
    ``factory(config, context)`` returns a :class:`refcond.Metric`: a callable
    ``metric(images, references, prompts) -> dict[str, list[float]]`` that scores a batch of
    generated images, one value per image. The three arguments are parallel lists: ``images[i]``
    (a PIL image) was generated from the reference group ``references[i]`` (a list of PIL images)
    and the prompt ``prompts[i]``. Each key of the result is a measure the metric reports, and its
    list holds ``len(images)`` values in the order of ``images``. Load models in the factory (once,
    on the context's device), not in the call.

    :param register: the registration callback.
    """


@hookspec
def refcond_register_recipes(register: Register) -> None:
    """Register training recipes, which ``refcond train --recipe NAME`` starts from.

    Call ``register(name, recipe, description=...)`` where ``recipe`` is a partial training config (a
    dict of :class:`refcond.training.TrainConfig` fields: the composition, the stages with what each
    trains and how, the formats to export): the user adds the data and the model, and may override
    any field. EasyRef's three stages and IP-Adapter's recipe are registered so.

    :param register: the registration callback.
    """
