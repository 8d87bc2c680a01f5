"""The detector's error types, for people: each message says which file or setting and why.

This module imports nothing but the standard library, so a command line can name these
classes (to print them as one ``Error:`` line) without loading torch.
"""

from __future__ import annotations


class DetectorConfigError(ValueError):
    """A detector preset or setting that does not exist, or a value it cannot take."""


class UnknownPresetError(DetectorConfigError, KeyError):
    """No preset of that name. Also a KeyError: the preset registry is a mapping."""

    __str__ = ValueError.__str__  # KeyError's str() would quote the message


class UnknownOptionError(DetectorConfigError, TypeError):
    """A setting name that no config field has. Also a TypeError, as for an unknown keyword."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not match the model; the message says why."""

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class ShippedWeightsError(CheckpointError):
    """A weights file shipped with vlp is missing or does not have its recorded sha256."""


class MissingWeightsError(ValueError):
    """No checkpoint was given and random weights were not allowed."""


class AnnotationError(ValueError):
    """A Visual-Genome-format annotation folder that cannot be used (the message names the file)."""


class TrainingStateError(ValueError):
    """A detector training run that cannot be resumed (no saved state, or other settings)."""


#: What a command line shows as one ``Error:`` line (exit status 1).
USER_ERRORS = (DetectorConfigError, CheckpointError, MissingWeightsError, AnnotationError, TrainingStateError)
