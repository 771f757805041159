"""Adaptive Guidance on diffusers pipelines that batch CFG, with tiny random-weight components built here
(no tokenizer, no download: prompt embeddings are passed directly).

Covered: DiTPipeline ([cond; uncond], learned sigma), PixArtAlphaPipeline, PixArtSigmaPipeline and
StableDiffusion3Pipeline ([uncond; cond], negative prompt embeddings in the unconditional half).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from hasten.api import accelerate
from hasten.errors import HastenError
from hasten.methods.guidance import AdaptiveGuidance, layout_for

torch.set_num_threads(1)
B, STEPS = 2, 4


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=8).eval()


def embeds(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pe": torch.randn(B, 5, 16, generator=g), "ne": torch.randn(B, 5, 16, generator=g),
            "pp": torch.randn(B, 8, generator=g), "np": torch.randn(B, 8, generator=g)}


def build_dit():
    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                               norm_type="ada_norm_zero").eval()
    pipe = DiTPipeline(tr, tiny_vae(), DDIMScheduler())

    def run(neg_seed: int = 1):
        return pipe(class_labels=[1, 2], num_inference_steps=STEPS, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    return pipe, run


def _pixart(cls):
    def build():
        torch.manual_seed(0)
        tr = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                      num_attention_heads=2, caption_channels=16, in_channels=4,
                                      cross_attention_dim=16, out_channels=8, attention_bias=True,
                                      activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                      norm_type="ada_norm_single", norm_elementwise_affine=False,
                                      norm_eps=1e-6).eval()
        pipe = cls(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tr,
                   scheduler=DDIMScheduler())

        def run(neg_seed: int = 1):
            e, n = embeds(0), embeds(neg_seed)
            mask = torch.ones(B, 5, dtype=torch.long)
            return pipe(negative_prompt=None, prompt_embeds=e["pe"], prompt_attention_mask=mask,
                        negative_prompt_embeds=n["ne"], negative_prompt_attention_mask=mask, height=8,
                        width=8, use_resolution_binning=False, num_inference_steps=STEPS, guidance_scale=4.5,
                        output_type="latent", generator=torch.Generator().manual_seed(0)).images

        return pipe, run
    return build


def build_sd3():
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                               pooled_projection_dim=8, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)

    def run(neg_seed: int = 1):
        e, n = embeds(0), embeds(neg_seed)
        return pipe(prompt_embeds=e["pe"], negative_prompt_embeds=n["ne"], pooled_prompt_embeds=e["pp"],
                    negative_pooled_prompt_embeds=n["np"], height=8, width=8, num_inference_steps=STEPS,
                    guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    return pipe, run


BUILDERS = {"DiTPipeline": build_dit, "PixArtAlphaPipeline": _pixart(PixArtAlphaPipeline),
            "PixArtSigmaPipeline": _pixart(PixArtSigmaPipeline), "StableDiffusion3Pipeline": build_sd3}
TEXT = ["PixArtAlphaPipeline", "PixArtSigmaPipeline", "StableDiffusion3Pipeline"]


@pytest.fixture(scope="module", params=list(BUILDERS))
def built(request):
    pipe, run = BUILDERS[request.param]()
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe, run


def test_no_switch_is_bitwise_cfg(built):
    _, pipe, run = built
    ref = run()
    with accelerate(pipe, AdaptiveGuidance(threshold=1.5)) as h:
        out = run()
        rep = h.report()
    assert torch.equal(out, ref)
    assert rep["nfe"] == 2 * STEPS and rep["rows_sent"] == 2 * B * STEPS
    assert torch.equal(run(), ref)  # disabled


def test_switched_samples_get_exactly_the_conditional_prediction(built):
    """threshold -1: after call 0 the transformer receives only the B conditional rows, and the
    prediction the pipeline hands to its scheduler is bitwise the conditional one (u := c trick)."""
    name, pipe, run = built
    layout = layout_for(pipe)
    outs, steps, sent = [], [], []
    with accelerate(pipe, AdaptiveGuidance(threshold=-1)) as h:
        outer = pipe.transformer.forward

        def spy_out(*a, **k):
            o = outer(*a, **k)
            outs.append((o[0] if isinstance(o, tuple) else o.sample).clone())
            return o

        h.set_attr(pipe.transformer, "forward", spy_out)
        h.wrap_call(lambda inner, *a, **k: sent.append(a[0].shape[0] if a else k["hidden_states"].shape[0])
                    or inner(*a, **k), "spy")
        step = pipe.scheduler.step

        def spy_step(model_output, *a, **k):
            steps.append(model_output.clone())
            return step(model_output, *a, **k)

        h.set_attr(pipe.scheduler, "step", spy_step)
        run()
        rep = h.report()
    assert sent == [2 * B] + [B] * (STEPS - 1)
    assert rep["nfe"] == 2 + (STEPS - 1)
    assert rep["methods"]["adaptive-guidance"]["nfe_per_sample"] == [STEPS + 1] * B
    _, cond = layout.halves(B)
    c_in = pipe.transformer.config.in_channels
    for j in range(1, STEPS):
        cond_pred = outs[j][cond][:, :c_in]
        assert torch.equal(steps[j][:B], cond_pred), (name, j)


@pytest.mark.parametrize("name", TEXT)
def test_negative_prompts_reach_the_unconditional_rows(name):
    pipe, run = BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    seen = []
    with accelerate(pipe, AdaptiveGuidance(threshold=-1)) as h:
        h.wrap_call(lambda inner, *a, **k: seen.append(k["encoder_hidden_states"].clone()) or inner(*a, **k),
                    "spy")
        a = run(neg_seed=1)
        b = run(neg_seed=2)
    neg = embeds(1)["ne"]
    # call 0 of the first run sends [uncond; cond]: the uncond rows carry the negative embeddings
    assert seen[0].shape[0] == 2 * B and torch.equal(seen[0][:B], neg)
    assert seen[1].shape[0] == B  # threshold -1: switched after call 0, conditional rows only
    assert not torch.equal(a, b)  # another negative prompt changes the images


def test_unknown_pipeline_is_a_clear_error():
    class OtherPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(HastenError, match="do not know how OtherPipeline"):
        accelerate(OtherPipeline(), AdaptiveGuidance())


def test_calibration_runs_on_a_class_conditional_diffusers_pipeline():
    """DiTPipeline takes class_labels=, not prompt=: calibration calls it the way it takes its conditions."""
    import hasten

    pipe, _ = build_dit()
    pipe.set_progress_bar_config(disable=True)
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), labels=list(range(8)), seeds=(1, 2), steps=STEPS,
                            guidance_scale=4.0)
    assert plan["calls"] == STEPS and plan["scheduler"]["class"] == "DDIMScheduler" and plan["guidance_scale"] == 4.0
    ag = hasten.calibrate(pipe, AdaptiveGuidance(min_psnr=20.0), labels=list(range(8)), seeds=(1, 2), steps=STEPS,
                          guidance_scale=4.0)
    assert ag["calibration"]["met"] and ag["threshold"] <= 2.0
    with accelerate(pipe, hasten.BlockCache(plan=plan), AdaptiveGuidance(plan=ag)) as h:
        pipe(class_labels=[1, 2], num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt")
        assert h.report()["runs"] == 1
