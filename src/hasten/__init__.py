"""hasten: make generative models fast, with composable and tested acceleration methods."""

from .errors import HastenError
from .pipeline import HastenPipeline, PipelineOutput, load_pipeline

__all__ = ["HastenError", "HastenPipeline", "PipelineOutput", "load_pipeline"]
__version__ = "0.1.0"
