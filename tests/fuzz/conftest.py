"""Fuzz suites: hypothesis over refcond's input surfaces (see fuzzing.py for the profiles and what counts as a finding)."""

from __future__ import annotations

import fuzzing  # noqa: F401 - registers and loads the hypothesis profile


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 - pytest's hook signature
    lines = list(fuzzing.TALLY.lines())
    if not lines:
        return
    terminalreporter.section(f"refcond fuzz tally (profile {fuzzing.PROFILE})")
    for line in lines:
        terminalreporter.write_line(line)
    report = fuzzing.write_report()
    if report is not None:
        terminalreporter.write_line(f"written to {report}")
