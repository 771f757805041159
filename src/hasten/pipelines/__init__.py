"""Pipelines of the embedded models. ``shapes`` is a diffusers ``DiffusionPipeline``; the digits
pipeline lives in ``hasten.pipeline``."""
