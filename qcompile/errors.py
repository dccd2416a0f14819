"""Errors meant for people: each says what was wrong, what was expected and what to do next."""
from __future__ import annotations

__all__ = ["AssetError", "CalibrationError", "ExportError", "ModelError", "QcompileError", "shown"]


class QcompileError(Exception):
    """Base of every error qcompile raises on purpose; the CLI prints it as one line."""


class AssetError(QcompileError):
    """A registry asset is missing, corrupted or could not be fetched."""


class ModelError(QcompileError):
    """A model cannot be loaded or is not supported."""


class CalibrationError(QcompileError):
    """Calibration data is missing, too short or unusable."""


class ExportError(QcompileError):
    """A quantized model cannot be exported as asked."""


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages that echo user input (it can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
