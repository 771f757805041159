"""A compact decoding forward for small Llama-family drafts: the same weights and math, less overhead.

A draft model is called once per drafted token, on one token, so its wall time is mostly per-call
overhead, not arithmetic: the shipped 0.5M-parameter draft spends about 0.8 ms per token in
transformers' general-purpose forward (cache objects, mask construction, output dataclasses, hooks)
for well under 0.1 ms of matrix work. ``CompactLlama`` runs the same computation as
``LlamaForCausalLM`` with nothing else: fused q/k/v and gate/up projections, a preallocated KV cache
(rolled back by moving a length counter), rotary tables precomputed from the model's own ``inv_freq``.

Only the draft runs here. Verification stays with the target's own transformers forward, so the
output of speculative decoding does not depend on this module: greedy output equals target-only greedy
and speculative sampling keeps the target's distribution whatever the draft computes (the draft's
probabilities used for acceptance are the ones its tokens were sampled from). Its logits match the
transformers forward to float rounding (tested); a near-tie may rarely pick another draft token,
which changes only how many tokens are accepted.

Supported: ``LlamaForCausalLM`` and architectures with its exact layer math (Mistral, Qwen2 without
sliding windows, ...) in eval mode on CPU or CUDA, static rotary scaling (default, linear, llama3,
yarn). Anything else (``supports`` returns the reason) runs through transformers' forward as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CompactLlama", "supports"]

_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


def _rope_type(cfg) -> str:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"


def supports(model: torch.nn.Module) -> str | None:
    """None when ``model`` can run compactly, else why not (one line)."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "not a Llama-style causal LM (model.model.layers / rotary_emb)"
    if type(model).__name__ not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        return f"{type(model).__name__} is not one of the Llama-math architectures"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if _rope_type(cfg) not in _STATIC_ROPE:
        return f"rotary scaling {_rope_type(cfg)!r} changes with length"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "MLP other than SiLU-gated without bias"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    return None


class CompactLlama:
    """Decoding-only forward of a Llama-family causal LM with a preallocated KV cache.

    ``logits = compact(ids)`` appends ``ids`` (1, n) after the cached positions and returns the logits
    of the last position (V,); ``compact.rollback(length)`` forgets every position from ``length`` on.
    """

    def __init__(self, model: torch.nn.Module, max_length: int | None = None):
        why = supports(model)
        if why is not None:
            raise ValueError(f"CompactLlama cannot run this model: {why}")
        cfg, inner = model.config, model.model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        # not capped at max_position_embeddings: the rotary tables are static, so positions past it are exactly
        # what transformers' forward computes there (it does not stop at the configured length either)
        self.max_length = int(max_length or cfg.max_position_embeddings)
        self.embed = inner.embed_tokens.weight.detach()
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv_b = None
            if a.q_proj.bias is not None:
                qkv_b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
            self.layers.append({
                "ln1": layer.input_layernorm.weight.detach(), "ln2": layer.post_attention_layernorm.weight.detach(),
                "eps1": layer.input_layernorm.variance_epsilon, "eps2": layer.post_attention_layernorm.variance_epsilon,
                "qkv": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(), "qkv_b": qkv_b,
                "o": a.o_proj.weight.detach(), "o_b": None if a.o_proj.bias is None else a.o_proj.bias.detach(),
                "gate_up": torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                "down": m.down_proj.weight.detach(),
            })
        self.norm, self.norm_eps = inner.norm.weight.detach(), inner.norm.variance_epsilon
        self.lm_head = model.get_output_embeddings().weight.detach()
        rot = inner.rotary_emb
        pos = torch.arange(self.max_length, device=self.device, dtype=torch.float32)
        freqs = torch.outer(pos, rot.inv_freq.float().to(self.device))
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = float(getattr(rot, "attention_scaling", 1.0))
        self.cos = (emb.cos() * scale).to(self.dtype)
        self.sin = (emb.sin() * scale).to(self.dtype)
        shape = (len(self.layers), 1, self.kv_heads, self.max_length, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.length = 0
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim

    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        n, start = ids.shape[1], self.length
        end = start + n
        if end > self.max_length:
            raise ValueError(f"CompactLlama holds at most {self.max_length} positions, asked for {end}")
        x = self.embed[ids[0].to(self.device)][None]  # (1, n, hidden)
        cos, sin = self.cos[start:end], self.sin[start:end]
        mask = None
        if n > 1:  # new tokens see every cached position and the new ones up to themselves
            mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(start)
        for i, L in enumerate(self.layers):
            h = self._rms(x, L["ln1"], L["eps1"])
            qkv = F.linear(h, L["qkv"], L["qkv_b"])
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(1, n, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.k_cache[i, :, :, start:end] = k
            self.v_cache[i, :, :, start:end] = v
            att = F.scaled_dot_product_attention(
                q, self.k_cache[i, :, :, :end], self.v_cache[i, :, :, :end], attn_mask=mask,
                enable_gqa=self.kv_heads != self.heads)
            x = x + F.linear(att.transpose(1, 2).reshape(1, n, self.q_size), L["o"], L["o_b"])
            h = self._rms(x, L["ln2"], L["eps2"])
            gate, up = F.linear(h, L["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, L["down"])
        self.length = end
        return F.linear(self._rms(x[:, -1], self.norm, self.norm_eps), self.lm_head)[0]

    def rollback(self, length: int) -> None:
        """Forget positions ``length`` and later (their cache entries are overwritten next time)."""
        self.length = min(self.length, max(0, int(length)))
