"""The aggregation probe (``refcond probe``): can an aggregator find what a group of references shares?

A synthetic task that only aggregation letting the references interact solves, offline on a CPU in
minutes. Groups of 3 to 5 rendered references (:mod:`refcond.probe.render`) share one *consistent
element*; in the ``binding`` variant its colour and its shape are each in every reference, but
paired only in that element, so counting attributes across references leaves four candidates. A
frozen per-image encoder pretrained on attribute-only labels (:mod:`refcond.probe.encoder`) turns
each reference into tokens; each aggregator named — any registered one, third-party ones included,
built through the registry — and the same readout (:mod:`refcond.probe.readout`) train to name the
element (:mod:`refcond.probe.trial`); accuracy on fixed evaluation groups comes with bootstrap
intervals and paired differences (:mod:`refcond.probe.stats`), a table and a plot
(:mod:`refcond.probe.report`). :func:`run_probe` runs it all, resumably (:mod:`refcond.probe.runner`).
"""

from __future__ import annotations

from refcond.probe.encoder import EncoderRecipe, ProbeEncoder
from refcond.probe.runner import AGGREGATOR_DEFAULTS, Method, ProbeConfig, ProbeResult, run_probe
from refcond.probe.trial import SINGLE

__all__ = ["AGGREGATOR_DEFAULTS", "SINGLE", "EncoderRecipe", "Method", "ProbeConfig", "ProbeEncoder", "ProbeResult", "run_probe"]
