"""Ship an ARD student (`hasten distill ard`) as the embedded `shapes-ard4`, with its model card.

    python scripts/make_ard_model.py --from-run runs/ard/n2 --data runs/ard/traj \
        --bench benchmarks/ard_shapes/results.json

Copies ``ard_config.json`` and ``student.safetensors`` into ``src/hasten/models/shapes_ard4``, checks that
``hasten.load_pipeline("shapes-ard4")`` loads it and samples exactly what the run's weights sample, and
writes ``loss_curve.png`` and ``MODEL_CARD.md`` (config, data, seed, training time against the base
model's, loss curve, and the figures of ``--bench``, measured on the run's weights) and the check metrics
that ``tests/test_shipped_models.py`` re-runs.

    python scripts/make_ard_model.py --metrics-only --bench benchmarks/ard_shapes/results.json

rewrites only the card's metrics section from a newer bench of the shipped weights (the run folder is not
needed; the weights, the training record and the check metrics stay as they are).

A run that started from an earlier student (``hasten distill ard --init``) is a second stage: pass the
earlier student's card with ``--stage1-card``; the new card keeps its commands and training record.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from card_check import check_bench_weights, ship_run, write_check  # scripts/ is on sys.path when this script runs
from make_default_model import plot_loss

from hasten.io import atomic_write

NAME = "shapes-ard4"
CARD_IN_REPO = "src/hasten/models/shapes_ard4/MODEL_CARD.md"  # the shipped card, as git names it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", type=Path)
    ap.add_argument("--data", type=Path, help="the trajectories the run trained on")
    ap.add_argument("--bench", required=True, type=Path)
    ap.add_argument("--metrics-only", action="store_true", help="only rewrite the card's metrics section")
    ap.add_argument("--stage1-card", type=Path, help="the card of the student a second-stage run started from")
    args = ap.parse_args()
    if args.metrics_only:
        update_metrics(args.bench)
        return
    if args.from_run is None or args.data is None:
        ap.error("--from-run and --data are needed unless --metrics-only")
    run = args.from_run
    stage1 = None
    if json.loads((run / "ard_config.json").read_text()).get("init"):
        if args.stage1_card is None:
            ap.error(f"{run} started from another student (--init): pass that student's card with --stage1-card")
        stage1 = first_stage(args.stage1_card.read_text(), args.data)
        stage1["commit"] = commit_of(args.stage1_card, CARD_IN_REPO)
    shipped = ship_run(run, NAME, "ard_config.json")
    dest, cfg, log, share = shipped.dest, shipped.cfg, shipped.log, shipped.share
    blocks = len(shipped.pipe.transformer.transformer_blocks)
    man = json.loads((args.data / "trajectories.json").read_text())
    plot_loss(log["curve"], dest / "loss_curve.png", "mean of the 4 per-step MSEs", f"{NAME}: ARD training")
    res = json.loads(args.bench.read_text())
    check_bench_weights(res, shipped.pipe.student, args.bench)
    size = shipped.size_mb
    points = shipped.loss_points(5)
    tc = log["config"]
    n = cfg.get("trajectories", man["n"])  # what the run trained on (the folder may have grown since)
    trajectories = (f"hasten distill trajectories --teacher {man['teacher']} --steps {man['steps']} "
                    f"--keep {man['keep']} \\\n    --n {n} --out {args.data}")
    ard = (f"hasten distill ard --teacher {man['teacher']} --data {args.data} "
           f"--layers-with-history {cfg['layers_with_history']} \\\n   ")
    if stage1:
        reproduce = (f"{stage1['commands']}\n{trajectories}   # {n - stage1['n']} more trajectories (new seeds) in "
                     f"the same folder\n{ard} --init {stage1['run']} --out {run} --steps {tc['steps']} --batch-size "
                     f"{tc['batch_size']} \\\n    --lr {tc['lr']:g} --warmup {tc['warmup']}   # stage 2")
    else:
        reproduce = (f"{trajectories}\n{ard} --out {run} --steps {tc['steps']} --batch-size {tc['batch_size']} "
                     f"--lr {tc['lr']:g}   # re-running resumes")
    stage1_note = "" if stage1 is None else (
        f"- Two stages. Stage 1: the first {stage1['n']} trajectories, config `{stage1['config']}`; "
        f"{stage1['time']} (its card: `git show {stage1['commit']}:{CARD_IN_REPO}`). "
        f"Stage 2 (below) starts from stage 1's EMA weights (`--init`) on all {n}.\n")
    native = "bf16 autocast where the CPU has native bf16, else float32"
    autocast = {True: "bf16 autocast", False: "float32"}.get(tc.get("bf16_autocast"), native)
    stage = " (stage 2)" if stage1 else ""
    last = f"step {log['curve'][-1]['step']}: {log['curve'][-1]['loss']:.5f}"
    card = f"""# {NAME}: a 4-step ARD student of `{cfg['base']}`

ARD (autoregressive distillation, Kim et al., CVPR 2025; `hasten.distill.ard`): `{cfg['base']}`'s transformer
with every step's history in one sequence (token-wise time per step), block-causal attention across steps in
the lower {cfg['layers_with_history']} of its {blocks} blocks, one output
head per step, sampled in 4 passes with a KV cache. Guidance ({cfg['guidance_scale']:g}) is distilled in: one
branch per step. {size:.1f} MB; the VAE and text encoder are `{cfg['base']}`'s.

```python
import hasten
pipe = hasten.load_pipeline("{NAME}")          # same call signature as "{cfg['base']}", 4 steps
images = pipe(["a red circle to the left of a blue square"]).images
```
CLI: `hasten generate --model {NAME} --prompt "a red circle"`.

## Reproduce
```
{reproduce}
python scripts/make_ard_model.py --from-run {run} --data {args.data} --bench {args.bench}{
    f" --stage1-card {args.stage1_card}" if stage1 else ""}
```

## Training
{stage1_note}- Data: {n} teacher trajectories (Euler {man['steps']} steps, CFG {man['guidance_scale']:g}, captions from
  the scene grammar at seeds {man['caption_seed0']}+i, noise seed i), states kept after teacher steps
  {man['kept_indices']} (sigmas {[round(x, 4) for x in cfg['sigmas']]}).
- Config: `{json.dumps(tc)}`; base VAE fingerprint `{cfg['base_vae']}` (a different `{cfg['base']}` is refused).
- Loss: teacher-forced, mean over the 4 steps of the MSE to the teacher's next state; AdamW, gradient
  clipping 1, EMA {tc['ema_decay']}, {autocast}.
- Time{stage}: {share}.
- Loss{stage} (`loss_curve.png`): {points}, {last}.

{metrics_section(res, args.bench)}"""
    atomic_write(dest / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card))
    write_check(shipped.pipe)
    print((dest / "MODEL_CARD.md").read_text())


def commit_of(card: Path, path: str) -> str:
    """The newest commit whose ``path`` is byte for byte ``card`` (where the first stage's card can be read)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()

    blob = git("hash-object", str(card))
    for commit in git("log", "--format=%h", "--", path).split():
        if git("rev-parse", f"{commit}:{path}") == blob:
            return commit
    raise SystemExit(f"{card} is not a committed version of {path}")


def first_stage(card: str, data: Path) -> dict:
    """What a second-stage card keeps of the first stage's card (written by this script): its commands (the
    data folder renamed to ``data``), trajectory count, config and training time."""
    block = card.split("## Reproduce\n```\n")[1].split("```")[0]
    lines = [ln for ln in block.splitlines() if ln and not ln.startswith("python scripts/make_ard_model.py")]
    old_data, run = [ln.split("--out ")[1].split()[0] for ln in lines if "--out " in ln][:2]  # in command order
    commands = "\n".join(lines).replace(old_data, str(data)).replace("# re-running resumes", "# stage 1")
    n = int(block.split("--n ")[1].split()[0])
    config = card.split("- Config: `")[1].split("`")[0]
    time = card.split("- Time: ")[1].split("\n")[0].rstrip(".")
    return {"commands": commands, "run": run, "n": n, "config": config, "time": time}


def metrics_section(res: dict, bench: Path) -> str:
    """The card's "## Metrics" section from an ARD bench's results (with or without an N = 0 student)."""
    s = res["summary"]
    n0 = "step_distillation_fd_degradation" in s
    rows = "\n".join(f"| {r['name']} | {r['nfe']} | {r['fd_shapes']:.2f} | {r['adherence']:.3f} |"
                     for r in res["records"])
    seed = res.get("noise_seed", 0)
    noise = ("the noise of the students' training trajectories, with other captions" if seed == 0
             else "noise no student trained on")
    text = f"""## Metrics (`{bench}`, {res['samples']} held-out captions, {res['date'][:10]},
{res['machine'].get('cpu')} {res['machine'].get('cores')} cores; evaluation noise seed {seed}: {noise})

| configuration | NFE | FD-shapes | adherence |
|---|---:|---:|---:|
{rows}

"""
    if n0:
        text += (f"- FD degradation against the 25-step teacher: ARD {s['ard_fd_degradation']:+.2f}, step distillation "
                 f"(N = 0,\n  same data and budget) {s['step_distillation_fd_degradation']:+.2f}.\n"
                 f"- Adherence: ARD {s['ard_adherence_drop_points']:.1f} points below the teacher, N = 0\n"
                 f"  {s['step_distillation_adherence_drop_points']:.1f}.\n")
    else:
        text += (f"- FD degradation against the 25-step teacher: ARD {s['ard_fd_degradation']:+.2f}. No N = 0 student "
                 "in this run (`--step-distill none`): the FD target is not evaluated here.\n"
                 f"- Adherence: ARD {s['ard_adherence_drop_points']:.1f} points below the teacher (target: at most 5: "
                 f"{'met' if s['target_adherence_within_5_points_met'] else 'not met'}).\n")
    text += (f"- Extra FLOPs over N = 0: {100 * s['ard_extra_flops_over_n0']:.2f}%. End-to-end speed-up over the "
             f"50-step CFG\n  default: {s['speedup_ard_vs_default']}x.\n")
    pairs = [("ARD minus teacher", "ard_minus_teacher"), ("N = 0 minus teacher", "step_distillation_minus_teacher"),
             ("ARD minus N = 0", "ard_minus_step_distillation")]
    text += "".join(f"- {label}: FD-shapes {v['fd']:+.2f} {v['fd_ci95']}, adherence {v['adherence_points']:+.2f} "
                    f"points {v['adherence_points_ci95']} (95% paired-bootstrap intervals).\n"
                    for label, key in pairs if (v := s.get(key)) is not None)
    if n0 and "ard_fd_to_teacher" in s:
        f = s["ard_minus_step_distillation_fidelity"]
        text += (f"- Fidelity to the 25-step teacher (its images from the same captions and noise): FD to its samples "
                 f"ARD {s['ard_fd_to_teacher']:.3f}, N = 0 {s['step_distillation_fd_to_teacher']:.3f} (ratio "
                 f"{s['ard_fd_to_teacher_over_n0']}); PSNR against its images ARD {s['ard_psnr_vs_teacher']:.2f} dB, "
                 f"N = 0 {s['step_distillation_psnr_vs_teacher']:.2f} dB; ARD minus N = 0: FD to the teacher "
                 f"{f['fd_to_teacher']:+.3f} {f['fd_to_teacher_ci95']}, PSNR {f['psnr_vs_teacher_db']:+.3f} dB "
                 f"{f['psnr_vs_teacher_db_ci95']}.\n"
                 f"- The FD target (ARD's degradation at most half of N = 0's, read on {s['fd_target_reading']}): "
                 f"{'met' if s['target_fd_half_of_n0_met'] else 'not met'}.\n")
    elif "ard_fd_to_teacher" in s:
        text += (f"- Fidelity to the 25-step teacher (its images from the same captions and noise): FD to its samples "
                 f"{s['ard_fd_to_teacher']:.3f}, PSNR against its images {s['ard_psnr_vs_teacher']:.2f} dB.\n")
    return text


def update_metrics(bench: Path) -> None:
    """Replace the metrics section of the shipped card (up to "## Check") with one from ``bench``."""
    from hasten.pipeline import EMBEDDED

    card = EMBEDDED[NAME] / "MODEL_CARD.md"
    text = card.read_text()
    a, b = text.index("## Metrics"), text.index("## Check")
    new = text[:a] + metrics_section(json.loads(bench.read_text()), bench) + "\n" + text[b:]
    atomic_write(card, lambda tmp: Path(tmp).write_text(new))
    print(new)


if __name__ == "__main__":
    main()
