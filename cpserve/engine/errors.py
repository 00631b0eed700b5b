"""Errors a front end gets from the engine core, in process or across the process boundary."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine core has stopped (it raised, its process died, or it was shut down)."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""
