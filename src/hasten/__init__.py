"""hasten: make generative models fast, with composable and tested acceleration methods."""

from .api import accelerate, calibrate
from .errors import HastenError
from .methods.block_cache import BlockCache
from .methods.guidance import AdaptiveGuidance, LinearAG
from .pipeline import HastenPipeline, PipelineOutput, load_pipeline

__all__ = ["AdaptiveGuidance", "BlockCache", "HastenError", "HastenPipeline", "LinearAG", "PipelineOutput",
           "accelerate", "calibrate", "load_pipeline"]
__version__ = "0.1.0"
