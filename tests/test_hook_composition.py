"""hasten next to other hooks on the same model: diffusers' caches (enable_cache), group offloading and
accelerate's module hooks (CPU offload), installed and removed in every order. Whatever is still installed
must keep working exactly as it does alone, and removing everything gives the original model bitwise."""

from __future__ import annotations

import itertools

import pytest
import torch
from accelerate.hooks import ModelHook as AccelerateHook
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from diffusers import WanTransformer3DModel
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_group_offloading

import hasten

STEPS = 6
SCHEDULE = [[True, False, False, True, False, False]] * 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32).eval()


def sample(m) -> torch.Tensor:
    m._reset_stateful_cache()  # a fresh run for diffusers' caches, as its pipelines do
    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        for k in range(STEPS):
            t = torch.full((2,), 1000.0 * (1 - k / STEPS))
            with m.cache_context("cond"):  # what diffusers pipelines do; diffusers' caches need it
                out = m(x, timestep=t, encoder_hidden_states=enc, return_dict=False)[0]
            x = x - out / STEPS
    return x


class Other:
    """One of the other mechanisms: install(), remove(), and whether it is installed."""

    def __init__(self, kind: str, m):
        self.kind, self.m = kind, m
        self.calls = 0

    def install(self) -> None:
        if self.kind == "enable_cache":
            self.m.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        elif self.kind == "group_offloading":
            apply_group_offloading(self.m, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1)
        else:  # accelerate: a counting hook through add_hook_to_module (as cpu_offload installs its own)
            other = self

            class Counting(AccelerateHook):
                def pre_forward(self, module, *args, **kwargs):
                    other.calls += 1
                    return args, kwargs

            add_hook_to_module(self.m, Counting())

    def remove(self) -> None:
        if self.kind == "enable_cache":
            self.m.disable_cache()
        elif self.kind == "group_offloading":
            HookRegistry.check_if_exists_or_initialize(self.m).remove_hook("group_offloading", recurse=True)
        else:
            remove_hook_from_module(self.m)


@pytest.mark.parametrize("kind", ["enable_cache", "group_offloading", "accelerate"])
@pytest.mark.parametrize("order", list(itertools.product(["hasten_first", "other_first"],
                                                         ["remove_hasten_first", "remove_other_first"])))
def test_install_and_remove_in_any_order(model, kind, order):
    ref = sample(model)
    with hasten.accelerate(model, hasten.BlockCache(schedule=SCHEDULE)) as h:
        alone_hasten = sample(model)
        assert h.report()["methods"]["block-cache"]["reused"] == [4, 4, 4]
    other = Other(kind, model)
    other.install()
    alone_other = sample(model)
    other.remove()
    assert torch.equal(sample(model), ref)
    if kind == "enable_cache":
        assert not torch.equal(alone_other, ref)  # the cache really acts, so its survival is visible

    install_first, remove_first = order
    if install_first == "hasten_first":
        h = hasten.accelerate(model, hasten.BlockCache(schedule=SCHEDULE))
        other.install()
    else:
        other.install()
        h = hasten.accelerate(model, hasten.BlockCache(schedule=SCHEDULE))
    sample(model)
    reused = h.report()["methods"]["block-cache"]["reused"]
    # hasten acts with the other installed (diffusers' first-block cache may skip the later blocks outright)
    assert reused[0] == 4 and (kind == "enable_cache" or reused == [4, 4, 4])

    if remove_first == "remove_hasten_first":
        h.disable()
        calls = other.calls
        assert torch.equal(sample(model), alone_other)  # the other still works exactly as alone
        if kind == "accelerate":
            assert other.calls == calls + STEPS
        other.remove()
    else:
        other.remove()
        before = h.report()["methods"]["block-cache"]["reused"]
        assert torch.equal(sample(model), alone_hasten)  # hasten still works exactly as alone
        assert h.report()["methods"]["block-cache"]["reused"] == [b + 4 for b in before]
        h.disable()
    assert torch.equal(sample(model), ref)


def test_compile_then_a_diffusers_hook_removed_first_still_restores_the_model():
    """h.compile() compiles below hasten's block hooks; when enable_cache (installed first) is removed before
    h.disable(), diffusers relinks hasten's hook, and disable() must not put the removed hook's chain back."""
    from diffusers import WanTransformer3DModel
    from diffusers.hooks import FirstBlockCacheConfig

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, cross_attn_norm=True,
                              qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()

    def sample():
        g = torch.Generator().manual_seed(0)
        x, enc = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
        with torch.no_grad():
            for k in range(4):
                with m.cache_context("cond"):
                    x = x - m(x, timestep=torch.full((2,), 1000.0 * (1 - k / 4)), encoder_hidden_states=enc,
                              return_dict=False)[0] / 4
        return x

    ref = sample()
    m.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    h = hasten.accelerate(m, hasten.BlockCache(schedule=[[True, False, True, False]] * 3))
    h.compile(backend="eager")
    sample()
    m.disable_cache()
    h.disable()
    assert torch.equal(sample(), ref)  # raised "No cache context is set" from the removed hook before
