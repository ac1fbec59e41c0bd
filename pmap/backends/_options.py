"""Checking backend options, which may arrive as text from the command line (`-o key=value`)."""
from __future__ import annotations


def positive_seconds(backend: str, name: str, value) -> float:
    """`value` as a positive number of seconds; ValueError naming the option otherwise."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{backend} option {name} must be a positive number of seconds, got {value!r}")
    return seconds
