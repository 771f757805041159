"""Procedural and bundled data sets: ``digits`` (class-conditional, CI smoke tests) and ``shapes``
(captioned scenes for the text-to-image model)."""

from .digits import HELD_OUT_FRACTION, IMAGE_SIZE, NUM_CLASSES, SPLIT_SEED, digits, to_unit

__all__ = ["HELD_OUT_FRACTION", "IMAGE_SIZE", "NUM_CLASSES", "SPLIT_SEED", "digits", "to_unit"]
