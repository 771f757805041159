"""The Movie Gen flow-matching recipe lowers the loss on a tiny config."""

import torch

from hasten.train import TrainConfig, digits_transformer_config, flow_matching_loss, train


def test_a_few_training_steps_lower_the_loss():
    cfg = digits_transformer_config(num_layers=1, num_attention_heads=2, attention_head_dim=8, norm_num_groups=16)
    x = torch.randn(16, 1, 16, 16).clamp(-1, 1)
    y = torch.arange(16) % 10
    log = train(None, TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup=5, log_every=10, label_dropout=0.0),
                model_config=cfg, progress=False, data=(x, y))
    model = log["model"]
    fresh = train(None, TrainConfig(steps=1, batch_size=16, warmup=1, log_every=1), model_config=cfg,
                  progress=False, data=(x, y))["model"]
    losses = {}
    for name, m in (("trained", model), ("fresh", fresh)):
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            losses[name] = sum(flow_matching_loss(m, x, y, 10, 0.0, g).item() for _ in range(8)) / 8
    assert losses["trained"] < 0.8 * losses["fresh"], losses
    assert log["loss_curve"][-1]["loss"] < log["loss_curve"][0]["loss"]


def test_label_dropout_uses_null_class():
    cfg = digits_transformer_config(num_layers=1, num_attention_heads=2, attention_head_dim=8, norm_num_groups=16)
    seen = []
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(**cfg)
    orig = m.forward

    def spy(*a, **k):
        seen.append(k["class_labels"].clone())
        return orig(*a, **k)

    m.forward = spy
    x = torch.zeros(200, 1, 16, 16)
    flow_matching_loss(m, x, torch.zeros(200, dtype=torch.long), 10, 0.5, torch.Generator().manual_seed(0))
    frac = (seen[0] == 10).float().mean().item()
    assert 0.35 < frac < 0.65 and set(seen[0].tolist()) <= {0, 10}
