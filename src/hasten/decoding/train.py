"""Train the shipped decoding models (target LM, draft LM, judge head) on the word-problem task.

Reproduce everything (2 CPU threads, about 100 minutes; re-running resumes from ``runs/decode``)::

    python -m hasten.decoding.train --what all --out src/hasten/models/lm

* target: Llama, ~33.6M parameters, trained on all wordings (``task.TARGET_MIX``);
* draft: Llama, ~0.51M parameters, one layer, trained mostly on the draft's wording (``task.DRAFT_MIX``);
* judge: ``JudgeHead`` on the frozen target, data from ``judge_data.build_judge_dataset`` (needs the
  trained target and draft); its threshold and drafted tokens per round ``k`` are chosen on validation
  problems (``calibrate_folder``).

The sizes are chosen for the cost ratio of deployments: at batch 1 on one CPU thread a target
decoding step costs about 20x a draft step (measured by ``hasten bench-decode``, ``cost_ratio``).
Training problems are drawn fresh at every step and never equal a held-out (``test`` / ``val``)
problem. Weights are written in float16 (loaded as float32 for CPU decoding).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import HastenError
from . import task

__all__ = ["LMConfig", "TARGET", "DRAFT", "train_lm", "load_lm", "load_tokenizer", "greedy_accuracy"]

from .task import BOS, EOS, PAD, VOCAB, decode, encode

CHECKPOINTS = Path("runs/decode")  # resumable training state, outside git


@dataclass
class LMConfig:
    name: str
    hidden_size: int
    layers: int
    heads: int
    intermediate: int
    mix: tuple[float, float, float]
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 150
    seed: int = 0


# ~33.6M parameters: about 20x the draft's wall time per token at batch 1 on one CPU thread
TARGET = LMConfig("target", hidden_size=512, layers=8, heads=8, intermediate=2048, mix=task.TARGET_MIX,
                  steps=1500, batch_size=32, lr=1e-3, seed=0)
# ~0.51M parameters, ONE layer: a two-layer draft of 1.0M parameters (same recipe, 1500 steps) reached
# 99% greedy accuracy on the validation problems, as good as the target, which makes no test of a judge;
# with one layer the draft is cheap (~0.5 ms per token) and often wrong (23%), as real drafts are on hard
# tasks, while its wording and most of its digits still agree with the target's.
DRAFT = LMConfig("draft", hidden_size=192, layers=1, heads=6, intermediate=576, mix=task.DRAFT_MIX,
                 steps=1200, batch_size=32, lr=3e-3, seed=1)


def make_model(cfg: LMConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(vocab_size=len(VOCAB), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.heads, max_position_embeddings=256, tie_word_embeddings=True,
                     pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(lc)


def batch(problems: list, rng: random.Random, mix) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (prompt and padding masked with -100) for ``problems``."""
    rows, labs = [], []
    for p in problems:
        pr = encode(task.prompt_text(p))
        an = encode(task.answer_text(p, rng=rng, mix=mix)) + [EOS]
        rows.append(pr + an)
        labs.append([-100] * len(pr) + an)
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), PAD)
    lab = torch.full((len(rows), n), -100)
    for i, (r, la) in enumerate(zip(rows, labs, strict=True)):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, :len(la)] = torch.tensor(la)
    return ids, lab


def train_lm(cfg: LMConfig, out: Path, progress: bool = True, ckpt_every: int = 50,
             ckpt_dir: Path = CHECKPOINTS, bf16: bool | None = None) -> dict:
    """Train one LM (AdamW, warm-up + cosine, loss on answer tokens); resumable.

    The full training state (weights, optimiser, schedule, data RNG, loss curve) is checkpointed to
    ``ckpt_dir/<name>/state.pt`` every ``ckpt_every`` steps (written to a temporary file, then
    renamed); re-running continues from it. fp16 weights go to ``out/<name>`` at every checkpoint.
    """
    from tqdm import tqdm

    from ..io import atomic_write
    from ..train import autocast_bf16

    bf16 = autocast_bf16(bf16)
    held = task.splits()["held_out_keys"]
    model = make_model(cfg).train()
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
        * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    curve: list[dict] = []
    start, secs, ema = 0, 0.0, None
    state_file = Path(ckpt_dir) / cfg.name / "state.pt"
    if state_file.is_file():
        st = torch.load(state_file, weights_only=False)
        if st["config"] != asdict(cfg):
            raise HastenError(f"{state_file} was made with another config; delete it to start over")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        rng.setstate(st["rng"])
        start, secs, ema, curve = st["step"], st["seconds"], st["ema"], st["curve"]
        print(f"resuming {cfg.name} from step {start} ({secs:.0f} s trained)")
    t0 = time.time() - secs
    bar = tqdm(range(start, cfg.steps), desc=f"train {cfg.name}", disable=not progress,
               initial=start, total=cfg.steps)
    for step in bar:
        ids, lab = batch(task.train_problems(rng, cfg.batch_size, held), rng, cfg.mix)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0 or step == cfg.steps - 1:
            curve.append({"step": step, "loss": round(ema, 5)})
            bar.set_postfix(loss=f"{ema:.4f}")
        if (step + 1) % ckpt_every == 0 or step == cfg.steps - 1:
            st = {"config": asdict(cfg), "model": model.state_dict(), "opt": opt.state_dict(),
                  "sched": sched.state_dict(), "rng": rng.getstate(), "step": step + 1,
                  "seconds": time.time() - t0, "ema": ema, "curve": curve}
            state_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(state_file, lambda tmp, st=st: torch.save(st, tmp))
            _save(model, cfg, out, curve, time.time() - t0, step + 1, bf16)
    if start >= cfg.steps:
        _save(model, cfg, out, curve, secs, cfg.steps, bf16)
    return json.loads((out / cfg.name / "train_log.json").read_text())


def _save(model, cfg: LMConfig, out: Path, curve: list, secs: float, done: int, bf16: bool = False) -> dict:
    """Write fp16 weights + config + log to ``out/<name>`` (also used for the periodic checkpoints)."""
    from ..io import write_json

    was_training = model.training
    model.eval()
    dest = out / cfg.name
    dest.mkdir(parents=True, exist_ok=True)
    half = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}  # the fp32 weights stay as they are
    model.save_pretrained(dest, state_dict=half, safe_serialization=True)
    model.train(was_training)
    n_params = sum(p.numel() for p in model.parameters())
    log = {"config": asdict(cfg), "params": n_params, "steps_done": done, "train_seconds": round(secs, 1),
           "bf16_autocast": bf16, "threads": torch.get_num_threads(),
           "loss_curve": curve}
    write_json(dest / "train_log.json", log)
    return log


def load_tokenizer(folder: Path | None = None):
    """The shipped character tokenizer (``tokenizer.json``), or build it in code."""
    from transformers import PreTrainedTokenizerFast

    if folder is not None and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>",
                                       bos_token="<bos>", eos_token="<eos>")
    return task.build_tokenizer()


def load_lm(folder: Path):
    """A shipped LM folder -> float32 ``LlamaForCausalLM`` in eval mode (no network)."""
    from transformers import AutoModelForCausalLM

    from ..errors import HastenError

    if not (Path(folder) / "config.json").is_file():
        raise HastenError(f"no model in {folder}: config.json is missing")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    return model.eval()


@torch.inference_mode()
def greedy_accuracy(model, problems: list, max_new_tokens: int = task.MAX_NEW_TOKENS) -> float:
    """Task accuracy of target-only greedy decoding (lean loop) on ``problems``."""
    from .speculative import autoregressive_generate

    ok = 0
    for p in problems:
        x = torch.tensor([encode(task.prompt_text(p))])
        out = autoregressive_generate(model, x, max_new_tokens, eos_token_id=EOS)
        ok += task.check(p, decode(out.new_tokens.tolist()))
    return ok / len(problems)


def plot_curves(out: Path, logs: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, log in logs.items():
        c = log["loss_curve"]
        ax.plot([e["step"] for e in c], [e["loss"] for e in c], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (EMA)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)


def write_model_card(out: Path) -> Path:
    """MODEL_CARD.md for the shipped target, draft and judge, assembled from their training logs."""
    from ..io import atomic_write

    def load(p: Path) -> dict:
        return json.loads(p.read_text()) if p.is_file() else {}

    sp = task.splits()
    lines = ["# hasten decoding models: target LM, draft LM, judge head", "",
             "Made here from scratch (no downloaded weights) for the task of `hasten/decoding/task.py`: "
             "two-step arithmetic word problems (five templates, a 3-digit start amount, 2-3 digit changes, "
             "additions with carries and subtractions with borrows) with a worked, column-by-column answer "
             "whose four kinds of slot each have three wordings (`task.SLOTS`); correct when the last integer "
             f"equals the answer. Word/digit tokenizer (`tokenizer.json`, {len(task.VOCAB)} ids, built in code).",
             "",
             f"Data (`task.splits(seed=0)`): {len(sp['test'])} held-out test problems (benchmark only) and "
             f"{len(sp['val'])} validation problems (threshold and settings are chosen on them); training "
             "problems are drawn fresh at every step and never equal a held-out one.", "",
             "Reproduce (2 CPU threads, resumable from `runs/decode`): `python -m hasten.decoding.train --what "
             "all --out src/hasten/models/lm`; benchmark: `hasten bench-decode --out benchmarks/decode`.", "",
             "![loss curves](loss_curves.png)", ""]
    for name, mix in (("target", task.TARGET_MIX), ("draft", task.DRAFT_MIX)):
        log = load(out / name / "train_log.json")
        if not log:
            continue
        c = log["config"]
        lines += [f"## {name}", "",
                  f"- transformers `LlamaForCausalLM`, {log['params']:,} parameters, hidden {c['hidden_size']}, "
                  f"{c['layers']} layer{'s' if c['layers'] > 1 else ''}, {c['heads']} heads, MLP {c['intermediate']}, "
                  "tied embeddings, "
                  "stored in float16 (`safetensors`).",
                  f"- wording mix per slot (favourite of target, favourite of draft, rare): {list(mix)}.",
                  f"- AdamW lr {c['lr']} ({c.get('warmup', 100)} warm-up steps, cosine to 10%), batch "
                  f"{c['batch_size']}, {log.get('steps_done', c['steps'])} of {c['steps']} steps, seed {c['seed']}, "
                  f"loss on answer tokens only, bf16 autocast {log.get('bf16_autocast', False)}; "
                  f"{log['train_seconds']} s wall on {log.get('threads', 1)} thread(s) of a 2-core CPU.",
                  f"- size on disk: {(out / name / 'model.safetensors').stat().st_size / 1e6:.1f} MB (float16).",
                  *([f"- {log['note']}."] if log.get("note") else []),
                  f"- final train loss (EMA) {log['loss_curve'][-1]['loss']:.4f}; greedy accuracy on the first "
                  f"100 validation problems {log.get('val_greedy_accuracy_100', float('nan')):.3f} "
                  "(the held-out test accuracy is in `benchmarks/decode/results.md`).", ""]
    j = load(out / "judge_log.json")
    if j:
        mv, mt = j["metrics"]["val"], j["metrics"]["train"]
        cnt = mt.get("count_by_kind", {})
        lines += ["## judge (`judge.safetensors`)", "",
                  "- `JudgeHead`: one linear unit on the frozen target's last hidden state at the drafted token's "
                  f"position (hidden size + 1 parameters), threshold logit {j['threshold_logit']:.4f}.",
                  "- data (`judge_data.py`): the tokens the judge is asked about, i.e. tokens other than the target's "
                  "greedy choice after a correct partial answer (slot wordings drawn uniformly): label 1 for every "
                  "token that continues into some correct answer (another wording; "
                  f"{cnt.get('alternative', 0):,}), label 0 for the draft model's own greedy mistakes "
                  f"({cnt.get('draft_error', 0):,}) and for {j.get('n_wrong', 6)} synthetic mistakes per problem "
                  f"(a digit replaced by another in {round(100 * j.get('digit_frac', 0.9))}% of cases, any token "
                  f"otherwise; {cnt.get('synthetic_error', 0):,}); labels from `task.AnswerChecker`; "
                  f"{j['train']['tokens']:,} labelled tokens from {j.get('train_problems', 600):,} training problems, "
                  "seed 0.",
                  "- class-weighted logistic regression on standardised features (folded into the head), "
                  f"full-batch L-BFGS, L2 1e-4; final loss {j['loss_curve'][-1]['loss']:.4f}.",
                  f"- validation ({j.get('val_problems', 100)} problems), at the paper's delta = 0.5: accepts "
                  f"{mv['accept_rate_on_correct']:.3f} of the other correct wordings, rejects "
                  f"{mv['reject_rate_on_wrong']:.3f} of wrong tokens (accept rate by kind "
                  f"{mv.get('accept_rate_by_kind')}); train {mt['accept_rate_on_correct']:.3f} / "
                  f"{mt['reject_rate_on_wrong']:.3f}.", ""]
        c = j.get("calibration")
        if c:
            lines += ["- threshold and drafted tokens per round, on the "
                      f"{c['problems']} validation problems: for each k, the smallest delta whose Judge Decoding "
                      f"accuracy is at most {c['max_drop_points']} points below target-only greedy "
                      f"({100 * c['target_greedy_accuracy']:.1f}%); then the k with the least total time: "
                      f"k = {c.get('chosen_k')}, delta = {c['chosen_delta']}. Sweep (k, delta: accuracy, mean "
                      "accepted length, seconds for all problems): "
                      + "; ".join(f"{r.get('k')}, {r['delta']}: {100 * r['accuracy']:.1f}%, "
                                  f"{r['mean_accepted_length']:.2f}, {r.get('seconds', float('nan')):.1f} s"
                                  for r in c["rows"]) + ".", ""]
    lines += ["Decoding figures on the held-out test split: `benchmarks/decode/results.md`.", ""]
    text = "\n".join(lines)
    return atomic_write(out / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(text))


def calibrate_folder(out: Path, deltas: tuple[float, ...] = (0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999),
                     ks: tuple[int, ...] = (8, 16, 24, 32, 48, 64, 96), n_problems: int = 100) -> dict:
    """Choose the shipped judge's threshold and ``k`` on validation problems and store them in the head."""
    from ..io import write_json
    from .judge import JudgeHead, prob_to_logit
    from .judge_data import calibrate_threshold

    torch.set_num_threads(1)  # decoding is measured on one thread
    head = JudgeHead.load(out / "judge.safetensors")
    c = calibrate_threshold(load_lm(out / "target"), load_lm(out / "draft"), head,
                            task.splits()["val"][:n_problems], deltas, ks=ks)
    delta = c["chosen_delta"] if c["chosen_delta"] is not None else max(deltas)
    k = c["chosen_k"] if c["chosen_k"] is not None else min(ks)
    head.threshold = prob_to_logit(delta)
    head.meta["k"] = k
    head.save(out / "judge.safetensors")
    log = json.loads((out / "judge_log.json").read_text())
    log["threshold_logit"], log["calibration"] = head.threshold, c
    write_json(out / "judge_log.json", log)
    print(f"judge: delta {delta} (logit {head.threshold:.4f}), k = {k}, chosen on the validation split")
    return c


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="all", choices=["all", "target", "draft", "judge", "calibrate", "card"])
    ap.add_argument("--out", type=Path, default=Path("src/hasten/models/lm"))
    ap.add_argument("--steps", type=int, default=None, help="override the LM step count")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for training")
    ap.add_argument("--ckpt-dir", type=Path, default=CHECKPOINTS, help="resumable training state (outside git)")
    ap.add_argument("--judge-problems", type=int, default=600, help="training problems for the judge data")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = task.build_tokenizer()
    tok.backend_tokenizer.save(str(args.out / "tokenizer.json"))
    logs = {}
    for cfg in (TARGET, DRAFT):
        if args.what in ("all", cfg.name):
            if args.steps:
                cfg.steps = args.steps
            logs[cfg.name] = train_lm(cfg, args.out, ckpt_dir=args.ckpt_dir)
            model = load_lm(args.out / cfg.name)
            torch.set_num_threads(1)  # decoding is measured on one thread
            acc = greedy_accuracy(model, task.splits()["val"][:100])
            torch.set_num_threads(args.threads)
            logs[cfg.name]["val_greedy_accuracy_100"] = acc
            from ..io import write_json

            write_json(args.out / cfg.name / "train_log.json", logs[cfg.name])
            print(f"{cfg.name}: {logs[cfg.name]['params']} params, val greedy accuracy {acc:.3f}")
    if args.what in ("all", "judge"):
        from .judge_data import train_judge_from_folder

        info = train_judge_from_folder(args.out, n_problems=args.judge_problems)
        print(f"judge: {json.dumps(info['metrics'])}")
    if args.what in ("all", "judge", "calibrate"):
        calibrate_folder(args.out)
    logs = {n: json.loads((args.out / n / "train_log.json").read_text())
            for n in ("target", "draft") if (args.out / n / "train_log.json").is_file()}
    if logs:
        plot_curves(args.out, logs)
    write_model_card(args.out)


if __name__ == "__main__":
    try:
        main()
    except HastenError as e:  # one line and exit 2, like the hasten CLI
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
