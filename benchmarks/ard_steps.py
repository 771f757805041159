"""Where the ARD student loses adherence: its steps swapped one part at a time with the teacher's.

    python benchmarks/ard_steps.py --ard shapes-ard4 --out benchmarks/ard_shapes/steps

The student's 4 steps follow the teacher's 25-step Euler CFG trajectory at its kept points (sigma 1 ->
0.58 -> 0.38 -> 0.17 -> 0, teacher steps 0, 10, 15, 20, 25). On the ARD bench's captions and noise, five
hybrids of the two:

- ``teacher``: the 25 teacher steps (what the student was distilled from);
- ``student``: the student's 4 passes (its own history);
- ``student step 1, then teacher``: the student's first pass, then teacher steps 11-25 from its state;
- ``teacher to 0.58, then student``: teacher steps 1-10, then the student's passes 2-4, its history the
  noise and the teacher's state (what it was trained on, teacher-forced);
- ``teacher to 0.38, then student``: teacher steps 1-15, then the student's passes 3-4.

If the student's steps 2-4 are good on the teacher's states but poor on its own, the loss is the
compounding of errors that teacher-forced training never sees (exposure bias), which ARD's history is meant
to reduce. Each hybrid's differences to the full student carry 95% paired-bootstrap intervals. Writes
results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch

import hasten
from hasten.distill.trajectories import check_eval_noise
from hasten.eval.bench import machine_info
from hasten.eval.bench_shapes import EvalSet
from hasten.eval.shapes_eval import paired_bootstrap, rounded_difference, score_images
from hasten.io import write_json

TEACHER_STEPS = 25


def student_from(student, d0: int, x: torch.Tensor, history: list[torch.Tensor], text: torch.Tensor,
                 pooled: torch.Tensor, until: int | None = None) -> torch.Tensor:
    """The ARD student's passes d0..until-1 (default: to the end) from state ``x`` at its kept sigma d0; the KV
    cache of the lower blocks is first filled with passes 0..d0-1 on the inputs ``history`` (outputs unused)."""
    dt_, until = student.step_sizes(), student.steps if until is None else until
    with student.kv_cache():
        for d in range(d0):
            student(history[d], text, pooled, group=d)
        for d in range(d0, until):
            x = x + dt_[d] * student(x, text, pooled, group=d).float()
    return x


def teacher_run(teacher, prompts: list[str], noise: torch.Tensor, swap_at: int | None = None,
                swap: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The teacher's Euler CFG steps: (final latent, {steps done: state}); with ``swap_at``, the state after that
    many steps is replaced by ``swap`` (diffusers' callback convention) and the teacher continues from it."""
    states: dict[int, torch.Tensor] = {}

    def callback(_pipe, j: int, _t, kw: dict) -> dict:
        if j + 1 == swap_at:
            kw = {"latents": swap}
        states[j + 1] = kw["latents"].clone()
        return kw

    final = teacher(prompts, num_inference_steps=TEACHER_STEPS, latents=noise, output_type="latent",
                    callback_on_step_end=callback).images
    return final, states


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ard", default="shapes-ard4")
    ap.add_argument("--out", default="benchmarks/ard_shapes/steps")
    ap.add_argument("--samples", type=int, default=400, help="the ARD bench's captions and noise (seed 0)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--noise-seed", type=int, default=1, help="initial noise (see ard_shapes.py)")
    args = ap.parse_args()
    teacher = hasten.load_pipeline("shapes")
    teacher.set_progress_bar_config(disable=True)
    ard = hasten.load_pipeline(args.ard)
    check_eval_noise(args.noise_seed, [ard])
    student = ard.student
    data = EvalSet(teacher, args.samples, seed=args.noise_seed)
    teacher.scheduler.set_timesteps(TEACHER_STEPS)
    sigmas = teacher.scheduler.sigmas.float()
    kept = [int(torch.argmin((sigmas - s).abs())) for s in student.sigmas.tolist()]  # teacher step per kept point
    if not torch.allclose(sigmas[kept], student.sigmas, atol=1e-4):
        raise SystemExit(f"the student's kept sigmas {student.sigmas.tolist()} are not on the teacher's "
                         f"{TEACHER_STEPS}-step schedule")
    s1, s2 = student.sigmas[1].item(), student.sigmas[2].item()
    names = ["teacher", "student", "student step 1, then teacher", f"teacher to {s1:.2f}, then student",
             f"teacher to {s2:.2f}, then student"]
    latents: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for i in range(0, args.samples, args.batch_size):
        prompts, noise = data.prompts[i:i + args.batch_size], data.noise[i:i + args.batch_size].float()
        text, pooled = teacher.encode_prompt(prompts)
        final, states = teacher_run(teacher, prompts, noise)
        latents["teacher"].append(final)
        latents["student"].append(student.sample(noise, text, pooled))
        x1 = student_from(student, 0, noise, [], text, pooled, until=1)
        latents["student step 1, then teacher"].append(teacher_run(teacher, prompts, noise, kept[1], x1)[0])
        latents[names[3]].append(
            student_from(student, 1, states[kept[1]], [noise], text, pooled))
        latents[names[4]].append(
            student_from(student, 2, states[kept[2]], [noise, states[kept[1]]], text, pooled))
    rows, per_image = [], {}
    for name in names:
        q = score_images(data.scenes, teacher.to_output(torch.cat(latents[name]), "pt"), per_image=True)
        per_image[name] = q["per_image"]
        rows.append({"name": name, "fd_shapes": round(q["fd_shapes"], 4), "adherence": round(q["adherence"], 4),
                     "adherence_per_category": q["adherence_per_category"]})
        print(f"{name:<34} FD {q['fd_shapes']:8.3f}  adherence {q['adherence']:.3f}", flush=True)
    versus = {}
    for name in names:
        if name != "student":
            versus[name] = rounded_difference(paired_bootstrap(per_image[name], per_image["student"]))
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "samples": args.samples, "ard": str(args.ard), "kept_sigmas": student.sigmas.tolist(),
           "kept_teacher_steps": kept, "guidance_scale": teacher.default_guidance_scale,
           "records": rows, "minus_student": versus}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    print(json.dumps(versus, indent=2))


if __name__ == "__main__":
    main()
