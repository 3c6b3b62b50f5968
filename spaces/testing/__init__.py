"""Reusable test suites: a compression method passes ``MethodConformance`` to be part of slimsearch.

Needs pytest (the ``dev`` extra). See ``conformance.py`` for how to run it on a new method.
"""

from slimsearch.spaces.testing.conformance import (
    MethodCase,
    MethodConformance,
    cases_for,
    combined_cases,
    registry_cases,
)

__all__ = ["MethodCase", "MethodConformance", "cases_for", "combined_cases", "registry_cases"]
