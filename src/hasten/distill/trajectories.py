"""Teacher trajectories for step distillation: ``hasten distill trajectories``.

The teacher (a ``ShapesPipeline``, CFG at its default guidance, flow-matching Euler) runs ``steps``
steps from noise on captions drawn from the scene grammar; per sample we keep the ODE **states**
x_sigma at ``keep + 1`` points of its schedule: the initial noise (sigma = 1), ``keep - 1`` intermediate
states and the final latent (sigma = 0).

Convention: both. The states are this project's default (``hasten distill ard --convention state``): the
teacher itself reads a state at its timestep 1000 sigma, so a student built from its weights starts as the
teacher taking one big Euler step per group (a measured, sensible initialisation), and at inference the
student's history is the trajectory it integrates, the paper's "history of the ODE trajectory". The public
ARD re-implementation (DDIM, epsilon teacher) trains on the teacher's x0-predictions instead, the "denoised
samples" of the paper's abstract; those are stored too (``x0``, :func:`teacher_x0_predictions`, one more
teacher call per kept state; ``hasten distill add-x0`` adds them to an older folder, :func:`add_x0_predictions`),
since a state alone determines the next (the ODE is deterministic) and the history can only add information
to an input that has lost the noise (``hasten distill ard --convention x0``).

Kept points (:func:`kept_indices`): the ARD paper's spacing for 25 DDIM steps and 4 student steps,
indices 25 -> 15 -> 10 -> 5 -> 0, i.e. a first jump of ``steps - (keep - 1) * (steps // 5)`` steps and
then jumps of ``steps // 5`` (25 steps, keep 4: after 0, 10, 15, 20 and 25 teacher steps).

Storage: safetensors shards of ``shard_size`` samples (tensors ``text`` (n, L, 384), ``pooled`` (n, 384),
``states`` (n, keep + 1, C, H, W) with ``states[:, 0]`` the noise and ``states[:, -1]`` the final latent,
``x0`` (n, keep, C, H, W), ``seeds`` (n,), ``sigmas`` (keep + 1,); captions in the metadata). Sample i uses caption seed
``CAPTION_SEED0 + i`` and noise seed ``i``; shard k holds samples [k * shard_size, (k + 1) * shard_size).
Each shard is written to a temporary file and renamed, so re-running continues at the first missing
shard with no duplicate and no gap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import HastenError
from ..io import atomic_write, check_out_folder, write_json

CAPTION_SEED0 = 30_000_000  # disjoint from training (< 10M per seed), calibration (40M) and held-out (50M)
MANIFEST = "trajectories.json"


def kept_indices(steps: int, keep: int) -> list[int]:
    """Teacher step counts at which the state is kept: [0, first, first + d, ..., steps], d = steps // 5."""
    if keep < 1:
        raise HastenError(f"--keep must be >= 1, got {keep}")
    if steps < keep:
        raise HastenError(f"--steps ({steps}) must be >= --keep ({keep})")
    d = max(1, steps // 5) if keep > 1 else steps
    first = steps - (keep - 1) * d
    if first < 1:  # many kept points: fall back to even spacing
        return [round(i * steps / keep) for i in range(keep + 1)]
    return [0] + [first + j * d for j in range(keep)]


def check_options(out: str | Path, n: int, steps: int, keep: int, shard_size: int, batch_size: int) -> list[int]:
    """Fail on options that cannot be generated (before any model is loaded); the kept step indices."""
    if n < 1 or shard_size < 1 or batch_size < 1:
        raise HastenError("--n, --shard-size and --batch-size must be >= 1")
    keep_at = kept_indices(steps, keep)
    check_out_folder(out)
    return keep_at


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _stored(path: Path) -> int:
    """Samples in a shard (0 when absent): a last shard written for a smaller ``n`` is rewritten."""
    from safetensors import safe_open

    if not path.is_file():
        return 0
    with safe_open(str(path), "pt") as h:
        return int(h.get_slice("seeds").get_shape()[0])


def _noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def teacher_states(pipe: Any, prompts: list[str], noise: torch.Tensor, steps: int, keep_at: list[int],
                   guidance_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the teacher and return (states (B, len(keep_at), C, H, W), sigmas (len(keep_at),))."""
    kept: dict[int, torch.Tensor] = {0: noise.float().clone()} if 0 in keep_at else {}

    def grab(_pipe: Any, i: int, _t: Any, kw: dict) -> dict:
        if i + 1 in keep_at:
            kept[i + 1] = kw["latents"].float().clone()
        return kw

    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise, output_type="latent",
         callback_on_step_end=grab)
    sigmas = pipe.scheduler.sigmas.float()  # steps + 1 values, the last one 0
    return torch.stack([kept[j] for j in keep_at], 1), sigmas[keep_at].clone()


@torch.no_grad()
def teacher_x0_predictions(pipe: Any, states: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor,
                           pooled: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The teacher's guided x0-prediction ``x - sigma v`` (CFG against the "" caption, as the pipeline guides)
    at each kept state but the final latent: (B, keep, C, H, W) from ``states`` (B, keep + 1, C, H, W)."""
    from ..pipelines.shapes import encode_text
    from .flash import teacher_x0

    b, k = states.shape[0], states.shape[1] - 1
    empty = tuple(t.float() for t in encode_text(pipe.text_encoder, pipe.tokenizer, [""], warn=False))
    x0 = teacher_x0(pipe.transformer, states[:, :-1].flatten(0, 1).float(), sigmas[:-1].float().repeat(b),
                    text.float().repeat_interleave(k, 0), pooled.float().repeat_interleave(k, 0), empty,
                    float(guidance_scale))
    return x0.view(b, k, *states.shape[2:])


def generate_trajectories(pipe: Any, out: str | Path, n: int, steps: int = 25, keep: int = 4,
                          shard_size: int = 256, batch_size: int = 64, teacher: str = "shapes",
                          progress: bool = True, stop_after_shards: int | None = None) -> dict:
    """Write (or complete) ``n`` trajectories in ``out``; returns the manifest. See the module docstring.

    ``stop_after_shards`` stops after writing that many new shards (tests of the resume path).
    """
    from safetensors.torch import save_file

    from ..data.shapes import sample_scene

    keep_at = check_options(out, n, steps, keep, shard_size, batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"teacher": teacher, "steps": steps, "keep": keep, "kept_indices": keep_at,
                "guidance_scale": float(pipe.default_guidance_scale), "shard_size": shard_size,
                "caption_seed0": CAPTION_SEED0, "convention": "states", "n": n}
    old_path = out / MANIFEST
    if old_path.is_file():
        old = json.loads(old_path.read_text())
        for key in ("teacher", "steps", "keep", "guidance_scale", "shard_size"):
            if old.get(key) != manifest[key]:
                raise HastenError(f"{out} holds trajectories with {key}={old.get(key)!r}, not {manifest[key]!r}; "
                                  "use another --out")
    write_json(old_path, manifest)
    shards = (n + shard_size - 1) // shard_size
    todo = [k for k in range(shards) if _stored(out / shard_name(k)) != min(shard_size, n - k * shard_size)]
    done_samples = n - sum(min(shard_size, n - k * shard_size) for k in todo)
    bar = tqdm(total=n, initial=done_samples, disable=not progress, desc="trajectories", dynamic_ncols=True)
    for written, k in enumerate(todo):
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        idx = list(range(k * shard_size, min(n, (k + 1) * shard_size)))
        scenes = [sample_scene(CAPTION_SEED0 + i) for i in idx]
        parts: dict[str, list[torch.Tensor]] = {"text": [], "pooled": [], "states": [], "x0": []}
        for b in range(0, len(idx), batch_size):
            chunk = idx[b:b + batch_size]
            prompts = [s.caption for s in scenes[b:b + batch_size]]
            text, pooled = pipe.encode_prompt(prompts, torch.float32)
            states, sigmas = teacher_states(pipe, prompts, _noise(pipe.latent_shape, chunk), steps, keep_at)
            parts["text"].append(text)
            parts["pooled"].append(pooled)
            parts["states"].append(states)
            parts["x0"].append(teacher_x0_predictions(pipe, states, sigmas, text, pooled, manifest["guidance_scale"]))
            bar.update(len(chunk))
        tensors = {key: torch.cat(v).contiguous() for key, v in parts.items()}
        tensors["seeds"] = torch.tensor(idx, dtype=torch.int64)
        tensors["sigmas"] = sigmas
        meta = {"captions": json.dumps([s.caption for s in scenes]), "manifest": json.dumps(manifest)}
        atomic_write(out / shard_name(k), lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
    bar.close()
    return manifest


def add_x0_predictions(pipe: Any, folder: str | Path, batch_size: int = 64, first: int | None = None,
                       progress: bool = True, stop_after_shards: int | None = None) -> int:
    """Add the teacher's x0-predictions (:func:`teacher_x0_predictions`) to every shard of ``folder`` that lacks
    them (``first``: only to the shards holding the first ``first`` trajectories); each shard is rewritten
    atomically, so an interrupted run resumes at the first shard without them. Returns the number of shards
    rewritten (``stop_after_shards``: stop after that many, for tests)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    manifest = load_manifest(folder)
    files = shard_files(folder, manifest, first)
    todo = []
    for f in files:
        with safe_open(str(f), "pt") as h:
            if "x0" not in h.keys():
                todo.append(f)
    bar = tqdm(total=len(files), initial=len(files) - len(todo), disable=not progress, desc="x0-predictions",
               unit="shard", dynamic_ncols=True)
    written = 0
    for f in todo:
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        with safe_open(str(f), "pt") as h:
            tensors, meta = {key: h.get_tensor(key) for key in h.keys()}, h.metadata()
        x0 = [teacher_x0_predictions(pipe, tensors["states"][b:b + batch_size], tensors["sigmas"],
                                     tensors["text"][b:b + batch_size], tensors["pooled"][b:b + batch_size],
                                     manifest["guidance_scale"])
              for b in range(0, tensors["states"].shape[0], batch_size)]
        tensors["x0"] = torch.cat(x0).contiguous()
        atomic_write(f, lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
        written += 1
        bar.update(1)
    bar.close()
    return written


def load_manifest(folder: str | Path) -> dict:
    """The manifest of a trajectory folder (a clear error when ``folder`` holds none)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise HastenError(f"{folder} holds no trajectories ({MANIFEST} missing): run hasten distill trajectories")
    return json.loads((folder / MANIFEST).read_text())


def check_teacher(manifest: dict, folder: str | Path, teacher: str) -> None:
    """Refuse trajectories of another teacher than ``teacher`` (``--teacher``)."""
    if manifest["teacher"] != teacher:
        raise HastenError(f"{folder} holds trajectories of {manifest['teacher']!r}, not --teacher {teacher}")


def shard_files(folder: Path, manifest: dict, first: int | None = None) -> list[Path]:
    """The shards holding the folder's trajectories (``first``: its first ``first``); an error if any is missing."""
    shard_size, n = int(manifest["shard_size"]), int(manifest["n"])
    if first is not None and not 1 <= first <= n:
        raise HastenError(f"{folder} holds {n} trajectories: cannot use the first {first}")
    count = n if first is None else first
    files = [folder / shard_name(k) for k in range((count + shard_size - 1) // shard_size)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise HastenError(f"{folder} is incomplete ({len(missing)} of {len(files)} shards missing, first "
                          f"{missing[0]}): re-run hasten distill trajectories with the same options")
    return files


def load_trajectories(folder: str | Path, first: int | None = None) -> dict:
    """All shards of ``folder`` in sample order: text, pooled, states, seeds, sigmas, captions, manifest, and x0
    when every shard read holds it (a folder from before, until ``hasten distill add-x0``, has none).

    ``first``: only samples 0..first-1 (the shards that hold them), which are exactly what ``hasten distill
    trajectories --n first`` stores, since sample i depends on i alone (caption seed, noise seed i)."""
    from safetensors import safe_open

    folder = Path(folder)
    manifest = load_manifest(folder)
    shard_size, n = int(manifest["shard_size"]), int(manifest["n"])
    files = shard_files(folder, manifest, first)
    parts: dict[str, list[torch.Tensor]] = {"text": [], "pooled": [], "states": [], "seeds": [], "x0": []}
    captions: list[str] = []
    for k, f in enumerate(files):
        with safe_open(str(f), "pt") as h:  # one open per shard: its tensors and its captions
            seeds, want = h.get_tensor("seeds"), torch.arange(k * shard_size, min(n, (k + 1) * shard_size))
            if not torch.equal(seeds, want):  # a last shard from a run with a smaller --n, not yet rewritten
                raise HastenError(f"{folder} is incomplete ({f.name} holds {seeds.numel()} of its {want.numel()} "
                                  "samples): re-run hasten distill trajectories with the same options")
            for key in parts:
                if key in h.keys():
                    parts[key].append(h.get_tensor(key))
            captions += json.loads(h.metadata()["captions"])
            sigmas = h.get_tensor("sigmas")
    if len(parts["x0"]) < len(files):  # some or all shards without x0-predictions
        parts.pop("x0")
    data = {key: torch.cat(v)[:first] for key, v in parts.items()}
    data.update(sigmas=sigmas, captions=captions[:first], manifest=manifest)
    return data


def check_eval_noise(noise_seed: int, students: list) -> None:
    """Refuse an evaluation whose initial noise a student trained on: trajectory i starts from noise seed i, and
    evaluation image i from :func:`hasten.eval.shapes_eval.image_noise_seed` (noise_seed, i), so the seeds
    overlap unless image 0's is past every student's trajectory count."""
    from ..eval.shapes_eval import image_noise_seed

    seen = max((int(getattr(p, "student_config", {}).get("trajectories", 0)) for p in students), default=0)
    if image_noise_seed(noise_seed, 0) < seen:
        raise HastenError(f"noise seed {noise_seed} starts evaluation images from the noise of trajectories the "
                          f"students trained on (up to {seen}): use --noise-seed 1 or more")
