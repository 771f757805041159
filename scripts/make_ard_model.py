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

A run that started from the shipped student (``hasten distill ard --init shapes-ard4``) is a later training
stage: the folder's ``training_stages.json`` keeps every stage's trajectory count, command, config and time,
and the new card lists them all (its commands re-run the stages in order).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from card_check import check_bench_weights, ship_run, write_check  # scripts/ is on sys.path when this script runs
from make_default_model import plot_loss

from hasten.io import atomic_write, write_json

NAME = "shapes-ard4"
CARD_IN_REPO = "src/hasten/models/shapes_ard4/MODEL_CARD.md"  # the shipped card, as git names it
STAGES_FILE = "training_stages.json"  # every training stage's data, command, config and time, oldest first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", type=Path)
    ap.add_argument("--data", type=Path, help="the trajectories the run trained on")
    ap.add_argument("--bench", required=True, type=Path)
    ap.add_argument("--metrics-only", action="store_true", help="only rewrite the card's metrics section")
    args = ap.parse_args()
    if args.metrics_only:
        update_metrics(args.bench)
        return
    if args.from_run is None or args.data is None:
        ap.error("--from-run and --data are needed unless --metrics-only")
    run = args.from_run
    earlier = earlier_stages(json.loads((run / "ard_config.json").read_text()).get("init"))
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
    init = f" --init {NAME}" if earlier else ""  # the shipped student: earlier_stages reads its record
    stage = {"stage": len(earlier) + 1, "trajectories": n, "data": str(args.data), "run": str(run),
             "commands": (f"hasten distill trajectories --teacher {man['teacher']} --steps {man['steps']} "
                          f"--keep {man['keep']} \\\n    --n {n} --out {args.data}\n"
                          f"hasten distill ard --teacher {man['teacher']} --data {args.data} "
                          f"--layers-with-history {cfg['layers_with_history']} \\\n   {init} --out {run} "
                          f"--steps {tc['steps']} --batch-size {tc['batch_size']} \\\n    --lr {tc['lr']:g} "
                          f"--warmup {tc['warmup']}"),
             "config": tc, "time": share}
    stages = [*earlier, stage]
    write_json(dest / STAGES_FILE, stages)
    stages_note = "" if not earlier else (
        f"- {len(stages)} stages, each from the previous one's EMA weights (`--init`); the trajectory folder grows "
        "between them (new seeds) and each stage trains on all of it:\n" + "".join(
            f"  - Stage {s['stage']}: {s['trajectories']} trajectories, config `{json.dumps(s['config'])}`; "
            f"{s['time']} (its card: `git show {s['card']}:{CARD_IN_REPO}`).\n" for s in earlier)
        + f"  - Stage {stage['stage']}: below.\n")
    native = "bf16 autocast where the CPU has native bf16, else float32"
    autocast = {True: "bf16 autocast", False: "float32"}.get(tc.get("bf16_autocast"), native)
    which = f" (stage {stage['stage']})" if earlier else ""
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

{reproduce_section(stages, args.bench)}

## Training
{stages_note}- Data: {n} teacher trajectories (Euler {man['steps']} steps, CFG {man['guidance_scale']:g}, captions from
  the scene grammar at seeds {man['caption_seed0']}+i, noise seed i), states kept after teacher steps
  {man['kept_indices']} (sigmas {[round(x, 4) for x in cfg['sigmas']]}).
- Config: `{json.dumps(tc)}`; base VAE fingerprint `{cfg['base_vae']}` (a different `{cfg['base']}` is refused).
- Loss: teacher-forced, mean over the 4 steps of the MSE to the teacher's next state; AdamW, gradient
  clipping 1, EMA {tc['ema_decay']}, {autocast}.
- Time{which}: {share}.
- Loss{which} (`loss_curve.png`): {points}, {last}.

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


def earlier_stages(init: str | None) -> list[dict]:
    """The training stages before this run's: none for a run from the teacher; for a run that started from
    the shipped student (``--init shapes-ard4``), that student's record, its last stage pointed at the
    committed card that describes it."""
    if init is None:
        return []
    from hasten.pipeline import EMBEDDED

    record = EMBEDDED[NAME] / STAGES_FILE
    if init != NAME or not record.is_file():
        raise SystemExit(f"the run started from {init!r}: a later stage must start from the shipped {NAME} "
                         f"(--init {NAME}), whose {STAGES_FILE} records the stages before it")
    stages = json.loads(record.read_text())
    stages[-1].setdefault("card", commit_of(EMBEDDED[NAME] / "MODEL_CARD.md", CARD_IN_REPO))
    return stages


def reproduce_section(stages: list[dict], bench: Path) -> str:
    """The card's "## Reproduce" section: each stage's commands (re-running one resumes it); between stages,
    the bench and the shipping of that stage's weights, since the next stage starts from the shipped student."""
    lines = []
    for s in stages:
        lines.append(s["commands"] + f"   # stage {s['stage']}")
        out = bench
        if s is not stages[-1]:
            out = Path(f"runs/ard/bench_stage{s['stage']}/results.json")
            lines.append(f"python benchmarks/ard_shapes.py --ard {s['run']} --step-distill none --samples 1200 "
                         f"--out {out.parent}")
        lines.append(f"python scripts/make_ard_model.py --from-run {s['run']} --data {s['data']} --bench {out}")
    return "## Reproduce\n```\n" + "\n".join(lines) + "\n```"


def metrics_section(res: dict, bench: Path) -> str:
    """The card's "## Metrics" section: the bench's own ``results.md`` (written beside ``results.json`` by
    benchmarks/ard_shapes.py; it names the evaluation noise) under a heading with the file and the machine."""
    body = (bench.parent / "results.md").read_text().split("\n", 1)[1]  # without its own title line
    machine = f"{res['machine'].get('cpu')} {res['machine'].get('cores')} cores"
    return f"## Metrics (`{bench}`, {res['date'][:10]}, {machine})\n{body}"


def update_metrics(bench: Path) -> None:
    """Replace the metrics section of the shipped card (up to "## Check") with one from ``bench``, and its
    reproduce section with one rendered from the shipped ``training_stages.json``."""
    from hasten.pipeline import EMBEDDED

    card = EMBEDDED[NAME] / "MODEL_CARD.md"
    text = card.read_text()
    stages = json.loads((EMBEDDED[NAME] / STAGES_FILE).read_text())
    r0, r1 = text.index("## Reproduce"), text.index("## Training")
    text = text[:r0] + reproduce_section(stages, bench) + "\n\n" + text[r1:]
    a, b = text.index("## Metrics"), text.index("## Check")
    new = text[:a] + metrics_section(json.loads(bench.read_text()), bench) + "\n" + text[b:]
    atomic_write(card, lambda tmp: Path(tmp).write_text(new))
    print(new)


if __name__ == "__main__":
    main()
