"""FlexiDiT's flexify: PI-resize identity, bitwise at the original patch size, 4x fewer tokens at the
coarse one, and the init that embeds a coarse patch as the pretrained model embeds its down-sampling."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DiTTransformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)

from hasten.errors import HastenError
from hasten.methods.flexidit import (
    FlexOutput,
    flexi_parameters,
    flexify,
    pack_latent,
    patch_size,
    pi_resize,
    resize_matrix,
    unpack_tokens,
)


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "sd3":
        return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=8).eval()
    if kind == "dit":
        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                     num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                     norm_num_groups=8).eval()
    if kind == "flux":  # 4 latent channels, packed 2 x 2 by the pipeline: 16 per token
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=16, patch_size=2, cross_attention_dim=32,
                                    caption_channels=32, norm_num_groups=8).eval()


def flux_ids(rows: int, cols: int) -> torch.Tensor:
    """FluxPipeline's own image ids for a rows x cols token grid."""
    return FluxPipeline._prepare_latent_image_ids(1, rows, cols, "cpu", torch.float32)


def call(kind: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    t = torch.full((x.shape[0],), 500.0)
    if kind == "sd3":
        return model(hidden_states=x, timestep=t, encoder_hidden_states=torch.randn(x.shape[0], 5, 32, generator=g),
                     pooled_projections=torch.randn(x.shape[0], 32, generator=g), return_dict=False)[0]
    if kind == "dit":
        return model(x, timestep=t.long(), class_labels=torch.tensor([1] * x.shape[0]), return_dict=False)[0]
    if kind == "flux":  # packed as FluxPipeline packs, unpacked back to the latent
        rows, cols = x.shape[-2] // 2, x.shape[-1] // 2
        out = model(hidden_states=pack_latent(x, 2), timestep=t / 1000, img_ids=flux_ids(rows, cols),
                    encoder_hidden_states=torch.randn(x.shape[0], 5, 32, generator=g), txt_ids=torch.zeros(5, 3),
                    pooled_projections=torch.randn(x.shape[0], 32, generator=g), return_dict=False)[0]
        return unpack_tokens(out, 2, rows, cols)
    return model(x, encoder_hidden_states=torch.randn(x.shape[0], 5, 32, generator=g), timestep=t.long(),
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def test_pi_resize_keeps_every_inner_product_when_upsampling():
    """FlexiViT's identity: <x, w> = <B x, PI-resize(w)> for all x (B: bilinear resize to the new size)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=g)
    x = torch.randn(7, 4, dtype=torch.float64, generator=g)  # 7 patches of 2x2
    for dst in (3, 4, 6):
        w_new = pi_resize(w, dst).reshape(15, -1)
        bx = x @ resize_matrix(2, dst).T
        torch.testing.assert_close(bx @ w_new.T, x @ w.reshape(15, -1).T, rtol=0, atol=1e-10)
    # down-sampling is a least-squares fit, not an identity
    w4 = torch.randn(1, 4, 4, dtype=torch.float64, generator=g)
    x4 = torch.randn(3, 16, dtype=torch.float64, generator=g)
    assert not torch.allclose((x4 @ resize_matrix(4, 2).T) @ pi_resize(w4, 2).reshape(-1), x4 @ w4.reshape(-1))



def test_down_sampling_averages_every_pixel_of_a_cell():
    """At a factor of 2 the down-sampling matrix is exactly the bilinear resize (the paper's setting); at a factor
    of 4 every pixel of a 4 x 4 cell counts 1/16 (bilinear without antialiasing would read only 4 of them)."""
    basis = torch.eye(16, dtype=torch.float64).reshape(16, 1, 4, 4)
    bilinear = F.interpolate(basis, size=(2, 2), mode="bilinear", align_corners=False, antialias=False)
    assert torch.equal(resize_matrix(4, 2), bilinear.reshape(16, 4).T)
    assert torch.equal(resize_matrix(8, 2), torch.kron(torch.eye(2, dtype=torch.float64), torch.kron(
        torch.ones(1, 4, dtype=torch.float64), torch.kron(torch.eye(2, dtype=torch.float64),
                                                          torch.ones(1, 4, dtype=torch.float64)))) / 16)


@pytest.mark.parametrize("kind", ["sd3", "dit", "pixart", "flux"])
def test_original_patch_size_is_bitwise_and_the_coarse_one_has_a_quarter_of_the_tokens(kind):
    model = tiny(kind)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = call(kind, model, x)
        flexify(model, (2, 4))
        assert torch.equal(call(kind, model, x), before)  # the default mode runs the pretrained modules
        tokens = []
        h = model.transformer_blocks[0].register_forward_pre_hook(
            lambda m, a, kw: tokens.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
        call(kind, model, x)
        with patch_size(model, 4):
            coarse = call(kind, model, x)
        h.remove()
        assert torch.equal(call(kind, model, x), before)  # leaving the block restores the model
    assert tokens == [64, 16]
    assert coarse.shape == before.shape and torch.isfinite(coarse).all()
    # what flexify adds: embedding at P=4 (D C P^2) + size embedding (D); de-embedding (P^2 C_out D) + its
    # bias (P^2 C_out) + output scale and shift (2 D)
    embed = model.x_embedder if kind == "flux" else model.pos_embed
    d, c = embed.weight.shape[0], 4
    c_out = next(m.c for m in model.modules() if isinstance(m, FlexOutput))
    expected = d * c * 16 + d + 16 * c_out * d + 16 * c_out + 2 * d
    assert sum(p.numel() for p in flexi_parameters(model)) == expected


def test_a_coarse_patch_is_embedded_as_its_bilinear_down_sampling():
    """At init, weights at the underlying size P are B_{P->p0}^T w_p0: <x4, w4> = <down(x4), w2>."""
    model = flexify(tiny("sd3"), (2, 4))
    emb = model.pos_embed
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    coarse = F.conv2d(x, emb.weight_for(4), stride=4)
    down = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=False)
    fine = F.conv2d(down, emb.orig.proj.weight, stride=2)
    torch.testing.assert_close(coarse, fine, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.weight_for(2), emb.orig.proj.weight, rtol=0, atol=1e-6)  # P reproduces p0


def test_the_coarse_output_patch_is_the_upsampled_pretrained_one():
    model = flexify(tiny("sd3"), (2, 4))
    out = model.proj_out
    h = torch.randn(3, out.orig.in_features, generator=torch.Generator().manual_seed(2))
    w4, b4 = out.weight_for(4)
    y4 = F.linear(h, w4, b4).reshape(3, 16, out.c)
    y2 = out.orig(h).reshape(3, 4, out.c)
    up = torch.einsum("ij,njc->nic", resize_matrix(2, 4).float(), y2)
    torch.testing.assert_close(y4, up, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    model = tiny("sd3")
    with pytest.raises(HastenError, match="multiples of the model's own"):
        flexify(model, (2, 3))
    with pytest.raises(HastenError, match="call hasten.flexify"):
        with patch_size(model, 4):
            pass
    flexify(model, (2, 4))
    with pytest.raises(HastenError, match="already flexified"):
        flexify(model, (2, 4))
    with pytest.raises(HastenError, match="not one of"):
        with patch_size(model, 8):
            pass
    with pytest.raises(HastenError, match="PatchEmbed"):
        flexify(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def tiny_shapes():
    from hasten.testing import tiny_shapes_pipeline

    return tiny_shapes_pipeline()


def test_the_scheduler_runs_the_first_steps_coarse_and_weak_steps_0_is_bitwise(tiny_shapes):
    import hasten

    pipe = tiny_shapes
    prompts = ["a red circle", "two blue squares"]

    def run() -> torch.Tensor:
        return pipe(prompts, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt").images

    with pytest.raises(HastenError, match="flexified"):
        hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2))
    base = run()
    hasten.flexify(pipe.transformer, (2, 4))
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=0)):
        assert torch.equal(run(), base)
    tokens = []
    h = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: tokens.append(kw["hidden_states"].shape[1]), with_kwargs=True)
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2)) as handle:
        fast = run()
        rep = handle.report()["methods"]["flexidit"]
    h.remove()
    assert tokens == [16, 16, 64, 64, 64, 64]  # weak first, then the model's own patch size
    assert rep["weak_calls"] == 2 and rep["powerful_calls"] == 4 and rep["weak_patch"] == 4
    assert rep["image_tokens_per_call"] == [16, 16, 64, 64, 64, 64]
    assert fast.shape == base.shape and not torch.equal(fast, base)
    assert torch.equal(run(), base)  # disable() leaves the flexified model in its original mode
    with pytest.raises(HastenError, match="weak_steps >= 0"):
        hasten.FlexiDiT(weak_steps=-1)
    with pytest.raises(HastenError, match="exactly one of"):
        hasten.FlexiDiT()
    with pytest.raises(HastenError, match="0 < compute <= 1"):
        hasten.FlexiDiT(compute=1.5)
    # compute=0.6: as many weak calls as keep the share of full-model FLOPs at or under 60 %
    from hasten.methods.flexidit import transformer_flops

    r = (transformer_flops(pipe.transformer, 16, 16, 4, text_tokens=24)["total"]
         / transformer_flops(pipe.transformer, 16, 16, 2, text_tokens=24)["total"])
    k = math.ceil((6 * 0.4) / (1 - r))
    with hasten.accelerate(pipe, hasten.FlexiDiT(compute=0.6)) as handle:
        run()
        rep = handle.report()["methods"]["flexidit"]
    assert 0 < k < 6 and rep["weak_calls"] == k and rep["compute_share"] <= 0.6
    assert rep["compute_share"] == pytest.approx((k * r + 6 - k) / 6, abs=1e-4)
    # with Block Caching: a schedule that computes everything is bitwise FlexiDiT alone; a reuse scheduled
    # right after the switch of patch size computes instead (no residual crosses a change of token count)
    nblocks = len(pipe.transformer.transformer_blocks)
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2), hasten.BlockCache(schedule=[[True] * 6] * nblocks)):
        assert torch.equal(run(), fast)
    every_other = [[n % 2 == 0 for n in range(6)]] * nblocks  # reuse at calls 1, 3, 5 (1: weak, from call 0)
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2), hasten.BlockCache(schedule=every_other)) as handle:
        cached = run()
        bc = handle.report()["methods"]["block-cache"]
    assert bc["reused"] == [3, 3] and bc["computed"] == [3, 3] and bc["forced"] == [0, 0]
    assert torch.isfinite(cached).all() and not torch.equal(cached, fast)
    switch_reuse = [[n != 2 for n in range(6)]] * nblocks  # reuse scheduled at the switch call only
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2), hasten.BlockCache(schedule=switch_reuse)) as handle:
        assert torch.equal(run(), fast)  # the weak residual is not reused at full size: computed, bitwise
        bc = handle.report()["methods"]["block-cache"]
    assert bc["reused"] == [0, 0] and bc["forced"] == [1, 1]
    # with guidance (AG) it composes: both wrap whole calls
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2), hasten.AdaptiveGuidance(threshold=2.0)):
        assert torch.equal(run(), fast)  # threshold > 1 never switches: bitwise CFG on top of FlexiDiT


@pytest.mark.parametrize("kind", ["sd3", "dit", "flux", "sd3-lora-image", "sd3-lora-joint"])
@pytest.mark.parametrize("patch", [2, 4])
def test_the_flop_formula_matches_the_flop_counter(kind, patch):
    """Analytic FLOPs equal torch's counter, at both sizes; with the LoRA variant's adapters (on the image
    stream, or on both streams) the coarse size counts them too, and the original size (adapters off) not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from hasten.flexidit_train import add_lora
    from hasten.methods.flexidit import transformer_flops

    kind, _, targets = kind.partition("-lora-")
    model = flexify(tiny(kind), (2, 4))
    if targets:
        add_lora(model, 4, rank=3, targets=targets)
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad(), patch_size(model, patch):
        call(kind, model, x)  # the first call at a size computes its PI-resized weights once (cached)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            call(kind, model, x)
    counted = fc.get_total_flops()
    text = 0 if kind == "dit" else 5
    want = transformer_flops(model, 16, 16, patch, text_tokens=text, batch=2)
    assert want["total"] == counted
    if patch == 4:  # the weak mode: 16 tokens instead of 64
        full = transformer_flops(model, 16, 16, 2, text_tokens=text, batch=2)
        assert want["total"] < 0.4 * full["total"]


# --------------------------------------------------------------------------- Flux (packed tokens, rotary ids)
def test_flux_coarse_tokens_are_embedded_as_their_down_sampling_at_the_patch_centres():
    """Flux: the pipeline packs 2 x 2 latent pixels per token and sends rotary ids. At patch 4 the call
    hook repacks 4 x 4 patches, the embedding is the PI-resized x_embedder (a coarse patch embedded as
    its bilinear down-sampling at init), the ids sit at the centre of the fine tokens each patch covers,
    and the output comes back as the pipeline's 2 x 2 tokens, channel-first as Flux unpacks them."""
    from hasten.methods.flexidit import coarse_ids, packed_grid

    model = flexify(tiny("flux"), (2, 4))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(pack_latent(x, 2), FluxPipeline._pack_latents(x, 1, 4, 16, 16))  # the pipeline's layout
    assert torch.equal(unpack_tokens(pack_latent(x, 4), 4, 4, 4), x)
    emb = model.x_embedder
    down = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(F.linear(pack_latent(x, 4), emb.weight_for(4)),
                               F.linear(pack_latent(down, 2), emb.orig.weight), rtol=1e-5, atol=1e-5)
    # ids: each coarse patch at the mean of the ids of the 2 x 2 fine tokens it covers
    fine = flux_ids(8, 8)
    mean = F.avg_pool2d(fine.reshape(8, 8, 3).permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0).reshape(-1, 3)
    assert torch.equal(coarse_ids(fine, 2, 8, 8), mean)
    assert coarse_ids(fine[None], 2, 8, 8).shape == (1, 16, 3)  # the deprecated 3-D ids keep their form
    # the de-embedding in Flux's channel-first layout: the coarse patch is the up-sampled fine one
    out = model.proj_out
    h = torch.randn(3, out.orig.in_features, generator=torch.Generator().manual_seed(2))
    w4, b4 = out.weight_for(4)
    y4 = unpack_tokens(F.linear(h, w4, b4)[None], 4, 1, 3)  # three 4 x 4 patches side by side
    y2 = unpack_tokens(out.orig(h)[None], 2, 1, 3)
    for i in range(3):  # patch by patch (bilinear up-sampling of each 2 x 2 patch on its own)
        one = F.interpolate(y2[..., 2 * i:2 * i + 2], size=(4, 4), mode="bilinear", align_corners=False)
        torch.testing.assert_close(y4[..., 4 * i:4 * i + 4], one, rtol=1e-4, atol=1e-5)
    # a grid that is not one plain latent grid (Kontext's reference tokens) is refused at the coarse size
    assert packed_grid(fine, 64) == (8, 8)
    extra = torch.cat([fine, fine])
    extra[64:, 0] = 1
    with pytest.raises(HastenError, match="one plain latent grid"):
        packed_grid(extra, 128)
    with torch.no_grad(), patch_size(model, 4), pytest.raises(HastenError, match="not divisible"):
        call("flux", model, torch.randn(1, 4, 10, 16))  # 5 x 8 tokens of 2 x 2
    with torch.no_grad(), patch_size(model, 4), pytest.raises(HastenError, match="ControlNet"):
        model(hidden_states=pack_latent(x, 2), img_ids=fine, controlnet_block_samples=[torch.zeros(1, 64, 32)])


def test_flexidit_on_a_flux_pipeline_with_true_cfg():
    """The scheduler on FluxPipeline (true CFG: each branch its own call): weak_steps=0 is bitwise, the
    first steps of both branches run at patch 4 (a quarter of the tokens), and the FLOPs share is the
    analytic one."""
    import hasten
    from hasten.methods.flexidit import transformer_flops
    from hasten.testing_pipelines import STEPS, L, build_flux

    pipe, run = build_flux()
    base = run(0)
    hasten.flexify(pipe.transformer, (2, 4))
    assert torch.equal(run(0), base)
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=0)):
        assert torch.equal(run(0), base)
    tokens = []
    h = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: tokens.append(kw["hidden_states"].shape[1]), with_kwargs=True)
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2)) as handle:
        fast = run(0)
        rep = handle.report()["methods"]["flexidit"]
    h.remove()
    fine = (64 // 8 // 2) ** 2  # a 64 x 64 image is an 8 x 8 latent: 16 tokens of 2 x 2, 4 of 4 x 4
    assert tokens == [fine // 4] * 4 + [fine] * (2 * STEPS - 4)  # cond and uncond calls of steps 0, 1 weak
    assert rep["weak_calls"] == 4 and rep["powerful_calls"] == 2 * STEPS - 4
    assert fast.shape == base.shape and torch.isfinite(fast).all() and not torch.equal(fast, base)
    text = L  # tokens of build_flux's prompt embeddings
    full = transformer_flops(pipe.transformer, 8, 8, 2, text_tokens=text)["total"]
    weak = transformer_flops(pipe.transformer, 8, 8, 4, text_tokens=text)["total"]
    assert rep["compute_share"] == pytest.approx((2 * weak + (STEPS - 2) * full) / (STEPS * full), abs=1e-4)
    assert torch.equal(run(0), base)  # leaving the block restores the model
    k = math.ceil(STEPS * (1 - 0.7) / (1 - weak / full))  # compute=0.7: the latent size read from img_ids
    with hasten.accelerate(pipe, hasten.FlexiDiT(compute=0.7)) as handle:
        run(0)
        rep = handle.report()["methods"]["flexidit"]
    assert 0 < k < STEPS and rep["weak_calls"] == 2 * k and rep["compute_share"] <= 0.7


def test_inference_caches_the_resized_weights_until_they_change():
    model = flexify(tiny("sd3"), (2, 4))
    emb = model.pos_embed
    with torch.no_grad():
        a = emb.weight_for(4)
        assert emb.weight_for(4) is a  # computed once at inference
        emb.weight.add_(1.0)  # an optimiser step changes the weights in place
        b = emb.weight_for(4)
    assert b is not a and not torch.equal(a, b)
    assert emb.weight_for(4).requires_grad  # while training: recomputed, differentiable


def _tiny_data(pipe, n: int = 32) -> tuple[dict, tuple]:
    from hasten.pipelines.shapes import encode_text

    caps = ["a red circle", "two blue squares", "a green triangle above a cyan disc", "three purple tiles"]
    text, pooled = encode_text(pipe.text_encoder, pipe.tokenizer, caps, warn=False)
    g = torch.Generator().manual_seed(0)
    data = {"latents": torch.randn(n, 4, 16, 16, generator=g), "index": torch.arange(n) % 4, "text": text,
            "pooled": pooled}
    return data, encode_text(pipe.text_encoder, pipe.tokenizer, [""], warn=False)


def _copy_pipe(pipe):
    from hasten.eval.bench_shapes import copy_shapes

    return copy_shapes(pipe)


def test_lora_variant_is_off_at_the_original_size_and_trains_only_its_own_parameters(tiny_shapes, tmp_path):
    from hasten.flexidit_train import FlexifyConfig, add_lora, train_flexify

    pipe = _copy_pipe(tiny_shapes)
    if getattr(pipe.transformer, "flex_patch_sizes", None) is None:
        flexify(pipe.transformer, (2, 4))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(hidden_states=x, timestep=torch.tensor([500.0, 500.0]), encoder_hidden_states=torch.randn(2, 24, 384),
              pooled_projections=torch.randn(2, 384), return_dict=False)
    with torch.no_grad():
        base, = pipe.transformer(**kw)
        with patch_size(pipe.transformer, 4):
            weak_before, = pipe.transformer(**kw)
        add_lora(pipe.transformer, 4, rank=4)
        for name, q in pipe.transformer.named_parameters():
            if "lora_B" in name:
                q.normal_()  # a trained adapter
        assert torch.equal(pipe.transformer(**kw)[0], base)  # off at the original size: bitwise
        with patch_size(pipe.transformer, 4):
            assert not torch.equal(pipe.transformer(**kw)[0], weak_before)  # on at the coarse size
        assert torch.equal(pipe.transformer(**kw)[0], base)

    data, empty = _tiny_data(tiny_shapes)
    cfg = FlexifyConfig(steps=4, batch_size=4, rank=4, checkpoint_every=2, warmup=1)
    a = _copy_pipe(tiny_shapes)
    if getattr(a.transformer, "flex_patch_sizes", None) is None:  # the module's pipeline may be flexified already
        flexify(a.transformer, (2, 4))
    flex = {id(q) for q in flexi_parameters(a.transformer)}
    frozen = {k: q.detach().clone() for k, q in a.transformer.named_parameters() if id(q) not in flex}
    assert any("transformer_blocks" in k for k in frozen) and len(frozen) > len(flex)
    train_flexify(a, tmp_path / "a", data, empty, cfg, progress=False)
    after = {k.replace(".base_layer", ""): v for k, v in a.transformer.state_dict().items() if "lora_" not in k}
    assert frozen.keys() <= after.keys()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # every base weight is frozen
    lora_b = [v for k, v in a.transformer.state_dict().items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the adapters trained (they start at 0)
    b = _copy_pipe(tiny_shapes)
    train_flexify(b, tmp_path / "b", data, empty, cfg, progress=False, stop_after=2)
    c = _copy_pipe(tiny_shapes)  # a fresh process resuming from the checkpoint
    log = train_flexify(c, tmp_path / "b", data, empty, cfg, progress=False)
    assert log["finished"] and log["trainable_parameters"] > 0
    for k, v in a.transformer.state_dict().items():
        assert torch.equal(v, c.transformer.state_dict()[k]), k  # resumed == uninterrupted
    other = FlexifyConfig(steps=4, batch_size=4, rank=4, checkpoint_every=2, warmup=1, distil_guidance=5.0)
    with pytest.raises(HastenError, match=r"other settings \(distil_guidance: 0.0 there, 5.0 now\)"):
        train_flexify(_copy_pipe(tiny_shapes), tmp_path / "b", data, empty, other, progress=False)
    from hasten.testing import tiny_shapes_pipeline

    stopped = FlexifyConfig(steps=6, batch_size=4, rank=4, checkpoint_every=2, warmup=1)
    train_flexify(_copy_pipe(tiny_shapes), tmp_path / "d", data, empty, stopped, progress=False, stop_after=2)
    with pytest.raises(HastenError, match="fine-tune of other base weights"):  # resumed onto another base model
        train_flexify(tiny_shapes_pipeline(seed=1), tmp_path / "d", data, empty, stopped, progress=False)


def test_resume_refuses_other_settings_but_accepts_a_setting_added_since_at_its_default(tmp_path):
    """A checkpoint written before an option existed resumes when the option is at its default (what that run
    used), and is refused otherwise."""
    from hasten.flexidit_train import FlexifyConfig
    from hasten.train_shapes import load_checkpoint, save_checkpoint

    path = tmp_path / "run" / "checkpoints" / "flexify.pt"
    path.parent.mkdir(parents=True)
    old = {k: v for k, v in asdict(FlexifyConfig(steps=8)).items() if k != "distil_guidance"}
    save_checkpoint(path, {"step": 4, "config": old})
    assert load_checkpoint(path, FlexifyConfig(steps=8))["step"] == 4
    with pytest.raises(HastenError, match="distil_guidance"):
        load_checkpoint(path, FlexifyConfig(steps=8, distil_guidance=3.0))
    with pytest.raises(HastenError, match=r"steps: 8 there, 9 now"):
        load_checkpoint(path, FlexifyConfig(steps=9))


def test_guided_distillation_loss_is_both_branches_plus_the_guided_velocity(tiny_shapes):
    """--distil-guidance s: (|dv_c|^2 + |dv_u|^2) / 2 + |dv_u + s (dv_c - dv_u)|^2 / s^2, every row in both
    branches; 0 keeps the paper's per-branch loss."""
    from hasten.flexidit_train import add_lora, distillation_loss

    pipe = _copy_pipe(tiny_shapes)
    tr = pipe.transformer
    if getattr(tr, "flex_patch_sizes", None) is None:
        flexify(tr, (2, 4))
    add_lora(tr, 4, rank=4)
    with torch.no_grad():
        for name, q in tr.named_parameters():
            if "lora_B" in name:
                q.normal_(std=0.1)  # a partly trained adapter: the weak mode differs from the powerful one
    data, empty = _tiny_data(tiny_shapes)
    z, text, pooled = data["latents"][:3], data["text"][data["index"][:3]], data["pooled"][data["index"][:3]]
    s_g = 5.0
    with torch.no_grad():
        got = distillation_loss(tr, z, text, pooled, 4, torch.Generator().manual_seed(3), 0.3, s_g, empty)
        plain = distillation_loss(tr, z, text, pooled, 4, torch.Generator().manual_seed(3), 0.3)
        # the same draws, by hand
        g = torch.Generator().manual_seed(3)
        e = torch.randn(z.shape, generator=g)
        sigma = 0.3 + 0.7 * torch.rand(3, generator=g)
        x = (1 - sigma.view(-1, 1, 1, 1)) * z + sigma.view(-1, 1, 1, 1) * e

        def v(t, p, weak):
            kw = dict(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=t, pooled_projections=p,
                      return_dict=False)
            if not weak:
                return tr(**kw)[0]
            with patch_size(tr, 4):
                return tr(**kw)[0]

        e_t, e_p = empty[0].expand(3, -1, -1), empty[1].expand(3, -1)
        d_c = v(text, pooled, True) - v(text, pooled, False)
        d_u = v(e_t, e_p, True) - v(e_t, e_p, False)
    want = (d_c.pow(2).mean() + d_u.pow(2).mean()) / 2 + ((d_u + s_g * (d_c - d_u)) / s_g).pow(2).mean()
    assert plain > 0 and torch.allclose(plain, d_c.pow(2).mean(), rtol=1e-4)
    assert torch.allclose(got, want, rtol=1e-4), (got, want)  # batched [uncond; cond] vs one branch at a time


def test_cli_flexify_writes_a_folder_that_loads_and_keeps_the_base_bitwise(tmp_path, capsys):
    import json

    import hasten
    from hasten.testing import run_cli, tiny_shapes_pipeline

    base = tiny_shapes_pipeline()
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "flex"
    code, stdout, err = run_cli(capsys, "flexify", "--model", str(tmp_path / "base"), "--out", str(out), "--steps",
                                "2", "--batch-size", "2", "--scenes", "16", "--rank", "2", "--json")
    assert code == 0, err
    assert json.loads(stdout)["finished"] and (out / "flexi.safetensors").is_file()
    pipe = hasten.load_pipeline(out)
    ref = hasten.load_pipeline(tmp_path / "base")

    def run(p, **kw):
        return p(["a red circle"], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images

    assert torch.equal(run(pipe), run(ref))  # powerful mode only: the base model, bitwise
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2)) as h:
        fast = run(pipe)
        assert h.report()["methods"]["flexidit"]["weak_calls"] == 2
    assert torch.isfinite(fast).all() and not torch.equal(fast, run(ref))
    code, _, err = run_cli(capsys, "flexify", "--model", "digits", "--out", str(tmp_path / "d"), "--steps", "0")
    assert code == 2 and "--steps must be >= 1" in err


def test_joint_lora_targets_adapt_the_text_stream_and_reload_from_the_folder(tmp_path, capsys):
    """Also trains with the guided distillation loss (--distil-guidance), which the folder records."""
    import json

    from safetensors.torch import load_file

    import hasten
    from hasten.testing import run_cli, tiny_shapes_pipeline

    tiny_shapes_pipeline().save_pretrained(tmp_path / "base")
    out = tmp_path / "flex"
    code, _, err = run_cli(capsys, "flexify", "--model", str(tmp_path / "base"), "--out", str(out), "--steps", "2",
                           "--batch-size", "2", "--scenes", "16", "--rank", "2", "--lora-targets", "joint",
                           "--distil-guidance", "5")
    assert code == 0, err
    assert json.loads((out / "flexi_config.json").read_text())["distil_guidance"] == 5.0
    saved = load_file(out / "flexi.safetensors")
    text_stream = [k for k in saved if "lora_B" in k and ("add_q_proj" in k or "ff_context" in k)]
    assert text_stream and any(saved[k].abs().sum() > 0 for k in text_stream)  # trained, not left at init (0)
    tr = hasten.load_pipeline(out).transformer
    state = tr.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    code, _, err = run_cli(capsys, "flexify", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "x"),
                           "--lora-targets", "text")
    assert code == 2 and "--lora-targets" in err
    code, _, err = run_cli(capsys, "flexify", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "x"),
                           "--distil-guidance", "0.5")
    assert code == 2 and "--distil-guidance" in err


def test_the_weak_guide_runs_the_conditional_rows_at_both_sizes(tiny_shapes):
    """The paper's guidance variant: in a weak-guide call the conditional rows run once powerful and once
    weak (the guide), instead of [uncond; cond] at one size."""
    import hasten

    pipe = tiny_shapes
    if getattr(pipe.transformer, "flex_patch_sizes", None) is None:
        hasten.flexify(pipe.transformer, (2, 4))
    seen = []
    h = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].shape[1], kw["hidden_states"].shape[0])), with_kwargs=True)

    def run() -> torch.Tensor:
        return pipe(["a red circle", "two blue squares"], num_inference_steps=5,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=1, weak_guide_steps=2)) as handle:
        guided = run()
        rep = handle.report()["methods"]["flexidit"]
    h.remove()
    # (tokens, rows): weak CFG call; two calls of cond rows powerful + the same rows weak; then full CFG
    assert seen == [(16, 4), (64, 2), (16, 2), (64, 2), (16, 2), (64, 4), (64, 4)]
    assert rep["weak_calls"] == 1 and rep["weak_guide_calls"] == 2 and rep["powerful_calls"] == 2
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=1)):
        plain = run()
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)


def test_the_accel_spec():
    from hasten.methods.flexidit import FlexiDiT
    from hasten.specs import flexidit_from_spec, parse_spec

    name, opts = parse_spec("flexidit:compute=0.6,weak_guide_steps=5")
    assert name == "flexidit" and flexidit_from_spec(opts) == FlexiDiT(compute=0.6, weak_guide_steps=5)
    assert flexidit_from_spec({"weak_steps": "10", "patch": "4"}) == FlexiDiT(weak_steps=10, weak_patch=4)
    with pytest.raises(HastenError, match="unknown option 'steps'"):
        flexidit_from_spec({"steps": "3"})
    with pytest.raises(HastenError, match="compute must be a number"):
        flexidit_from_spec({"compute": "most"})


def _tiny_digits():
    from hasten.pipeline import HastenPipeline
    from hasten.train import digits_transformer_config

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(**digits_transformer_config(num_layers=2, num_attention_heads=2, attention_head_dim=16))
    return HastenPipeline(tr.eval(), guidance_scale=3.0, name="tiny-digits")


def test_shared_variant_trains_both_sizes_resumes_exactly_and_ships(tmp_path, capsys):
    import json

    import hasten
    from hasten.data.digits import digits
    from hasten.flexidit_train import SharedFlexifyConfig, train_flexify_shared
    from hasten.testing import run_cli

    data = digits("train")
    cfg = SharedFlexifyConfig(steps=4, batch_size=8, checkpoint_every=2)
    a = _tiny_digits()
    sizes = []
    h = a.transformer.register_forward_pre_hook(lambda m, args, kw: sizes.append(m.flex_mode)
                                                if hasattr(m, "flex_mode") else None, with_kwargs=True)
    log = train_flexify_shared(a, tmp_path / "a", cfg, data, progress=False)
    h.remove()
    assert log["finished"] and sorted(set(sizes)) == [2, 4]  # both patch sizes were trained
    b = _tiny_digits()
    train_flexify_shared(b, tmp_path / "b", cfg, data, progress=False, stop_after=2)
    c = _tiny_digits()
    train_flexify_shared(c, tmp_path / "b", cfg, data, progress=False)
    for k, v in a.transformer.state_dict().items():
        assert torch.equal(v, c.transformer.state_dict()[k]), k

    base = _tiny_digits()
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "flex"
    code, stdout, err = run_cli(capsys, "flexify", "--model", str(tmp_path / "base"), "--out", str(out),
                                "--steps", "2", "--batch-size", "4", "--json")
    assert code == 0, err
    assert json.loads(stdout)["finished"]
    pipe = hasten.load_pipeline(out)
    assert pipe.transformer.flex_variant == "shared"
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2)) as handle:
        images = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
        assert handle.report()["methods"]["flexidit"]["image_tokens_per_call"] == [16, 16, 64, 64]
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("name", ["digits-flexi", "shapes-flexi"])
def test_the_shipped_flexi_models_load_and_run_coarse_first(name):
    """The embedded fine-tunes load through load_pipeline by name; weak mode on the first calls; the LoRA
    variant (shapes-flexi) is the base model bitwise with weak_steps=0."""
    import hasten

    pipe = hasten.load_pipeline(name)
    if name == "digits-flexi":
        def run(p):
            return p(torch.tensor([3, 7]), num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    else:
        def run(p):
            return p(["a red circle", "two blue squares"], num_inference_steps=4, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=2)) as h:
        images = run(pipe)
        rep = h.report()["methods"]["flexidit"]
    assert torch.isfinite(images).all() and rep["image_tokens_per_call"] == [16, 16, 64, 64]
    if name == "shapes-flexi":
        with hasten.accelerate(pipe, hasten.FlexiDiT(weak_steps=0)):
            assert torch.equal(run(pipe), run(hasten.load_pipeline("shapes")))


def test_the_projections_follow_the_weights_device():
    """The PI-resize matrices are built once on the CPU in float64 and moved to the weights' device at use: on a
    CUDA model (fake CUDA tensors here: no GPU needed) no CPU tensor meets a CUDA one; and the per-size
    parameters flexify adds are created on the model's device (the meta device here), not on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hasten.methods.flexidit import FlexOutput, _embedding_at_size, _embedding_at_underlying_size

    with FakeTensorMode(allow_non_fake_inputs=True):
        w = _embedding_at_underlying_size(torch.empty(8, 4, 2, 2, device="cuda"), 4)
        assert w.device.type == "cuda" and _embedding_at_size(w, 2).device.type == "cuda"

    class Owner:
        flex_mode = 4

    out = FlexOutput(torch.nn.Linear(8, 16, device="meta"), 2, (2, 4), Owner())
    assert {q.device.type for q in out.parameters()} == {"meta"}
    assert out(torch.empty(3, 5, 8, device="meta")).device.type == "meta"


def test_loras_for_several_sizes_are_all_kept():
    """A LoRA per coarse size: adding the second keeps the first (load_flexi adds one per size in the config)."""
    from hasten.flexidit_train import add_lora
    from hasten.testing import tiny_shapes_pipeline

    pipe = tiny_shapes_pipeline()
    flexify(pipe.transformer, (2, 4, 8))
    add_lora(pipe.transformer, 4, rank=2)
    add_lora(pipe.transformer, 8, rank=2)
    assert sorted(pipe.transformer.flex_lora) == [4, 8]


def test_patch_size_restores_the_model_when_switching_fails_half_way(monkeypatch):
    """An error while the LoRA adapters are being switched on leaves the model at its original patch size,
    with no adapter left enabled."""
    from hasten.flexidit_train import add_lora
    from hasten.methods import flexidit as fx
    from hasten.testing import tiny_shapes_pipeline

    tr = tiny_shapes_pipeline().transformer
    flexify(tr, (2, 4))
    add_lora(tr, 4, rank=2)
    layers = fx._lora_found(tr)["layers"]
    orig, calls = type(layers[0]).enable_adapters, []

    def fail_on_second(self, enabled):
        calls.append(enabled)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return orig(self, enabled)

    monkeypatch.setattr(type(layers[0]), "enable_adapters", fail_on_second)
    with pytest.raises(RuntimeError, match="boom"), fx.patch_size(tr, 4):
        pass
    monkeypatch.undo()
    assert tr.flex_mode == 2 and tr.config.patch_size == 2
    assert not any(layer.merged or not layer.disable_adapters for layer in layers)
