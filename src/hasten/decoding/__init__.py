"""LLM decoding acceleration: speculative decoding and Judge Decoding for transformers causal LMs."""

from .hf import custom_generate
from .judge import JudgeHead, prob_to_logit
from .speculative import DecodingStats, DraftStop, SpeculativeOutput, autoregressive_generate, generate, verify

__all__ = ["custom_generate", "DecodingStats", "DraftStop", "JudgeHead", "SpeculativeOutput", "autoregressive_generate",
           "generate", "prob_to_logit", "verify"]
