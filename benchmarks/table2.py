"""The EPIC paper's Table 2 in one run: brews and victim trainings run concurrently on one GPU.

One ResNet-18 at batch 128 leaves most of a large GPU idle, so this runs several trainings at once, as
a pool of worker processes ('spawn'), each loading the dataset once and keeping it on the device. The
work is the centralized runner's own (fedepic.centralized: `train_victim`, `fedepic.builders.build_model`, the brew's
config and the trial built from a poison set) with its seeding: target t uses seed cfg.seed + 1000*t,
the clean model is trained once with cfg.seed, so every outcome equals the one `run_centralized` gives
for that trial (on the CPU exactly, tests/test_table2.py; on CUDA up to the brew's float rounding).

Stages (the first argument), each printing JSON lines (the last one a summary) and appending them
to OUT/table2.jsonl:

    pretrain  train the clean model (attack.pretrain_epochs or train.epochs) and time it -> WORK/clean.pt
    brew      brew the poisons of --targets targets from --first-target (-> WORK/poisons-trial{t}.npz)
    run       probe how many concurrent trainings give the most throughput (--probe 1,2,4,8), then brew
              what is missing and train every target under every defense with that many in flight,
              stopping at --budget seconds: a training that cannot finish in time is not started, one
              still running at the deadline is stopped, and what finished is kept

    python benchmarks/table2.py run --config centralized_cifar10 data.name=imagefolder \\
        --defenses none,epic-0.1 --targets 10 --budget 600 --out OUT --work WORK

Each training is one line ("event": "training", the outcome of `train_victim` less the per-class
accuracies); the epochs go to OUT/table2-epochs.jsonl; OUT/table2.md holds the table so far (rewritten
after each training). ``--previous FILE`` merges the trainings of an earlier run (its targets are skipped,
new ones follow them), so a later run appends targets and n grows.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from fedepic import seeds
from fedepic.attacks.gradient_matching import brew_poisons, choose_setup, load_poisons, save_poisons
from fedepic.builders import build_model
from fedepic.centralized import (
    _brew_config, _ordered, _poison_trial, _random_alignment, summarise, train_victim,
)
from fedepic.config import RunConfig, load_config
from fedepic.data import ImageData, load_dataset
from fedepic.extensions import CENTRAL_DEFENSES
from fedepic.progress import bar
from fedepic.train import evaluate, fit, resolve_device

# Yang et al., ICML 2022, Table 2 (CIFAR-10, ResNet-18, Witches' Brew eps 8, 1% poisons, 40 epochs)
PAPER = {"none": {"attack_success": 0.25, "accuracy": 0.9248},
         "epic-0.1": {"attack_success": 0.027, "accuracy": 0.9092}}
TARGET_PRETRAIN_SECONDS = 180  # issue 18: a 40-epoch ResNet-18 run on an H100-class GPU (paper: 15 min, A40)
TARGET_BREW_SECONDS = 180


def _base_has(defense: str, flag: str) -> bool:
    """Whether the ``defense.compare`` member ``defense`` (``NAME`` or ``NAME-F``) is flagged ``flag``."""
    return CENTRAL_DEFENSES.has(defense.partition("-")[0], flag)


# ----------------------------------------------------------------------------- shared by main and workers

class Context:
    """What one process holds: the config, the data (on the device and a CPU copy), the clean model."""

    def __init__(self, cfg: RunConfig, device: torch.device, work: Path, threads: Optional[int]) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.cfg, self.device, self.work = cfg, device, work
        self.cpu_data = load_dataset(cfg.data, cfg.seed)
        self.data = _on_device(self.cpu_data, device)
        self._clean: Optional[torch.nn.Module] = None

    def clean(self) -> torch.nn.Module:
        if self._clean is None:
            model = build_model(self.cfg, self.data, self.cfg.seed, self.device)
            model.load_state_dict(torch.load(self.work / "clean.pt", map_location=self.device, weights_only=True))
            self._clean = model
        return self._clean


def _on_device(data: ImageData, device: torch.device) -> ImageData:
    if device.type == "cpu":
        return data
    return replace(data, train_x=data.train_x.to(device), train_y=data.train_y.to(device),
                   test_x=data.test_x.to(device), test_y=data.test_y.to(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trial_seed(cfg: RunConfig, t: int) -> int:
    return seeds.trial_seed(cfg.seed, t)  # the centralized runner's seeding


def pretrain(ctx: Context) -> dict:
    """The centralized runner's clean model (same seed, epochs and call), timed; saved to WORK/clean.pt."""
    cfg, data = ctx.cfg, ctx.data
    epochs = cfg.attack.pretrain_epochs or cfg.train.epochs
    model = build_model(cfg, data, cfg.seed, ctx.device)
    _sync(ctx.device)
    started = time.perf_counter()
    fit(model, data.train_x, data.train_y, cfg.train, seed=cfg.seed, device=ctx.device, epochs=epochs)
    _sync(ctx.device)
    seconds = time.perf_counter() - started
    accuracy = evaluate(model, data.test_x, data.test_y, cfg.train.eval_batch_size, data.num_classes,
                        cfg.train.amp)["accuracy"]
    ctx.work.mkdir(parents=True, exist_ok=True)
    tmp = ctx.work / "clean.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(ctx.work / "clean.pt")
    ctx._clean = model
    return {"event": "pretrain", "model": cfg.model.name, "rows": len(data.train_y), "epochs": epochs,
            "batch_size": cfg.train.batch_size, "seconds": round(seconds, 2),
            "seconds_per_epoch": round(seconds / max(epochs, 1), 3), "test_accuracy": accuracy,
            "target_seconds": TARGET_PRETRAIN_SECONDS, "paper_seconds_a40": 900}


def brew(ctx: Context, t: int) -> dict:
    """Target t's poisons, as `_gradient_matching_trials` brews them; WORK/poisons-trial{t}.npz + .json."""
    cfg, data = ctx.cfg, ctx.data
    seed = trial_seed(cfg, t)
    clean = ctx.clean()
    setup = choose_setup(data.train_y, data.test_y, data.num_classes, cfg.attack.budget, seed)
    target_x = data.test_x[setup.target_index:setup.target_index + 1].float() / 255
    _sync(ctx.device)
    started = time.perf_counter()
    poisons = brew_poisons(clean, data.train_x, data.train_y, setup.poison_indices, target_x,
                           setup.adversarial_class, _brew_config(cfg), seed=seed, device=ctx.device,
                           target_index=setup.target_index, target_class=setup.target_class)
    _sync(ctx.device)
    seconds = time.perf_counter() - started
    save_poisons(poisons, ctx.work / f"poisons-trial{t}.npz")
    random_alignment = _random_alignment(clean, ctx.cpu_data, poisons, target_x.cpu(), seed)
    record = {"event": "brew", "target": t, "seed": seed, "target_index": setup.target_index,
              "target_class": setup.target_class, "adversarial_class": setup.adversarial_class,
              "poisons": len(poisons.indices), "restarts": cfg.attack.restarts, "steps": cfg.attack.steps,
              "seconds": round(seconds, 2), "loss": poisons.loss, "brew_alignment": poisons.alignment,
              "random_alignment": random_alignment, "target_seconds": TARGET_BREW_SECONDS, "pid": os.getpid()}
    (ctx.work / f"poisons-trial{t}.json").write_text(json.dumps(record))
    return record


class _Epochs:
    """Stands in for a member's RunWriter: keeps the epoch records for the main process to write."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(record)


def train(ctx: Context, t: int, defense: str, epic_counts: Optional[list[int]]) -> dict:
    """One victim under `defense` on target t's poisoned set: `train_victim`, as the centralized runner calls it."""
    poisons = load_poisons(ctx.work / f"poisons-trial{t}.npz")
    trial = _poison_trial(t, trial_seed(ctx.cfg, t), ctx.data, poisons)
    sidecar = ctx.work / f"poisons-trial{t}.json"
    trial.info["random_alignment"] = json.loads(sidecar.read_text())["random_alignment"] if sidecar.exists() else None
    epochs = _Epochs()
    _sync(ctx.device)
    outcome, counts = train_victim(ctx.cfg, ctx.data, trial, defense, ctx.device, epochs, epic_counts, bar(None, "", 0))
    _sync(ctx.device)
    outcome.pop("per_class", None)
    return {"event": "training", "target": t, "seed": trial.seed, **outcome, "epic_counts": counts,
            "pid": os.getpid(), "epoch_records": epochs.records}


def probe(ctx: Context, steps: int, seed: int) -> dict:
    """A fresh model trained for `steps` batches (the victims' loop and batch size), timed."""
    cfg, data = ctx.cfg, ctx.data
    rows = min(len(data.train_y), steps * cfg.train.batch_size)
    model = build_model(cfg, data, seed, ctx.device)
    _sync(ctx.device)
    started = time.perf_counter()
    fit(model, data.train_x[:rows], data.train_y[:rows], cfg.train, seed=seed, device=ctx.device, epochs=1)
    _sync(ctx.device)
    return {"seconds": time.perf_counter() - started, "steps": math.ceil(rows / cfg.train.batch_size),
            "pid": os.getpid()}


# ----------------------------------------------------------------------------- worker processes

_CTX: Optional[Context] = None
_BARRIER = None


def _init_worker(cfg: RunConfig, device: str, work: str, threads: Optional[int], barrier) -> None:
    global _CTX, _BARRIER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    _CTX, _BARRIER = Context(cfg, torch.device(device), Path(work), threads), barrier


def _warm(steps: int) -> dict:
    """Run on every worker at once (the barrier holds each until all have started): CUDA context,
    kernels and allocator are ready before anything is timed."""
    probe(_CTX, steps, seed=12345)
    _BARRIER.wait(timeout=600)
    memory = torch.cuda.max_memory_allocated(_CTX.device) if _CTX.device.type == "cuda" else 0
    return {"pid": os.getpid(), "peak_mib": round(memory / 2**20), "rows": len(_CTX.data.train_y)}


def _task(kind: str, *args):
    try:
        if kind == "probe":
            return probe(_CTX, *args)
        if kind == "brew":
            return brew(_CTX, *args)
        if kind == "train":
            return train(_CTX, *args)
        raise ValueError(kind)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()  # give the cached blocks back to the other workers
        raise


# ----------------------------------------------------------------------------- main process

class Output:
    """OUT/table2.jsonl (every line), OUT/table2-epochs.jsonl, OUT/table2.md; each line also on stdout."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.lines = open(out / "table2.jsonl", "a", buffering=1)
        self.epochs = open(out / "table2-epochs.jsonl", "a", buffering=1)

    def emit(self, record: dict) -> None:
        epochs = record.pop("epoch_records", None)
        for e in epochs or []:
            self.epochs.write(json.dumps({"target": record["target"], "defense": record["defense"], **e}) + "\n")
        line = json.dumps(record)
        self.lines.write(line + "\n")
        print(line, flush=True)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"


def _previous(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("event") == "training":
                out.append(record)
    return out


def table(rows: list[dict], trainings: list[dict]) -> str:
    """The markdown table: attack success +- sqrt(p(1-p)/n), accuracy, EPIC's recall and clean drops, time."""
    seconds = {}
    for r in rows:
        own = [o["seconds"] for o in trainings if o["defense"] == r["defense"]]
        seconds[r["defense"]] = sum(own) / len(own) if own else float("nan")
    lines = ["| defense | n | attack success | clean accuracy | poison recall | clean-drop rate | s per training "
             "| paper attack success | paper accuracy |", "|---|---|---|---|---|---|---|---|---|"]

    def pct(v, se=None):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{100 * v:.1f}%" + (f" ± {100 * se:.1f}" if se is not None and not math.isnan(se) else "")

    for r in rows:
        paper = PAPER.get(r["defense"], {})
        lines.append(f"| {r['defense']} | {r['trials']} | {pct(r['attack_success'], r['attack_success_se'])} | "
                     f"{pct(r['accuracy'], r['accuracy_se'])} | {pct(r['poison_recall'])} | "
                     f"{pct(r['clean_drop_rate'])} | {seconds[r['defense']]:.1f} | "
                     f"{pct(paper.get('attack_success'))} | {pct(paper.get('accuracy'))} |")
    return "\n".join(lines) + "\n"


class Scheduler:
    """Brews and trainings through one pool with at most `limit` in flight; nothing starts that would
    end past the deadline. Trainings (lowest target first) go before brews, so targets finish in order,
    unless `brews_first`: then every brew goes first, so that a run too short for Table 2 still brews
    every poison set on its clean model (which stays on the machine; the sets come back)."""

    def __init__(self, pool: ProcessPoolExecutor, limit: int, deadline: float, defenses: list[str],
                 targets: list[int], have_poisons: set[int], previous: list[dict], output: Output,
                 estimates: dict, brews_first: bool = False) -> None:
        self.pool, self.limit, self.deadline, self.output = pool, limit, deadline, output
        self.brews_first = brews_first
        self.defenses = _ordered(defenses)
        # the member whose drop counts the controls replay, as in the centralized runner
        self.first_epic = next((d for d in self.defenses if _base_has(d, "epic_selector")), None)
        self.earlier = {(o["target"], o["defense"]) for o in previous}
        self.previous_counts = {o["target"]: o.get("epic_counts") for o in previous if o["defense"] == self.first_epic}
        self.brews = [t for t in targets if t not in have_poisons]
        self.ready: list[tuple[int, str]] = []  # (target, defense) whose poisons (and EPIC counts) exist
        self.waiting: dict[int, list[str]] = {}  # controls waiting for their trial's EPIC counts
        self.counts: dict[int, list[int]] = {}
        self.running: dict[Future, tuple] = {}
        self.estimates = estimates  # kind -> seconds (observed at this concurrency, else a prior)
        self.trainings: list[dict] = []
        self.skipped: list[tuple] = []
        self.errors: list[dict] = []
        for t in targets:
            if t in have_poisons:
                self._poisons_ready(t)

    def _poisons_ready(self, t: int) -> None:
        """Target t's poisons exist: its trainings are ready, the controls that replay EPIC's drop
        counts (random, loss) once the trial's first EPIC member (in `_ordered`) has finished."""
        for d in self.defenses:
            if (t, d) in self.earlier:  # an earlier run's (--previous)
                continue
            if self.first_epic is not None and _base_has(d, "replays_epic") \
                    and (t, self.first_epic) not in self.earlier:
                self.waiting.setdefault(t, []).append(d)
            else:
                self.ready.append((t, d))
        self.ready.sort()

    def _next(self) -> Optional[tuple]:
        if self.brews and (self.brews_first or not self.ready):
            return ("brew", self.brews.pop(0))
        if self.ready:
            t, d = self.ready.pop(0)
            return ("train", t, d, self.counts.get(t, self.previous_counts.get(t)))
        return None

    def _fits(self, kind: str) -> bool:
        estimate = self.estimates.get(kind)
        return estimate is None or time.time() + estimate <= self.deadline

    def fill(self) -> None:
        while len(self.running) < self.limit:
            job = self._next()
            if job is None:
                return
            if not self._fits(job[0]):
                self.skipped.append(job[:3])
                continue
            try:
                future = self.pool.submit(_task, *job)
            except BrokenProcessPool:  # a worker died (killed for memory, say): nothing more can start
                self.ready, self.brews = [], []
                self.skipped.append(job[:3])
                return
            self.running[future] = (time.time(), *job)

    def finished(self, future: Future) -> dict:
        started, kind, *args = self.running.pop(future)
        try:
            record = future.result()
        except Exception as err:  # one line, and the other tasks go on
            record = {"event": "error", "kind": kind, "target": args[0], "defense": args[1] if kind == "train" else None,
                      "error": f"{type(err).__name__}: {err}"[-2000:], "retried": False}
            if isinstance(err, torch.cuda.OutOfMemoryError) and self.limit > 1:  # fewer at once, and again
                self.limit -= 1
                record["retried"], record["concurrent_now"] = True, self.limit
                if kind == "brew":
                    self.brews.insert(0, args[0])
                else:
                    self.ready.insert(0, (args[0], args[1]))
            self.errors.append(record)
            self.output.emit(record)
            return record
        record["wall_in_pool"] = round(time.time() - started, 2)
        record["concurrent"] = self.limit
        seen = self.estimates.setdefault(f"_{kind}", [])
        seen.append(record["seconds"])
        self.estimates[kind] = max(seen)
        if kind == "brew":
            self._poisons_ready(args[0])
        else:
            t, d = args[0], args[1]
            if d == self.first_epic:
                self.counts[t] = record["epic_counts"]
                self.ready += [(t, c) for c in self.waiting.pop(t, [])]
                self.ready.sort()
            self.trainings.append(record)
        self.output.emit(record)
        return record

    def done(self) -> bool:
        return not self.running and (not (self.ready or self.brews) or time.time() >= self.deadline)


def _kill(pool: ProcessPoolExecutor) -> None:
    """Stop the pool's workers (processes this script started), by their ids."""
    for process in list(getattr(pool, "_processes", {}).values()):
        if process.is_alive():
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _probe_levels(pool: ProcessPoolExecutor, levels: list[int], steps: int, output: Output) -> tuple[int, dict]:
    results = {}
    for c in levels:
        started = time.perf_counter()
        runs = [f.result() for f in [pool.submit(_task, "probe", steps, 1000 + i) for i in range(c)]]
        wall = time.perf_counter() - started
        total_steps = sum(r["steps"] for r in runs)
        results[c] = {"event": "probe", "concurrent": c, "steps_each": runs[0]["steps"], "wall_seconds": round(wall, 3),
                      "steps_per_second": round(total_steps / wall, 2),
                      "seconds_per_step_each": round(max(r["seconds"] for r in runs) / runs[0]["steps"], 5),
                      "workers": len({r["pid"] for r in runs})}
        output.emit(dict(results[c]))
    best = max(levels, key=lambda c: results[c]["steps_per_second"])
    # a larger pool must buy at least 5% more throughput than the next smaller one that is nearly as good
    for c in sorted(levels):
        if results[c]["steps_per_second"] >= 0.95 * results[best]["steps_per_second"]:
            best = c
            break
    return best, results


def run(args, cfg: RunConfig, device: torch.device, output: Output, started: float) -> dict:
    deadline = started + args.budget if args.budget else math.inf
    work = Path(args.work)
    defenses = args.defenses.split(",")
    previous = _previous(args.previous)
    done = {(o["target"], o["defense"]) for o in previous}
    first = args.first_target or 0
    have = {t for t in range(first, first + args.targets) if (work / f"poisons-trial{t}.npz").exists()}
    # a target some of whose trainings an earlier run did is finished only on that run's poisons
    orphaned = [t for t in range(first, first + args.targets)
                if t not in have and any((t, d) in done for d in defenses)]
    targets = [t for t in range(first, first + args.targets)
               if t not in orphaned and not all((t, d) in done for d in defenses)]
    estimates: dict = {}
    if any(t not in have for t in targets) and not (work / "clean.pt").exists():
        ctx = Context(cfg, device, work, args.threads)
        output.emit(pretrain(ctx))
        del ctx
    for t in sorted(have):  # a brew timed earlier (stage brew) is the prior for the others
        sidecar = work / f"poisons-trial{t}.json"
        if sidecar.exists():
            estimates["brew"] = json.loads(sidecar.read_text())["seconds"]
    levels = [int(c) for c in args.probe.split(",")] if args.workers is None else [args.workers]
    size = max(levels)
    threads = args.threads or cfg.train.threads or max(1, (os.cpu_count() or 1) // size)
    context = mp.get_context("spawn")
    barrier = context.Barrier(size)
    pool = ProcessPoolExecutor(size, mp_context=context, initializer=_init_worker,
                               initargs=(cfg, str(device), str(work), threads, barrier))
    summary: dict = {"interrupted": False}
    sched = None
    try:
        warm = [f.result() for f in [pool.submit(_warm, min(args.probe_steps, 5)) for _ in range(size)]]
        summary.update(workers_started=len({w["pid"] for w in warm}), threads_per_worker=threads,
                       warm_peak_mib=max(w["peak_mib"] for w in warm))
        probe_results: dict = {}
        limit = levels[0]
        if len(levels) > 1:
            limit, probe_results = _probe_levels(pool, levels, args.probe_steps, output)
            steps = cfg.train.epochs * math.ceil(warm[0]["rows"] / cfg.train.batch_size)
            estimates["train"] = probe_results[limit]["seconds_per_step_each"] * steps  # until one finishes
        summary.update(concurrent=limit, probe=list(probe_results.values()))
        phase = time.time()
        sched = Scheduler(pool, limit, deadline - args.margin, defenses, targets, have, previous, output, estimates,
                          brews_first=args.order == "brews-first")
        sched.fill()
        while not sched.done():
            timeout = max(1.0, deadline - time.time()) if math.isfinite(deadline) else None
            finished, _ = wait(list(sched.running), timeout=timeout, return_when=FIRST_COMPLETED)
            if not finished:  # the deadline: stop what is still running
                break
            for future in finished:
                sched.finished(future)
            if time.time() < deadline - args.margin:
                sched.fill()
            write_table(output, cfg, previous + sched.trainings, defenses)
        summary["phase_seconds"] = round(time.time() - phase, 2)
    except KeyboardInterrupt:  # SIGTERM or SIGINT: keep what finished
        summary["interrupted"] = True
    except Exception as err:  # the pool or the probe broke: keep what finished, say why
        traceback.print_exc()
        summary["error"] = f"{type(err).__name__}: {err}"[-2000:]
    finally:
        stopped = [job[1:4] for job in sched.running.values()] if sched is not None else []
        _kill(pool)
    trainings = sched.trainings if sched is not None else []
    return {**summary, "trainings_this_run": len(trainings), "stopped": [list(s) for s in stopped],
            "not_started": [list(s) for s in (sched.skipped if sched else [])],
            "errors": len(sched.errors) if sched else 0,
            "targets_requested": targets, "targets_without_poisons": orphaned, "all_trainings": previous + trainings}


def write_table(output: Output, cfg: RunConfig, trainings: list[dict], defenses: list[str]) -> list[dict]:
    rows = [summarise(d, [o for o in trainings if o["defense"] == d], True) for d in defenses
            if any(o["defense"] == d for o in trainings)]
    targets = sorted({o["target"] for o in trainings})
    complete = [t for t in targets if all(any(o["target"] == t and o["defense"] == d for o in trainings)
                                          for d in defenses)]
    text = (f"# Table 2 ({cfg.data.name}, {cfg.model.name}, {cfg.train.epochs} epochs): {len(complete)} targets "
            f"with every defense ({', '.join(defenses)})\n\n" + table(rows, trainings))
    tmp = output.out / "table2.md.tmp"
    tmp.write_text(text)
    tmp.replace(output.out / "table2.md")
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["pretrain", "brew", "run"])
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, as for fedepic.simulate")
    parser.add_argument("--config", default="centralized_cifar10")
    parser.add_argument("--defenses", default="none,epic-0.1")
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--first-target", type=int, default=None, help="default: after --previous's, else 0")
    parser.add_argument("--workers", type=int, default=None, help="concurrent trainings; default: the probe's best")
    parser.add_argument("--probe", default="1,2,4,8", help="concurrency levels to probe")
    parser.add_argument("--probe-steps", type=int, default=100, help="batches per probe training")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default cores/pool)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for this stage, from its start")
    parser.add_argument("--margin", type=float, default=5.0, help="seconds kept free before the deadline")
    parser.add_argument("--order", choices=["targets-first", "brews-first"], default="targets-first",
                        help="targets-first: finish targets in order; brews-first: brew every target before training")
    parser.add_argument("--previous", action="append", default=[], help="table2.jsonl of an earlier run to merge")
    parser.add_argument("--out", default="runs/table2")
    parser.add_argument("--work", default=None, help="clean model and poisons (default: --out)")
    args = parser.parse_intermixed_args(argv)
    started = time.time()
    args.work = args.work or args.out
    cfg = load_config(args.config, [*args.overrides, "progress=false"])
    if args.threads or cfg.train.threads:
        torch.set_num_threads(args.threads or cfg.train.threads)
    device = resolve_device(cfg.train.device)
    output = Output(Path(args.out))
    base = {"bench": f"table2.{args.stage}", "device": str(device), "device_name": _device_name(device),
            "torch": torch.__version__, "config": args.config, "overrides": args.overrides}

    def stop(signum, frame):  # SIGTERM (a timeout): end like the deadline, keeping what finished
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if args.stage == "pretrain":
        record = pretrain(Context(cfg, device, Path(args.work), args.threads or cfg.train.threads))
        output.emit({**base, **record})
        return
    if args.stage == "brew":
        ctx = Context(cfg, device, Path(args.work), args.threads or cfg.train.threads)
        first = args.first_target or 0
        for t in range(first, first + args.targets):
            output.emit({**base, **brew(ctx, t)})
        return
    result = run(args, cfg, device, output, started)
    trainings = result.pop("all_trainings", [])
    rows = write_table(output, cfg, trainings, args.defenses.split(","))
    output.emit({**base, "event": "summary", "defenses": args.defenses.split(","), "rows": rows,
                 "paper": PAPER, "targets_done": sorted({o["target"] for o in trainings}),
                 "targets_complete": sorted(t for t in {o["target"] for o in trainings}
                                            if all(any(o["target"] == t and o["defense"] == d for o in trainings)
                                                   for d in args.defenses.split(","))),
                 "wall_seconds": round(time.time() - started, 2), **result})


if __name__ == "__main__":
    main()
