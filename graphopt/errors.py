"""Error types. Every error a user can cause is a GraphoptError with a one-line message.

The CLI maps ``UsageError``/``InputError`` to exit 2 and ``VerificationError`` to exit 1.
"""
from __future__ import annotations


class GraphoptError(Exception):
    """Base class: the message is a single line meant for the user."""

    exit_code = 2


class InputError(GraphoptError):
    """The model, data or path the user gave cannot be used."""


class PipelineError(GraphoptError):
    """A pipeline string, pass name or pass option is wrong."""


class VerificationError(GraphoptError):
    """The optimized model does not match the original (or misses the budget)."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report
