"""Centralized baselines: the EPIC paper's poisoning benchmark (Yang et al., ICML 2022, Table 2 protocol).

Per trial: draw a target, an adversarial class and poison rows (seeded), brew Witches' Brew poisons on a
clean model (trained once per run) or load them, then train a victim from scratch under every defense
in `defense.compare` with the same seed, and record whether the target flips. Label-flip and backdoor
attacks use the same loop. Controls (random / highest-loss drops) replay EPIC's per-selection drop
counts from the same trial, so they remove exactly as many rows at the same epochs.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fedepic.attacks import attack_success, poison_rows
from fedepic.attacks.gradient_matching import (
    BrewConfig, PoisonSet, apply_poisons, brew_poisons, choose_setup, gradient_alignment, load_poisons, poison_mask,
    check_poisons, save_poisons, target_gradient,
)
from fedepic.checkpoint import CHECKPOINT, Resume, metrics_size, remove_checkpoints, save_checkpoint, truncate_metrics
from fedepic.config import ConfigError, RunConfig, to_yaml
from fedepic.data import ImageData, load_dataset
from fedepic.epic import EpicSchedule, EpicState
from fedepic.extensions import CENTRAL_DEFENSES
from fedepic.interrupts import Interrupts
from fedepic.metrics import mean_and_se, success_rate
from fedepic.models import model_for_data
from fedepic.outputs import RunWriter, csv_table, markdown_table
from fedepic.plots import close, comparison_figure, curves_figure
from fedepic.progress import bar, progress_bars
from fedepic.train import evaluate, fit, prepare_model, resolve_device

TABLE_COLUMNS = ("defense", "attack_success", "attack_success_se", "accuracy", "accuracy_se", "seconds",
                 "dropped", "poison_recall", "clean_drop_rate", "trials", "brew_alignment", "random_alignment")


@dataclass
class Trial:
    """One poisoned training set and what measures the attack on it."""

    index: int
    seed: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    poisoned: torch.Tensor
    target_x: Optional[torch.Tensor] = None
    adversarial_class: Optional[int] = None
    info: dict = field(default_factory=dict)


def defense_members(cfg: RunConfig) -> list[str]:
    if cfg.defense.compare:
        return list(cfg.defense.compare)
    return [f"epic-{cfg.defense.epic.fraction:g}"] if cfg.defense.epic.enabled else ["none"]


def epic_schedule(cfg: RunConfig, fraction: Optional[float] = None) -> EpicSchedule:
    epic = cfg.defense.epic
    until = epic.until if epic.until is not None else (max(cfg.train.milestones) if cfg.train.milestones else None)
    return EpicSchedule(fraction=fraction or epic.fraction, warmup=epic.warmup, interval=epic.interval,
                        until=until, proxy=epic.proxy, threshold=epic.threshold)


def new_model(cfg: RunConfig, data: ImageData, seed: int, device: torch.device) -> torch.nn.Module:
    return prepare_model(model_for_data(cfg.model.name, data, seed=seed), device, cfg.train.amp)


def _brew_config(cfg: RunConfig) -> BrewConfig:
    a = cfg.attack
    return BrewConfig(eps=a.eps / 255, budget=a.budget, restarts=a.restarts, steps=a.steps, tau=a.tau,
                      augment=cfg.train.augment != "none", pad=cfg.train.crop_pad, flip=cfg.train.augment == "crop_flip")


def _gradient_matching_trials(cfg: RunConfig, data: ImageData, device: torch.device, writer: RunWriter,
                              progress, brewed: Optional[list] = None) -> list[Trial]:
    """``brewed``: the random alignments of a resumed run, whose poisons are read back from its folder."""
    if cfg.attack.poisons:
        sets, random_alignments = [load_poisons(cfg.attack.poisons)], [None]
    elif brewed is not None:
        sets = [load_poisons(writer.dir / f"poisons-trial{t}.npz") for t in range(cfg.attack.targets)]
        random_alignments = list(brewed)
    else:
        epochs = cfg.attack.pretrain_epochs or cfg.train.epochs
        clean = new_model(cfg, data, cfg.seed, device)
        pre = bar(progress, "pretrain clean model", epochs)
        fit(clean, data.train_x, data.train_y, cfg.train, seed=cfg.seed, device=device, epochs=epochs,
            on_epoch=lambda rec, _: pre.advance(info=f"loss {rec.loss:.3f}"))
        sets, random_alignments = [], []
        brew_bar = bar(progress, "brew poisons", cfg.attack.targets * cfg.attack.restarts * cfg.attack.steps)
        for t in range(cfg.attack.targets):
            setup = choose_setup(data.train_y, data.test_y, data.num_classes, cfg.attack.budget, cfg.seed + 1000 * t)
            target_x = data.test_x[setup.target_index:setup.target_index + 1].float() / 255
            poisons = brew_poisons(clean, data.train_x, data.train_y, setup.poison_indices, target_x,
                                   setup.adversarial_class, _brew_config(cfg), seed=cfg.seed + 1000 * t,
                                   device=device, target_index=setup.target_index, target_class=setup.target_class,
                                   progress=lambda r, s, loss: brew_bar.advance(info=f"loss {loss:.3f}"))
            save_poisons(poisons, writer.dir / f"poisons-trial{t}.npz")
            sets.append(poisons)
            random_alignments.append(_random_alignment(clean, data, poisons, target_x, cfg.seed + 1000 * t))
    trials = [_poison_trial(t, cfg.seed + 1000 * t, data, p) for t, p in enumerate(sets)]
    for trial, aligned in zip(trials, random_alignments):
        trial.info["random_alignment"] = aligned
    return trials


def _random_alignment(model: torch.nn.Module, data: ImageData, poisons: PoisonSet, target_x: torch.Tensor,
                      seed: int) -> float:
    """Cosine of the target gradient with the gradient of random +-eps perturbations of the same rows:
    the baseline that brewed alignment must beat."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    clean = data.train_x[poisons.indices].float() / 255
    signs = torch.randint(0, 2, clean.shape, generator=gen).float() * 2 - 1
    perturbed = (clean + signs * poisons.eps).clamp(0, 1)
    grad = target_gradient(model, target_x.to(device), poisons.adversarial_class)
    return gradient_alignment(model, perturbed.to(device), data.train_y[poisons.indices].to(device), grad)


def _poison_trial(index: int, seed: int, data: ImageData, poisons: PoisonSet) -> Trial:
    if not 0 <= poisons.target_index < len(data.test_y):
        raise ConfigError(f"attack.poisons: target index {poisons.target_index} is outside this test set")
    target_x = data.test_x[poisons.target_index:poisons.target_index + 1].float() / 255
    info = {"target_index": poisons.target_index, "target_class": poisons.target_class,
            "adversarial_class": poisons.adversarial_class, "poisons": len(poisons.indices),
            "brew_alignment": poisons.alignment}
    return Trial(index, seed, apply_poisons(data.train_x, poisons), data.train_y,
                 poison_mask(len(data.train_y), poisons), target_x, poisons.adversarial_class, info)


def build_trials(cfg: RunConfig, data: ImageData, device: torch.device, writer: RunWriter, progress,
                 brewed: Optional[list] = None) -> list[Trial]:
    if cfg.attack.data == "gradient_matching":
        return _gradient_matching_trials(cfg, data, device, writer, progress, brewed)
    rows = poison_rows(cfg.attack, data.train_x, data.train_y, data.num_classes,
                       fraction=cfg.attack.budget if cfg.attack.data == "label_flip" else cfg.attack.backdoor_fraction,
                       seed=cfg.seed)
    return [Trial(t, cfg.seed + 1000 * t, rows.x, rows.y, rows.poisoned) for t in range(cfg.attack.targets)]


class DropPolicy:
    """Which rows a defense removes after an epoch; EPIC's per-selection counts drive the controls."""

    def __init__(self, name: str, cfg: RunConfig, trial: Trial, keep: torch.Tensor, device: torch.device,
                 epic_counts: Optional[list[int]]) -> None:
        base, _, frac = name.partition("-")
        self.base, self.cfg, self.trial, self.keep, self.device = base, cfg, trial, keep, device
        self.schedule = epic_schedule(cfg, float(frac) if frac else None)
        self.epic = EpicState(len(keep), self.schedule, device=device) if base == "epic" else None
        if self.epic is not None:
            self.epic.keep = keep  # share the mask the training loop reads
        fallback = [int(trial.poisoned.sum()) or max(1, round(cfg.attack.budget * len(keep)))]
        self.counts = list(epic_counts) if epic_counts else fallback
        self.generator = torch.Generator().manual_seed(trial.seed + 7)
        self.selections: list[int] = []
        self.seconds = 0.0

    def state_dict(self) -> dict:
        """What decides the policy's next drops besides the shared ``keep`` mask."""
        return {"selections": list(self.selections), "generator": self.generator.get_state(),
                "epic_selections": self.epic.selections if self.epic is not None else 0}

    def load_state_dict(self, state: dict) -> None:
        self.selections = list(state["selections"])
        self.generator.set_state(state["generator"])
        if self.epic is not None:
            self.epic.selections = int(state["epic_selections"])

    def __call__(self, epoch: int, model: torch.nn.Module) -> dict:
        if CENTRAL_DEFENSES.has(self.base, "inactive") or not self.schedule.is_selection_epoch(epoch):
            return {}
        started = time.perf_counter()
        if self.epic is not None:
            stats = self.epic.select(model, self.trial.train_x, self.trial.train_y, self.trial.poisoned)
            self.selections.append(stats["dropped_now"])
        else:
            stats = self._control(model)
        self.seconds += time.perf_counter() - started
        return stats

    def _control(self, model: torch.nn.Module) -> dict:
        """One selection of a control of ``fedepic.extensions.CENTRAL_DEFENSES``, bound by signature to
        the kept rows and, for the ``replays_epic`` ones, EPIC's drop count of the same selection."""
        step, entry = len(self.selections), CENTRAL_DEFENSES.get(self.base)
        if step >= (1 if "once" in entry.flags else len(self.counts)):
            return {}
        rows = self.keep.nonzero().squeeze(1)
        x, y = self.trial.train_x[rows], self.trial.train_y[rows]
        count = min(self.counts[step], len(rows)) if "replays_epic" in entry.flags else 0
        context = {"n": len(rows), "count": count, "generator": self.generator, "model": model, "x_uint8": x,
                   "y": y, "device": self.device}
        drop = CENTRAL_DEFENSES.build(self.base, self.cfg, context)
        self.keep[rows[drop]] = False
        self.selections.append(int(drop.sum()))
        dropped = ~self.keep
        poisons = self.trial.poisoned
        return {"dropped_now": int(drop.sum()), "dropped_total": int(dropped.sum()),
                "poisons_dropped": int((dropped & poisons).sum()),
                "poison_recall": (dropped & poisons).sum().item() / max(int(poisons.sum()), 1),
                "clean_dropped": int((dropped & ~poisons).sum())}


def train_victim(cfg: RunConfig, data: ImageData, trial: Trial, defense: str, device: torch.device,
                 member: RunWriter, epic_counts: Optional[list[int]], progress_bar,
                 snapshot: Optional[dict] = None, on_snapshot=None) -> tuple[dict, list[int]]:
    """Train a fresh model on the trial's data under `defense`; returns the outcome and the drop counts.

    ``on_snapshot(state)`` gets the victim's full state after every ``checkpoint_every``-th epoch;
    passing such a state as ``snapshot`` continues the training after that epoch.
    """
    started = time.perf_counter()
    model = new_model(cfg, data, trial.seed, device)
    keep = torch.ones(len(trial.train_y), dtype=torch.bool)
    policy = DropPolicy(defense, cfg, trial, keep, device, epic_counts)
    accuracy_curve: list[float] = []
    if snapshot is not None:
        model.load_state_dict(snapshot["model"])
        keep.copy_(snapshot["keep"])
        policy.load_state_dict(snapshot["policy"])
        accuracy_curve = list(snapshot["accuracy_curve"])
        progress_bar.advance(int(snapshot["fit"]["epoch"]))

    def epoch_end(epoch: int, net: torch.nn.Module) -> dict:
        stats = policy(epoch, net)
        if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
            ev = evaluate(net, data.test_x, data.test_y, cfg.train.eval_batch_size, data.num_classes, cfg.train.amp)
            stats = {**stats, "test_accuracy": ev["accuracy"]}
            accuracy_curve.append(ev["accuracy"])
        return stats

    def on_epoch(record, extra) -> None:
        member.log({"trial": trial.index, **record.__dict__, **extra})
        progress_bar.advance(info=f"{defense} t{trial.index} e{record.epoch} loss {record.loss:.3f}")

    def on_state(epoch: int, state: dict) -> None:
        if on_snapshot is not None and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 \
                and epoch < cfg.train.epochs:
            on_snapshot({"trial": trial.index, "defense": defense, "fit": state, "keep": keep.clone(),
                         "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                         "policy": policy.state_dict(), "accuracy_curve": list(accuracy_curve)})

    history = fit(model, trial.train_x, trial.train_y, cfg.train, seed=trial.seed, device=device, keep=keep,
                  epoch_end=epoch_end, on_epoch=on_epoch, resume=snapshot["fit"] if snapshot else None,
                  on_state=on_state)
    final = evaluate(model, data.test_x, data.test_y, cfg.train.eval_batch_size, data.num_classes, cfg.train.amp)
    success = attack_success(model, cfg.attack, data.test_x, data.test_y, data.num_classes, trial.target_x,
                             trial.adversarial_class)
    dropped = ~keep
    outcome = {
        "trial": trial.index, "defense": defense, "accuracy": final["accuracy"], "per_class": final["per_class"],
        "attack_success": success, "seconds": time.perf_counter() - started, "defense_seconds": policy.seconds,
        "dropped": int(dropped.sum()), "poisons_dropped": int((dropped & trial.poisoned).sum()),
        "poison_recall": ((dropped & trial.poisoned).sum() / trial.poisoned.sum()).item()
        if trial.poisoned.any() else None,
        "clean_drop_rate": ((dropped & ~trial.poisoned).sum() / (~trial.poisoned).sum()).item(),
        "accuracy_curve": accuracy_curve, "diverged": _diverged(history, model), **trial.info,
    }
    return outcome, policy.selections


def _diverged(history: list[dict], model: torch.nn.Module) -> bool:
    """A non-finite training loss, or non-finite weights at the end (e.g. train.lr=inf)."""
    return not all(math.isfinite(h["loss"]) for h in history) or not all(
        bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point())


def summarise(defense: str, outcomes: list[dict], binary_success: bool) -> dict:
    successes = [o["attack_success"] for o in outcomes if o["attack_success"] is not None]
    if binary_success:
        asr, asr_se = success_rate([s >= 0.5 for s in successes])
    else:
        asr, asr_se = mean_and_se(successes) if successes else (None, None)
    acc, acc_se = mean_and_se([o["accuracy"] for o in outcomes])
    recalls = [o["poison_recall"] for o in outcomes if o["poison_recall"] is not None]
    return {"defense": defense, "attack_success": asr, "attack_success_se": asr_se, "accuracy": acc,
            "accuracy_se": acc_se, "seconds": mean_and_se([o["seconds"] for o in outcomes])[0],
            "dropped": mean_and_se([o["dropped"] for o in outcomes])[0],
            "poison_recall": mean_and_se(recalls)[0] if recalls else None,
            "clean_drop_rate": mean_and_se([o["clean_drop_rate"] for o in outcomes])[0], "trials": len(outcomes),
            "diverged_trials": sum(bool(o.get("diverged")) for o in outcomes),
            **{key: _mean_of(outcomes, key) for key in ("brew_alignment", "random_alignment")}}


def _mean_of(outcomes: list[dict], key: str) -> Optional[float]:
    values = [o[key] for o in outcomes if o.get(key) is not None]
    return sum(values) / len(values) if values else None


def _write_tables(writer: RunWriter, rows: list[dict], curves: dict[str, dict[str, list[float]]], title: str) -> None:
    writer.write_text("comparison.md", f"# {title}\n\n" + markdown_table(rows, TABLE_COLUMNS))
    writer.write_text("comparison.csv", csv_table(rows, TABLE_COLUMNS))
    fig = comparison_figure(curves, ["test_accuracy"], "evaluation", title)
    writer.save_figure(fig, "comparison.png")
    close(fig)


def _ordered(members: list[str]) -> list[str]:
    """EPIC members first: the controls replay the counts of the first EPIC member."""
    return sorted(members, key=lambda m: 0 if m.startswith("epic") else 1)


def run_centralized(cfg: RunConfig, *, interrupts: Optional[Interrupts] = None,
                    resume: Optional[Resume] = None) -> Path:
    """Run the centralized benchmark and return the run folder.

    Every exit path writes true statuses: a member whose trials all finished is "completed", one cut
    short "interrupted" (SIGINT, SIGTERM) or "failed", and the root summary lists the finished members.

    Checkpoints (``checkpoint.pt`` in the run folder) are written after the poisons are brewed, after
    each victim, and every ``checkpoint_every`` epochs within one. With ``resume`` the run continues
    in the interrupted folder: brewed poisons are read back, finished victims kept, the interrupted
    one continues after its last checkpointed epoch.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = load_dataset(cfg.data, cfg.seed)  # before anything is written: a data error leaves no folder
    if cfg.attack.data == "gradient_matching" and cfg.attack.poisons:  # a bad poison file too
        check_poisons(load_poisons(cfg.attack.poisons), data.train_x, data.train_y, data.test_y, data.num_classes,
                      cfg.attack.eps)
    device = resolve_device(cfg.train.device)
    members = _ordered(defense_members(cfg))
    saved = resume.checkpoint if resume is not None else None
    interrupts = interrupts if interrupts is not None else Interrupts()
    with interrupts, progress_bars(cfg.progress) as progress, \
            RunWriter(cfg.output_dir, cfg.name, resume=resume.run_dir if resume else None) as writer:
        if resume is not None and saved is None:
            _clear(writer.dir)  # stopped before its first checkpoint: start over in the same folder
        writer.write_config(to_yaml(cfg))
        progress_state = _Progress(writer, saved)
        outcomes, trials = progress_state.outcomes(members), []
        member_writers: dict[str, RunWriter] = {}
        try:
            trials = build_trials(cfg, data, device, writer, progress, saved["brewed"] if saved else None)
            for m in members:
                member_writers[m] = RunWriter(cfg.output_dir, m, parent=writer).__enter__()
            progress_state.restore_metrics(member_writers)
            progress_state.save(member_writers, brewed=[t.info.get("random_alignment") for t in trials],
                                outcomes=outcomes)
            _train_members(cfg, data, device, trials, members, member_writers, outcomes, writer, progress,
                           progress_state)
        except BaseException as err:
            writer.mark(err)
            raise
        finally:
            with interrupts.polled():  # a signal now must not cut the summaries short
                _write_run(cfg, data, writer, members, member_writers, outcomes, trials, resume)
                if writer.status == "running":
                    remove_checkpoints(writer.dir)
    return writer.path


def _clear(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


class _Progress:
    """The run's checkpoint: finished victims, the interrupted one's state, the metrics files' lengths."""

    def __init__(self, writer: RunWriter, saved: Optional[dict]) -> None:
        self.writer, self.saved = writer, saved or {}
        # a resumed run starts from what was saved: the interrupted victim and the trial's EPIC counts
        # stay in the checkpoint until they are replaced, so a second interruption loses nothing
        self.state: dict = {"outcomes": {}, "epic_counts": None, "victim": None, "brewed": None, "offsets": {},
                            **{k: v for k, v in self.saved.items() if k != "format_version"}}

    def outcomes(self, members: list[str]) -> dict[str, list[dict]]:
        kept = self.saved.get("outcomes", {})
        return {m: [dict(o) for o in kept.get(m, [])] for m in members}

    def restore_metrics(self, member_writers: dict[str, RunWriter]) -> None:
        """Cut every metrics.jsonl back to its length at the checkpoint (lines after it are redone)."""
        if not self.saved:
            return
        offsets = self.saved["offsets"]
        truncate_metrics(self.writer.dir, offsets.get(""))
        for name, mw in member_writers.items():
            truncate_metrics(mw.dir, offsets.get(name))

    def victim(self, trial: int, defense: str) -> Optional[dict]:
        """The saved state of this victim's interrupted training, if the checkpoint holds it."""
        victim = self.saved.get("victim")
        if victim is not None and victim["trial"] == trial and victim["defense"] == defense:
            return victim
        return None

    def epic_counts(self, trial: int) -> Optional[list[int]]:
        counts = self.saved.get("epic_counts")
        return list(counts["counts"]) if counts is not None and counts["trial"] == trial else None

    def save(self, member_writers: dict[str, RunWriter], **updates) -> None:
        """Write the checkpoint with ``updates`` (outcomes, epic_counts, victim, brewed) applied."""
        self.state.update(updates)
        self.state["offsets"] = {"": metrics_size(self.writer.dir),
                                 **{name: metrics_size(mw.dir) for name, mw in member_writers.items()}}
        save_checkpoint(self.writer.dir / CHECKPOINT, self.state)


def _write_run(cfg: RunConfig, data: ImageData, writer: RunWriter, members: list[str],
               member_writers: dict[str, RunWriter], outcomes: dict[str, list[dict]], trials: list[Trial],
               resume: Optional[Resume] = None) -> None:
    """Members' summaries, the comparison of those with results, and the root summary. Members a
    resumed run found finished keep their folders as they were."""
    finished = [m for m in members if trials and len(outcomes[m]) == len(trials)]
    kept = [m for m in members if resume is not None and resume.finished(m)]
    _write_members(cfg, [m for m in members if m in member_writers and m not in kept], member_writers, outcomes,
                   finished, writer.status)
    for m in kept:
        member_writers[m].summary_written = True  # its summary stays as it is
        member_writers[m].close()
    binary = cfg.attack.data == "gradient_matching"
    rows = [summarise(m, outcomes[m], binary) for m in members if outcomes[m]]
    if rows:
        curves = {m: {"test_accuracy": outcomes[m][0]["accuracy_curve"]} for m in members if outcomes[m]}
        _write_tables(writer, rows, curves, f"{cfg.name}: {cfg.attack.data} on {cfg.data.name}")
    diverged = [r for r in rows if r["diverged_trials"]]
    for r in diverged:
        print(f"fedepic: warning: {r['defense']} diverged (non-finite loss or weights) in {r['diverged_trials']} "
              "trial(s)", file=sys.stderr)
    writer.write_summary({"mode": "centralized", "finished": finished, "diverged": [r["defense"] for r in diverged], "rows": rows,
                          "class_histogram": torch.bincount(data.train_y, minlength=data.num_classes).tolist(),
                          "resumed": resume is not None})


def _train_members(cfg: RunConfig, data: ImageData, device: torch.device, trials: list[Trial], members: list[str],
                   member_writers: dict[str, RunWriter], outcomes: dict[str, list[dict]], writer: RunWriter,
                   progress, checkpoint: _Progress) -> None:
    train_bar = bar(progress, "train victims", len(trials) * len(members) * cfg.train.epochs)
    for trial in trials:
        epic_counts = checkpoint.epic_counts(trial.index)
        for member in members:
            if len(outcomes[member]) > trial.index:  # finished before the resume
                train_bar.advance(cfg.train.epochs)
                continue
            counts_record = {"trial": trial.index, "counts": epic_counts} if epic_counts is not None else None

            def save_victim(state: dict, counts: Optional[dict] = counts_record) -> None:
                checkpoint.save(member_writers, epic_counts=counts, victim=state)

            outcome, counts = train_victim(cfg, data, trial, member, device, member_writers[member],
                                           epic_counts, train_bar, checkpoint.victim(trial.index, member), save_victim)
            if member.startswith("epic") and epic_counts is None:
                epic_counts = counts
            outcomes[member].append(outcome)
            writer.log({"event": "trial", **{k: v for k, v in outcome.items() if k != "accuracy_curve"}})
            checkpoint.save(member_writers, outcomes=outcomes, victim=None,
                            epic_counts={"trial": trial.index, "counts": epic_counts} if epic_counts is not None else None)


def _write_members(cfg: RunConfig, members: list[str], member_writers: dict[str, RunWriter],
                   outcomes: dict[str, list[dict]], finished: list[str], run_status: str) -> None:
    """Each member's summary (finished ones "completed", the others the run's status) and curves."""
    binary = cfg.attack.data == "gradient_matching"
    for m in members:
        mw = member_writers[m]
        mw.status = "completed" if m in finished else (run_status if run_status != "running" else "failed")
        mw.write_summary({"defense": m, "trials_done": len(outcomes[m]), "trials_detail": outcomes[m],
                          **(summarise(m, outcomes[m], binary) if outcomes[m] else {})})
        if outcomes[m]:
            fig = curves_figure({"test_accuracy": outcomes[m][0]["accuracy_curve"]}, "evaluation", m)
            mw.save_figure(fig, "curves.png")
            close(fig)
        mw.close()
