"""hasten: make generative models fast, with composable and tested acceleration methods."""

from .api import accelerate, calibrate
from .errors import HastenError
from .hooks import Handle
from .methods.block_cache import BlockCache
from .methods.flexidit import FlexiDiT, flexify
from .methods.guidance import AdaptiveGuidance, GuidanceInterval, LinearAG
from .pipeline import HastenPipeline, PipelineOutput, load_pipeline
from .pipelines.shapes import ShapesPipeline, ShapesTransformer2DModel

__all__ = ["AdaptiveGuidance", "BlockCache", "FlexiDiT", "GuidanceInterval", "Handle", "HastenError", "HastenPipeline",
           "LinearAG", "PipelineOutput", "ShapesPipeline", "ShapesTransformer2DModel",
           "accelerate", "calibrate", "flexify", "load_pipeline"]
__version__ = "0.1.0"
