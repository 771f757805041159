"""Block discovery and Block Caching on each diffusers family (tiny random-weight configs, no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hasten
from hasten.adapters import BlockSpec, discover_blocks
from hasten.testing_pipelines import count_block_calls


def _dit():
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return m, lambda g, b: (torch.randn(b, 1, 8, 8, generator=g),
                            {"class_labels": torch.arange(b) % 10})


def _pixart():
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                 caption_channels=16, norm_type="ada_norm_single",
                                 use_additional_conditions=False, norm_num_groups=1)
    return m, lambda g, b: (torch.randn(b, 4, 8, 8, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                             "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}})


def _sd3():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    return m, lambda g, b: (torch.randn(b, 4, 8, 8, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                             "pooled_projections": torch.randn(b, 16, generator=g)})


def _flux():
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                               pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    return m, lambda g, b: (torch.randn(b, 16, 8, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                             "pooled_projections": torch.randn(b, 16, generator=g),
                             "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3)})


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                    time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                    sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                    max_text_seq_length=5)
    return m, lambda g, b: (torch.randn(b, 3, 4, 8, 8, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g)})


def _wan():
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                              cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return m, lambda g, b: (torch.randn(b, 4, 2, 8, 8, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g)})


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                       patch_size_t=1, guidance_embeds=False, text_embed_dim=16,
                                       pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    return m, lambda g, b: (torch.randn(b, 4, 2, 4, 4, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                             "encoder_attention_mask": torch.ones(b, 5),
                             "pooled_projections": torch.randn(b, 8, generator=g)})


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                   attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16)
    return m, lambda g, b: (torch.randn(b, 2 * 4 * 4, 8, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                             "encoder_attention_mask": torch.ones(b, 5), "num_frames": 2, "height": 4, "width": 4})


def _mochi():
    from diffusers import MochiTransformer3DModel

    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                max_sequence_length=5)
    return m, lambda g, b: (torch.randn(b, 4, 2, 4, 4, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                             "encoder_attention_mask": torch.ones(b, 5)})


def _sana():
    from diffusers import SanaTransformer2DModel

    m = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                               num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                               caption_channels=16, sample_size=8, patch_size=1)
    return m, lambda g, b: (torch.randn(b, 4, 8, 8, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g)})


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    return m, lambda g, b: (torch.randn(b, 16, 16, generator=g),
                            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                             "encoder_hidden_states_mask": torch.ones(b, 5), "img_shapes": [(1, 4, 4)] * b})


FAMILIES = {"dit": (_dit, 2), "pixart": (_pixart, 2), "sd3": (_sd3, 2), "flux": (_flux, 3),
            "cogvideox": (_cogvideox, 2), "wan": (_wan, 2), "hunyuanvideo": (_hunyuan, 2), "ltx": (_ltx, 2),
            "mochi": (_mochi, 2), "sana": (_sana, 2), "qwenimage": (_qwen, 2)}
UNIT_TIME = {"flux", "qwenimage"}  # pipelines of these families pass t / 1000
CALLS = 6


def _sampler(model, inputs, flux: bool):
    """A small Euler loop over diffusers-style falling timesteps; returns every call's output."""

    def run(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x, kw = inputs(g, 2)
        outs = []
        with torch.no_grad():
            for k in range(CALLS):
                t = 1000.0 * (1 - k / CALLS)
                ts = torch.full((x.shape[0],), t / 1000 if flux else t)
                out = model(x, timestep=ts, **kw).sample
                outs.append(out)
                x = x - (1.0 / CALLS) * out
        return outs

    return run


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exact_below_smallest_change_and_skips_above(family):
    torch.manual_seed(0)
    build, nblocks = FAMILIES[family]
    model, inputs = build()
    model.eval()
    blocks = discover_blocks(model)
    assert len(blocks) == nblocks
    run = _sampler(model, inputs, flux=family in UNIT_TIME)
    ref = run(0)
    plan = hasten.calibrate(model, hasten.BlockCache(delta=0.5), runner=run, seeds=(1, 2), steps=CALLS)
    changes = [v for c in plan["l1rel"] for v in c if v is not None]
    assert len(changes) == nblocks * (CALLS - 1) and min(changes) > 0
    # delta below the smallest change: every block every call, bitwise equal
    with hasten.accelerate(model, hasten.BlockCache(plan=plan, delta=min(changes) / 2)) as h:
        out = run(0)
        rep = h.report()["methods"]["block-cache"]
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    assert rep["reused"] == [0] * nblocks and rep["computed"] == [CALLS] * nblocks
    # a large delta: blocks are reused and their forward is not called
    with count_block_calls(model) as counts, hasten.accelerate(model, hasten.BlockCache(plan=plan, delta=10.0)) as h:
        out = run(0)
        rep = h.report()["methods"]["block-cache"]
    assert rep["computed"] == [1] * nblocks and rep["reused"] == [CALLS - 1] * nblocks
    assert counts == [1] * nblocks
    assert all(torch.isfinite(o).all() for o in out)
    assert not torch.equal(out[-1], ref[-1])
    # after leaving the with block: bitwise the original again
    assert all(torch.equal(a, b) for a, b in zip(run(0), ref, strict=True))


def test_bare_transformer_runs_reset_when_timestep_jumps_back():
    model, inputs = _dit()
    run = _sampler(model, inputs, flux=False)
    with hasten.accelerate(model, hasten.BlockCache(schedule=[[True] + [False] * (CALLS - 1)] * 2)) as h:
        run(0)
        run(0)
        rep = h.report()
    assert rep["runs"] == 2 and [e["call"] for e in rep["log"]] == list(range(CALLS)) * 2
    assert rep["methods"]["block-cache"]["computed"] == [2, 2]


def test_per_token_timesteps_are_read_per_row():
    """Wan 2.2-style (B, L) timesteps: one trajectory per run, each row's level is its largest value."""
    model, inputs = _wan()
    g = torch.Generator().manual_seed(0)
    x, kw = inputs(g, 2)
    tokens = 2 * 4 * 4  # frames x (8 / 2) x (8 / 2)
    with hasten.accelerate(model, hasten.BlockCache(schedule=[[True, False, False, True]] * 2)) as h, \
            torch.no_grad():
        for _ in range(2):
            for t in (900.0, 600.0, 300.0, 100.0):
                ts = torch.full((2, tokens), t)
                ts[:, :16] = 0.0  # a clean first frame, as in image-to-video
                model(x, timestep=ts, **kw)
        rep = h.report()
    assert rep["runs"] == 2 and [e["t"] for e in rep["log"][:4]] == [900.0, 600.0, 300.0, 100.0]
    assert rep["methods"]["block-cache"]["reused"] == [4, 4]
    assert torch.equal(hasten.hooks.row_timesteps(ts, 2), torch.tensor([100.0, 100.0]))


def test_peft_wrapped_model_keeps_its_blocks():
    peft = pytest.importorskip("peft")
    model, inputs = _sd3()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    specs = discover_blocks(wrapped)
    assert [s.name for s in specs] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert specs[0].module is model.transformer_blocks[0]


def test_unknown_model_needs_explicit_blocks():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

        def forward(self, hidden_states, timestep=None):
            for layer in self.layers:
                hidden_states = layer(hidden_states)
            return hidden_states

    m = Tiny()
    with pytest.raises(hasten.HastenError, match="pass blocks explicitly"):
        hasten.accelerate(m, hasten.BlockCache(schedule=[[True, False]] * 3))
    x = torch.randn(2, 4)
    ref = [m(x, timestep=torch.tensor([t, t])) for t in (900.0, 800.0)]
    names = ["layers.0", "layers.1", "layers.2"]
    with count_block_calls(m, names) as counts, \
            hasten.accelerate(m, hasten.BlockCache(schedule=[[True, False]] * 3), blocks=names) as h:
        a = m(x, timestep=torch.tensor([900.0, 900.0]))
        b = m(x, timestep=torch.tensor([800.0, 800.0]))
        assert h.report()["methods"]["block-cache"]["reused"] == [1, 1, 1]
    assert torch.equal(a, ref[0]) and counts == [1, 1, 1]
    assert torch.allclose(b, ref[1], atol=1e-6)  # same input: x + (y - x) reproduces y up to rounding
    with pytest.raises(hasten.HastenError, match="no submodule"):
        hasten.accelerate(m, hasten.BlockCache(schedule=[[True]]), blocks=["nope"])


    def run(seed: int) -> None:  # one sampling loop of 4 calls for calibration
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        for t in (900.0, 600.0, 300.0, 100.0):
            x = x - 0.1 * m(x, timestep=torch.tensor([t, t]))

    with pytest.raises(hasten.HastenError, match="same blocks= to hasten.calibrate"):
        hasten.calibrate(m, hasten.BlockCache(delta=0.5), runner=run, seeds=(0, 1), steps=4)
    plan = hasten.calibrate(m, hasten.BlockCache(delta=0.5), runner=run, seeds=(0, 1), steps=4, blocks=names)
    assert plan["blocks"] == names and plan["calls"] == 4 and len(plan["l1rel"]) == 3

    class NoTimestep(Tiny):
        def forward(self, hidden_states, t=None):  # a time argument hasten cannot find by name
            return super().forward(hidden_states)

    m = NoTimestep()
    with pytest.raises(hasten.HastenError, match="timestep could not be read"):
        hasten.calibrate(m, hasten.BlockCache(delta=0.5), runner=lambda s: m(torch.randn(2, 4), t=1.0),
                         seeds=(0, 1), steps=1, blocks=names)


def test_blockspec_for_tuple_blocks():
    model, _ = _sd3()
    specs = discover_blocks(model)
    assert specs[0].outputs == ("encoder_hidden_states", "hidden_states")
    custom = discover_blocks(model, [BlockSpec(model.transformer_blocks[0], "j0", ("encoder_hidden_states",
                                                                                  "hidden_states"))])
    assert custom[0].name == "j0" and len(custom) == 1


def test_non_model_target_is_an_error():
    with pytest.raises(hasten.HastenError, match="cannot accelerate"):
        hasten.accelerate(object(), hasten.BlockCache(schedule=[[True]]))


def test_registry_metadata_naming_a_missing_argument_is_refused():
    """diffusers registers ZImage's block with the default argument name hidden_states, but its forward takes x:
    caching it would cache None. Discovery refuses it with the way out (explicit blocks=)."""
    from diffusers import ZImageTransformer2DModel

    from hasten.adapters import BlockSpec

    torch.manual_seed(0)
    m = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                                 axes_lens=[64, 32, 32]).eval()
    with pytest.raises(hasten.HastenError, match="names the argument 'hidden_states'.*pass blocks explicitly"):
        hasten.accelerate(m, hasten.BlockCache(schedule=[[True, False]] * 4))
    specs = [BlockSpec(b, f"layers.{i}", ("x",)) for i, b in enumerate(m.layers)]
    hasten.accelerate(m, hasten.BlockCache(schedule=[[True, False]] * len(specs)), blocks=specs).disable()


def test_bria_blocks_come_from_the_override_table_and_cache():
    """diffusers registers Bria's joint block with one output (it returns two) and not its single-stream blocks:
    hasten's override table gives both lists with their two streams; call 0 is exact and later calls reuse."""
    from diffusers import BriaTransformer2DModel

    from hasten.adapters import discover_blocks

    torch.manual_seed(0)
    m = BriaTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[2, 2, 4]).eval()
    specs = discover_blocks(m)
    assert [(s.name, s.outputs) for s in specs] == [
        (n, ("encoder_hidden_states", "hidden_states"))
        for n in ("transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1")]
    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(2, 16, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    kw = dict(encoder_hidden_states=enc, img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        ref = m(x, timestep=torch.full((2,), 900.0), **kw)[0]
        with hasten.accelerate(m, hasten.BlockCache(schedule=[[True, False, False]] * 3)) as h:
            out = [m(x, timestep=torch.full((2,), t), **kw)[0] for t in (900.0, 600.0, 300.0)]
            reused = h.report()["methods"]["block-cache"]["reused"]
    assert torch.equal(out[0], ref) and reused == [2, 2, 2] and all(torch.isfinite(o).all() for o in out)
