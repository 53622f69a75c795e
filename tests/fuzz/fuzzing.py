"""The fuzz harness: hypothesis profiles, a guard that classifies what one generated input did, and the tally.

Every surface (references, configs, checkpoints, call arguments, ...) runs its generated inputs
through :func:`guard`. An input may be accepted (and then its output must be finite and the
pipeline left as it was) or refused with a :class:`refcond.RefcondError`; anything else is a
finding, and the test fails on it with the shrunk input:

- ``raw``: an exception that is not a ``RefcondError`` escaped (a bare torch / PIL / pathlib error);
- ``hang``: the input ran past the per-example time limit;
- ``memory``: it ran out of the memory the fuzz run is capped at (``MemoryError`` or an allocator error);
- ``bad_output``: it was accepted but produced NaN or infinite values;
- ``state_modified``: after it (accepted or refused), the UNet, its processors or weights changed.

Profiles (``REFCOND_FUZZ_PROFILE``): ``ci`` (default, a few examples per surface, part of the normal
test run) and ``long`` (200 examples per surface, the release check: ``REFCOND_FUZZ_PROFILE=long
python -m pytest tests/fuzz``). ``REFCOND_FUZZ_REPORT=path.json`` writes the tally.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, settings

import refcond

PROFILE = os.environ.get("REFCOND_FUZZ_PROFILE", "ci")
_COMMON = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck), "print_blob": True}
settings.register_profile("ci", max_examples=int(os.environ.get("REFCOND_FUZZ_EXAMPLES", "12")), derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("REFCOND_FUZZ_EXAMPLES", "200")), **_COMMON)
settings.load_profile(PROFILE)

#: Seconds one generated input may take (a tiny-model generation takes well under one).
TIME_LIMIT = float(os.environ.get("REFCOND_FUZZ_TIME_LIMIT", "20"))
#: Address space the fuzz run may add to what the process already holds: an input that asks for
#: more (a config or file claiming a huge size) must be refused before it allocates.
MEMORY_HEADROOM = int(float(os.environ.get("REFCOND_FUZZ_MEMORY_GB", "6")) * 2**30)

OUTCOMES = ("accepted", "refused", "raw", "hang", "memory", "bad_output", "state_modified")
FINDINGS = ("raw", "hang", "memory", "bad_output", "state_modified")


class Hang(BaseException):
    """Raised by the alarm when an input runs past :data:`TIME_LIMIT` (a BaseException: code under test cannot swallow it)."""


@dataclass
class Tally:
    """Outcomes per surface, and the first few findings of each kind for the report."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def record(self, surface: str, outcome: str, detail: str = "") -> None:
        self.counts.setdefault(surface, Counter())[outcome] += 1
        if outcome in FINDINGS:
            found = self.examples.setdefault(f"{surface}/{outcome}", [])
            if len(found) < 5 and detail not in found:
                found.append(detail)

    def as_json(self) -> dict[str, Any]:
        return {
            "profile": PROFILE,
            "surfaces": {s: {o: c.get(o, 0) for o in OUTCOMES} | {"examples": sum(c.values())} for s, c in sorted(self.counts.items())},
            "findings": self.examples,
        }

    def lines(self) -> Iterator[str]:
        for surface, counts in sorted(self.counts.items()):
            total = sum(counts.values())
            parts = ", ".join(f"{o} {counts.get(o, 0)}" for o in OUTCOMES)
            yield f"{surface}: {total} examples: {parts}"


TALLY = Tally()


def write_report() -> Path | None:
    path = os.environ.get("REFCOND_FUZZ_REPORT")
    if not path:
        return None
    Path(path).write_text(json.dumps(TALLY.as_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(path)


@contextmanager
def time_limit(seconds: float = TIME_LIMIT) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds``.

    SIGALRM interrupts Python code and a blocking open or read made from Python; it cannot interrupt
    native code that holds the GIL (safetensors opening a FIFO, for one), which is why refcond refuses
    non-regular files before opening them and the tests of that unblock a FIFO from another process.
    """

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def memory_cap(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Cap the process's address space at what it holds now plus ``headroom`` (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = _address_space()
    cap = in_use + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _is_memory_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))


def non_finite(value: Any) -> bool:
    """Whether ``value`` (a tensor, array, PIL image, pipeline output, number, or a container of them) holds NaN or inf."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return not math.isfinite(value)
    if hasattr(value, "images"):
        return non_finite(value.images)
    if isinstance(value, (list, tuple)):
        return any(non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return value.dtype.kind == "f" and not bool(np.isfinite(value).all())
    except ImportError:  # pragma: no cover
        pass
    return False


def unet_state(unet: torch.nn.Module) -> dict[str, Any]:
    """What must survive any input, accepted or refused: the processors (by identity) and the weights."""
    return {
        "processors": {k: id(v) for k, v in unet.attn_processors.items()},
        "weights": {k: v.detach().clone() for k, v in unet.state_dict().items()},
        "modules": [type(m).__name__ for m in unet.modules()],
    }


def same_state(before: dict[str, Any], after: dict[str, Any]) -> bool:
    return (
        before["processors"] == after["processors"]
        and before["modules"] == after["modules"]
        and before["weights"].keys() == after["weights"].keys()
        and all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])
    )


def guard(surface: str, action: Callable[[], Any], *, state: Callable[[], Any] | None = None, same: Callable[[Any, Any], bool] | None = None) -> Any:
    """Run one generated input; record and judge what it did.

    :param action: the input applied (build, load, call, ...); its return value is checked for
        non-finite values when it succeeds.
    :param state: a snapshot of what the input must leave unchanged (e.g. ``lambda: unet_state(unet)``),
        taken before and after; ``same`` compares two snapshots (default ``==``).
    :returns: the action's result, or ``None`` when it was refused.
    :raises AssertionError: on a finding, naming it (hypothesis then shrinks the input).
    """
    before = state() if state is not None else None
    outcome, detail, result = "accepted", "", None
    try:
        with memory_cap(), time_limit():
            result = action()
    except refcond.RefcondError as exc:
        outcome, detail = "refused", f"{type(exc).__name__}: {exc}"
    except Hang as exc:
        outcome, detail = "hang", str(exc)
    except Exception as exc:  # noqa: BLE001 - what the fuzzing is for
        outcome = "memory" if _is_memory_error(exc) else "raw"
        detail = f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:300]}"
    if outcome == "accepted" and non_finite(result):
        outcome, detail = "bad_output", "non-finite values in the output"
    if state is not None and outcome in ("accepted", "refused"):
        if not (same or (lambda a, b: a == b))(before, state()):
            outcome, detail = "state_modified", f"after an input that was {outcome}: {detail or 'no error'}"
    TALLY.record(surface, outcome, detail)
    if outcome in FINDINGS:
        raise AssertionError(f"{surface}: {outcome}: {detail}")
    return result
