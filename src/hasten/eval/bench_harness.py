"""The timing harness of ``hasten bench``: interleaved repetitions, paired speedups, counters, peak RSS.

Protocol. Every configuration gets its own copy of the pipeline and is installed once, before any
timing (install and calibration costs are not timed). Each configuration then samples a small warm-up
batch (untimed). The evaluation set is split into batches; for batch k = 0, 1, ... every configuration
samples batch k in turn (A B C ... A B C ...), from the same labels and the same initial noise (seed
``seed + k``), and only that ``pipe(...)`` call is timed. So repetition k of configuration C and of the
baseline ran in the same round on the same inputs, and the speedup of C is the median over k of the paired
ratios ``t_baseline[k] / t_C[k]``. In a large suite the members of a pair can run minutes apart (the
reference first, the peers last, in the default order ``abc``): a slow spell of the machine is shared
only when it lasts the round. ``order="rotate"`` (:mod:`benchmarks.bench_retime`) moves each configuration
through the round from one repetition to the next.

A configuration that raises (at install or in any batch) is recorded with its error and dropped from the
remaining batches; the run goes on.

Counters are one instrument for every family (hasten, peers, baselines), read from forward hooks on
leaf modules that only run when work is really done:

- ``nfe``: transformer rows per sample, counted at the patch embedding (a CFG step with both branches
  counts 2; a call whose unconditional rows were dropped counts 1);
- ``block_evals``: per sample, rows through each block's self-attention query projection plus rows
  through its feed-forward's first linear layer, halved (one full block on one row counts 1); a cached
  block counts 0, a block whose attention alone was reused counts 1/2.

The denoiser's share of each timed call is read from a pre-hook and a hook on the transformer
(``DenoiserTimer``): the end-to-end time stays the headline, the denoiser-only speed-up sits beside it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


# --------------------------------------------------------------------------- configurations
@dataclass
class Prepared:
    """An installed configuration: ``sample(labels, generator) -> images in [0, 1]``."""

    sample: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    start_run: Callable[[], None] | None = None  # called before every run (e.g. reset peer hook state)
    close: Callable[[], None] | None = None
    transformer: nn.Module | None = None  # where the counters attach (None: no counters)
    report: Callable[[], dict] | None = None  # the methods' own report, read once after the last batch
    denoiser: nn.Module | None = None  # where the denoiser timer attaches when not ``transformer`` (a student)


@dataclass
class BenchConfig:
    """One benchmark configuration. ``setup()`` installs it and returns a :class:`Prepared`."""

    name: str
    family: str  # baseline | hasten | peer
    params: dict
    setup: Callable[[], Prepared]


class Unavailable(Exception):
    """A configuration that cannot run in this build (a method not present, an extra not installed)."""


# --------------------------------------------------------------------------- counters
class WorkCounter:
    """Counts transformer rows (NFE) and block rows through forward hooks on leaf modules."""

    def __init__(self, transformer: nn.Module | None):
        self.rows = 0
        self.attn_rows = 0
        self.ff_rows = 0
        self.blocks_seen = False
        self._handles: list[Any] = []
        if transformer is None:
            return
        embed = getattr(transformer, "pos_embed", None)
        if isinstance(embed, nn.Module):
            self._handles.append(embed.register_forward_hook(self._count("rows")))
        for block in _blocks(transformer):
            attn = getattr(block, "attn1", None) or getattr(block, "attn", None)  # DiT / SD3 joint blocks
            q = getattr(attn, "to_q", None)
            ff = getattr(block, "ff", None)
            lin = None if ff is None else next((m for m in ff.modules() if isinstance(m, nn.Linear)), None)
            if isinstance(q, nn.Module) and lin is not None:
                self._handles.append(q.register_forward_hook(self._count("attn_rows")))
                self._handles.append(lin.register_forward_hook(self._count("ff_rows")))
                self.blocks_seen = True

    def _count(self, attr: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            setattr(self, attr, getattr(self, attr) + int(args[0].shape[0]))

        return hook

    def reset(self) -> None:
        self.rows = self.attn_rows = self.ff_rows = 0

    def snapshot(self) -> tuple[int, int, int]:
        """(rows, attention rows, feed-forward rows) so far: the harness counts each timed run as a difference
        of two snapshots, so configurations that share a module (a student at several step counts) do not
        count each other's calls."""
        return self.rows, self.attn_rows, self.ff_rows

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class DenoiserTimer:
    """Wall time inside the transformer's forward calls (the denoiser's part of an end-to-end run), from a
    pre-hook and a hook on the transformer itself, read with the harness's timer."""

    def __init__(self, transformer: nn.Module | None, timer: Callable[[], float]):
        self.seconds = 0.0
        self._timer = timer
        self._start: float | None = None
        self._handles: list[Any] = []
        if transformer is not None:
            self._handles = [transformer.register_forward_pre_hook(self._pre),
                             transformer.register_forward_hook(self._post)]

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self._start = self._timer()

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._start is not None:
            self.seconds += self._timer() - self._start
            self._start = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "transformer_blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


# --------------------------------------------------------------------------- peak RSS
class RssSampler:
    """Samples this process's resident set size in a background thread; ``window()`` gives the peak."""

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss  # read first: start_window() may reset the peak meanwhile
            with self._lock:
                self._peak = max(self._peak, rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def start_window(self) -> None:
        rss = self._proc.memory_info().rss
        with self._lock:
            self._peak = rss

    def window_peak_mb(self) -> float:
        return max(self._peak, self._proc.memory_info().rss) / 2**20


class NoRss:
    """Stand-in for :class:`RssSampler` (tests, or when psutil is missing)."""

    def __enter__(self) -> NoRss:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def start_window(self) -> None:
        return None

    def window_peak_mb(self) -> float | None:
        return None


# --------------------------------------------------------------------------- measurements
@dataclass
class Measurement:
    """What the harness saw of one configuration."""

    name: str
    times: list[float] = field(default_factory=list)  # one per timed batch, in batch order
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds of the same calls
    denoiser_times: list[float] = field(default_factory=list)  # seconds inside the transformer, same calls
    images: list[torch.Tensor] = field(default_factory=list)
    samples: int = 0
    rows: int = 0
    block_rows: float = 0.0
    counted: bool = False
    peak_rss_mb: float | None = None
    report: dict | None = None  # Prepared.report() after the last batch (e.g. FlexiDiT's compute share)
    setup_s: float | None = None  # setup() (calibrations it is the first to need) and the warm-up batch
    base_time: float | None = None  # run_in_turn: the baseline run just before this configuration's
    error: str | None = None

    @property
    def nfe(self) -> float | None:
        return self.rows / self.samples if self.counted and self.samples else None

    @property
    def block_evals(self) -> float | None:
        return self.block_rows / self.samples if self.counted and self.samples else None


def error_text(e: BaseException) -> str:
    """``"Type: first line of the message"`` (or ``"not available: ..."`` for :class:`Unavailable`)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, Unavailable):
        return f"not available: {msg}"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def paired_speedup(base_times: Sequence[float], times: Sequence[float]) -> float | None:
    """Median over repetitions k of ``base_times[k] / times[k]`` (pairs run in the same round).

    Only repetitions that both sides completed are paired; ``None`` when there is no pair.
    """
    pairs = [b / t for b, t in zip(base_times, times, strict=False) if t > 0]
    return statistics.median(pairs) if pairs else None


@dataclass
class Batch:
    """One repetition's inputs (``labels``: class labels, prompts or token ids) and its noise seed."""

    labels: Any
    seed: int


def make_batches(samples: int, batch_size: int, seed: int, num_classes: int) -> list[Batch]:
    """``samples`` labels 0..C-1, 0..C-1, ... in batches of ``batch_size``; batch k uses seed ``seed + k``
    (the convention of :func:`hasten.eval.metrics.sample_eval_set`)."""
    labels = torch.arange(samples) % num_classes
    return [Batch(labels[s:s + batch_size], seed + k) for k, s in enumerate(range(0, samples, batch_size))]


ORDERS = ("abc", "abba", "rotate")


def _order(configs: Sequence[BenchConfig], k: int, order: str) -> Sequence[BenchConfig]:
    """The configurations in the order batch ``k`` runs them: ``abc`` (A B C every batch), ``abba``
    (reversed on odd batches: what a small overhead needs) or ``rotate`` (A B C, B C A, C A B, ...: each
    configuration equally often first, as the decoding benchmark uses)."""
    if order == "abba":
        return configs[::-1] if k % 2 else configs
    if order == "rotate":
        r = k % max(len(configs), 1)
        return [*configs[r:], *configs[:r]]
    return configs


def run_interleaved(configs: Sequence[BenchConfig], batches: Sequence[Batch], warmup: Batch | None = None,
                    timer: Callable[[], float] = time.perf_counter, rss: Any = None,
                    progress: Callable[[str], None] | None = None, order: str = "abc") -> dict[str, Measurement]:
    """Set up every configuration, warm each up, then time batch k of every configuration in turn, in the
    ``order`` of :func:`_order`. A batch's ``labels`` are whatever the configurations' ``sample`` takes
    (class labels, prompts, a prompt's token ids); outputs are kept (floating ones as float32, on the CPU)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    say = progress or (lambda _msg: None)
    rss = rss if rss is not None else NoRss()
    out = {c.name: Measurement(c.name) for c in configs}
    prepared: dict[str, Prepared] = {}
    counters: dict[str, WorkCounter] = {}
    clocks: dict[str, DenoiserTimer] = {}
    with rss:
        for c in configs:
            m = out[c.name]
            say(f"setup {c.name}")
            t0 = time.perf_counter()
            try:
                p = c.setup()
                prepared[c.name] = p
                counters[c.name] = WorkCounter(p.transformer)
                if warmup is not None:
                    run_one(p, warmup)
                clocks[c.name] = DenoiserTimer(p.denoiser or p.transformer, timer)
                m.setup_s = time.perf_counter() - t0
                say(f"  {m.setup_s:.1f} s")
            except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
                m.error = error_text(e)
                m.setup_s = time.perf_counter() - t0  # what the failure cost before it surfaced
                say(f"  {c.name}: {m.error} ({m.setup_s:.1f} s)")
        for k, batch in enumerate(batches):
            say(f"batch {k + 1}/{len(batches)}")
            for c in _order(configs, k, order):
                p, m = prepared.get(c.name), out[c.name]
                if p is None or m.error is not None:
                    continue
                try:
                    rss.start_window()
                    clock, cnt = clocks[c.name], counters[c.name]
                    d0, w0 = clock.seconds, cnt.snapshot()
                    c0 = time.process_time()
                    t0 = timer()
                    images = run_one(p, batch)
                    m.times.append(timer() - t0)
                    m.cpu_times.append(time.process_time() - c0)
                    rows, attn_rows, ff_rows = (b - a for a, b in zip(w0, cnt.snapshot()))
                    m.rows += rows  # this run's calls only: another configuration may share the module
                    m.block_rows += (attn_rows + ff_rows) / 2
                    if clock.active:
                        m.denoiser_times.append(clock.seconds - d0)
                    peak = rss.window_peak_mb()
                    if peak is not None:
                        m.peak_rss_mb = max(m.peak_rss_mb or 0.0, peak)
                    out_k = images.detach().cpu() if torch.is_tensor(images) else images
                    m.images.append(out_k.float() if torch.is_tensor(out_k) and out_k.is_floating_point() else out_k)
                    m.samples += len(batch.labels) if hasattr(batch.labels, "__len__") else 1
                except Exception as e:  # noqa: BLE001
                    m.error = error_text(e)
                    say(f"  {c.name}: {m.error}")
        for c in configs:
            cnt, m = counters.get(c.name), out[c.name]
            if cnt is not None:
                m.counted = cnt.blocks_seen and m.rows > 0
                cnt.remove()
            if c.name in clocks:
                clocks[c.name].remove()
            p = prepared.get(c.name)
            if p is not None and p.report is not None and m.error is None:
                m.report = p.report()
            if p is not None and p.close is not None:
                try:
                    p.close()
                except Exception as e:  # noqa: BLE001
                    m.error = m.error or error_text(e)
    return out


def run_one(p: Prepared, batch: Batch) -> torch.Tensor:
    if p.start_run is not None:
        p.start_run()
    gen = torch.Generator().manual_seed(batch.seed)
    return p.sample(batch.labels, gen)


def run_in_turn(base: Prepared, configs: Sequence[tuple[str, Callable[[], tuple[Prepared, Callable[[], None]]]]],
                batch: Batch, counter_model: nn.Module | None = None, timer: Callable[[], float] = time.perf_counter,
                progress: Callable[[str], None] | None = None) -> tuple[Measurement, dict[str, Measurement]]:
    """The engine's mode for a model too big to copy: each configuration in turn on the one model, as
    ``(name, install)`` with ``install() -> (prepared, uninstall)``: a baseline run, then install, one untimed
    warm-up run (first-call costs), one timed run, uninstall. A configuration's speed-up pairs its time with
    the baseline run just before it (``Measurement.base_time``); a failed baseline run is that configuration's
    error. A baseline warm-up run comes first (untimed)."""
    say = progress or (lambda _m: None)
    counter = WorkCounter(counter_model) if counter_model is not None else None
    base_m = Measurement("baseline")
    out: dict[str, Measurement] = {}
    run_one(base, batch)  # warm-up

    def timed(m: Measurement, prepared: Prepared, rss: Any) -> float:
        if counter is not None:
            counter.reset()
        rss.start_window()
        t0 = timer()
        run_one(prepared, batch)
        t = timer() - t0
        m.times.append(t)
        m.peak_rss_mb = max(m.peak_rss_mb or 0.0, rss.window_peak_mb())
        m.samples = len(batch.labels)
        if counter is not None:
            m.counted = counter.blocks_seen and counter.rows > 0
            m.rows, m.block_rows = counter.rows, (counter.attn_rows + counter.ff_rows) / 2
        return t

    with RssSampler() as rss:
        for name, install in configs:
            say(f"in turn: {name}")
            m = out[name] = Measurement(name)
            try:
                m.base_time = timed(base_m, base, rss)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                m.error = f"the baseline run before it failed: {error_text(e)}"
                say(f"  {m.error}")
                continue
            try:
                prepared, uninstall = install()
            except Exception as e:  # noqa: BLE001
                m.error = error_text(e)
                say(f"  {m.error}")
                continue
            try:
                run_one(prepared, batch)  # warm-up: first-call costs are not the method's
                timed(m, prepared, rss)
            except Exception as e:  # noqa: BLE001
                m.error = error_text(e)
                say(f"  {m.error}")
            finally:
                uninstall()
    if counter is not None:
        counter.remove()
    return base_m, out
