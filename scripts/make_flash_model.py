"""Ship an Imagine Flash student (`hasten distill imagine-flash`) as the embedded `shapes-flash`, with its card.

    python scripts/make_flash_model.py --from-run runs/flash/A --bench benchmarks/flash_shapes/results.json

Copies ``flash_config.json`` and ``student.safetensors`` into ``src/hasten/models/shapes_flash``, checks that
``hasten.load_pipeline("shapes-flash")`` samples exactly what the run's weights sample, writes
``loss_curve.png`` and ``MODEL_CARD.md`` (recipe, data, seed, training time against the base model's, loss
curve, the figures of ``--bench``) and the check metrics that ``tests/test_shipped_models.py`` re-runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from card_check import check_bench_weights, ship_run, write_check  # scripts/ is on sys.path when this script runs
from make_default_model import plot_loss

from hasten.distill.flash import CAPTION_SEED0
from hasten.io import atomic_write

NAME = "shapes-flash"


def command(run: Path | str, base: str, steps: int, tc: dict) -> str:
    """The ``hasten distill imagine-flash`` command of a run with training config ``tc``."""
    flags = ("--backward" if tc["backward"] else "--forward") + ("" if tc["srl"] else " --no-srl")
    extra = f" --tau-min {tc['tau_min']:g}" if tc.get("tau_min") else ""
    extra += "" if tc.get("step_draw", "count") == "count" else f" --step-draw {tc['step_draw']}"
    extra += f" --init {tc['init']}" if tc.get("init") else ""
    extra += f" --cfg {tc['guidance_scale']:g}" if tc.get("guidance_scale") is not None else ""
    extra += f" --caption-offset {tc['caption_offset']}" if tc.get("caption_offset") else ""
    extra += (f" --cfg-interval {tc['guidance_interval'][0]:g},{tc['guidance_interval'][1]:g}"
              if tc.get("guidance_interval") else "")
    return (f"hasten distill imagine-flash --teacher {base} --steps {steps} --out {run} {flags} \\\n"
            f"    --train-steps {tc['steps']} --batch-size {tc['batch_size']} --lr {tc['lr']:g} "
            f"--tau-max {tc['tau_max']:g} \\\n    --srl-noise {tc['srl_noise']} --teacher-steps {tc['teacher_steps']}"
            f"{extra}")


def ci(diff: dict, key: str) -> str:
    """``; 95% interval [lo, hi]`` of a paired-bootstrap difference, or nothing when the bench had none."""
    return f"; 95% interval [{diff[key][0]:+.2f}, {diff[key][1]:+.2f}]" if key in diff else ""


def earlier_stages(tc: dict) -> list[tuple[str, dict, float]]:
    """The runs a ``--init`` chain started from, first stage first: (folder, training config, seconds)."""
    stages, init = [], tc.get("init")
    while init:
        log = json.loads((Path(init) / "train_log.json").read_text())
        stages.insert(0, (init, log["train_config"], log["train_seconds"]))
        init = log["train_config"].get("init")
    return stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", required=True, type=Path)
    ap.add_argument("--bench", required=True, type=Path)
    ap.add_argument("--note", default="", help="a paragraph for the Metrics section (how this stage was chosen, "
                    "figures on other captions)")
    args = ap.parse_args()
    run = args.from_run
    shipped = ship_run(run, NAME, "flash_config.json")
    dest, cfg, log, share = shipped.dest, shipped.cfg, shipped.log, shipped.share
    tc = log["config"]
    plot_loss(log["curve"], dest / "loss_curve.png", "distillation MSE", f"{NAME}: Imagine Flash training")
    res = json.loads(args.bench.read_text())
    if res.get("head_to_head"):
        raise SystemExit(f"{args.bench} is a --head-to-head run (no teacher rows): give the full bench's results")
    check_bench_weights(res, shipped.pipe.student, args.bench)
    s = res["summary"]
    size = shipped.size_mb
    points = shipped.loss_points(4)
    rows = "\n".join(f"| {r['name']}{' *' if r.get('carried_from') else ''} | {r['nfe']} | {r['fd_shapes']:.2f} | "
                     f"{r['adherence']:.3f} | {r['diversity']:.3f} |" for r in res["records"])
    carried = sorted({r["carried_from"][:10] for r in res["records"] if r.get("carried_from")})
    carried = (f"\n\n\\* carried from the run of {', '.join(carried)} (`--carry-from`: same captions and noise, its "
               "teacher row reproduced exactly; those students' folders are gone)." if carried else "")
    steps = max(cfg["step_counts"])
    stages = earlier_stages(tc)
    commands = "\n".join(command(r, cfg["base"], steps, c) + "   # re-running resumes" for r, c, _ in stages)
    commands += ("\n" if stages else "") + command(run, cfg["base"], steps, tc) + "   # re-running resumes"
    if stages:
        total = sum(t for _, _, t in stages) + log["seconds"]
        share += "; before it, " + ", ".join(f"{t / 60:.1f} min for {r}" for r, _, t in stages) + (
            f" ({total / 60:.1f} min in all)")
    draw = "every (K, d) pair equally often" if tc.get("step_draw") == "step" else "K uniform, then d"
    last = " (last stage)" if stages else ""
    lo, hi = tc.get("tau_min", 0.0), tc["tau_max"]
    tau = f"{hi:g} sigma" if not lo else f"{lo:g} + {hi - lo:g} sigma"
    chain = [(r, c) for r, c, _ in stages] + [(run, tc)]
    spans = [(r, c.get("caption_offset", 0), c.get("caption_offset", 0) + c["steps"] * c["batch_size"])
             for r, c in chain]
    revisit = ("\n  Training captions per stage (grammar caption indices): " + ", ".join(
        f"`{r}` {lo}-{hi - 1}" for r, lo, hi in spans) + "; a stage whose range overlaps an earlier one's "
        "revisits those captions (with new inputs: the student's own states)." if stages else "")
    stage_lines = "".join(f"- Stage {i + 1} (`{r}`, whose weights start the next stage): `{json.dumps(c)}`.\n"
                          for i, (r, c, _) in enumerate(stages))
    gi = tc.get("guidance_interval")
    interval = (f" (this stage: guidance only at {gi[0]:g} < sigma <= {gi[1]:g}, the conditional velocity "
                "elsewhere; `--cfg-interval`)") if gi else ""
    best = s["vs_each_3_step_baseline"][s["best_3_step_baseline_by_fd"]]
    clearly = ("" if "clearly_better_than_every_3_step_baseline" not in s else
               "\n  Clearly better than every 3-step baseline (both 95% intervals in the student's favour;\n"
               f"  `clearly_better_than_every_3_step_baseline`): "
               f"{'yes' if s['clearly_better_than_every_3_step_baseline'] else 'no'}.")
    card = f"""# {NAME}: a 1-3 step Imagine Flash student of `{cfg['base']}`

Imagine Flash (Kohler et al. 2024; `hasten.distill.flash`): a copy of `{cfg['base']}`'s transformer trained by
backward distillation (its inputs come from its own few-step schedule run from pure noise) with the Shifted
Reconstruction Loss. One network samples in {', '.join(map(str, cfg['step_counts']))} steps (uniform in sigma,
Euler); guidance ({cfg['guidance_scale']:g}) is distilled in: one branch per step. {size:.1f} MB; the VAE and
text encoder are `{cfg['base']}`'s.

```python
import hasten
pipe = hasten.load_pipeline("{NAME}")          # same call signature as "{cfg['base']}", 3 steps by default
images = pipe(["a red circle to the left of a blue square"], num_inference_steps=2).images
```
CLI: `hasten generate --model {NAME} --prompt "a red circle" --steps 3`.

## Reproduce
```
{commands}
python scripts/make_flash_model.py --from-run {run} --bench {args.bench}
```

## Training
- Data: no images. Captions from the scene grammar at seeds {CAPTION_SEED0} + step x batch + i (disjoint from
  the base model's training scenes and the held-out evaluation captions), their MiniLM embeddings, Gaussian
  noise; each row draws a step count K and a step d < K ({draw}), and its
  input is the student's own state after d of its K Euler steps (no gradient).{revisit}
- Target (SRL): the student's clean prediction re-noised to tau = {tau} with
  {'the sample' + "'" + 's own starting noise' if tc['srl_noise'] == 'trajectory' else 'fresh noise'}, then
  denoised by the teacher with CFG {cfg['guidance_scale']:g}{interval} in {tc['teacher_steps']} Euler step(s); MSE.
{stage_lines}- Config{last}: `{json.dumps(tc)}`; base VAE fingerprint `{cfg['base_vae']}`
  (a different `{cfg['base']}` is refused).
- AdamW, cosine schedule with warm-up, gradient clipping 1, EMA {tc['ema_decay']}; seed {tc['seed']}.
- Time: {share}.
- Loss (`loss_curve.png`; it measures the gap to a target that moves with the student, so it need not fall
  steadily): {points}, step {log['curve'][-1]['step']}: {log['curve'][-1]['loss']:.4f}.

## Metrics (`{args.bench}`, {res['samples']} held-out captions, {res['date'][:10]},
{res['machine'].get('cpu')} {res['machine'].get('cores')} cores)

Diversity: mean RMS pixel distance between two images of one caption from two seeds
({res['diversity_samples']} captions); the teacher's value is the reference.

| configuration | NFE | FD-shapes | adherence | diversity |
|---|---:|---:|---:|---:|
{rows}{carried}

- 3 steps against the 50-step CFG teacher: adherence {s['adherence_drop_points_3_steps']:.2f} points below
  (target: at most 5), FD-shapes {100 * s['fd_increase_3_steps']:+.0f}% (target: at most +25%); seed diversity
  {s['diversity_ratio_3_steps']:.2f}x the teacher's.
- Against the best 3-step teacher baseline by FD ({s['best_3_step_baseline_by_fd']}): FD
  {s['vs_best_baseline_fd']:+.2f} ({'worse' if s['vs_best_baseline_fd'] > 0 else 'better'}{ci(best, 'fd_ci95')}),
  adherence {s['vs_best_baseline_adherence_points']:+.1f} points{ci(best, 'adherence_points_ci95')}.{clearly}
- Speed-up at 3 steps over the 50-step CFG teacher (sequential wall time): {s['speedup_3_steps_sequential']}x.
- Noise correction: the identity for this velocity-prediction model (derivation in `hasten/distill/flash.py`).
{chr(10) + args.note.strip() + chr(10) if args.note else ""}"""
    atomic_write(dest / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card))
    write_check(shipped.pipe)
    print((dest / "MODEL_CARD.md").read_text())


if __name__ == "__main__":
    main()
