"""Centralized baselines: the EPIC paper's poisoning benchmark (Yang et al., ICML 2022, Table 2 protocol).

Per trial: draw a target, an adversarial class and poison rows (seeded), brew Witches' Brew poisons on a
clean model (trained once per run) or load them, then train a victim from scratch under every defense
in `defense.compare` with the same seed, and record whether the target flips. Label-flip and backdoor
attacks use the same loop. Controls (random / highest-loss drops) replay EPIC's per-selection drop
counts from the same trial, so they remove exactly as many rows at the same epochs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fedepic.attacks import attack_success, data_attack, poison_rows
from fedepic.attacks.gradient_matching import (
    BrewConfig, PoisonSet, apply_poisons, brew_poisons, choose_setup, gradient_alignment, load_poisons, poison_mask,
    check_poisons, save_poisons, target_gradient,
)
from fedepic.checkpoint import CHECKPOINT, Resume, checkpoint_due, metrics_size, save_checkpoint, truncate_metrics
from fedepic.columns import CENTRALIZED
from fedepic.config import ConfigError, RunConfig, TrainConfig
from fedepic.data import ImageData, load_dataset
from fedepic.builders import build_model, epic_schedule
from fedepic.epic import EpicState
from fedepic.extensions import CENTRAL_DEFENSES, DATA_ATTACKS
from fedepic.interrupts import Interrupts
from fedepic.lifecycle import Comparison, MemberReport, RunLifecycle
from fedepic.metrics import diverged, diverged_members, mean_and_se, poison_stats, success_rate
from fedepic.outputs import RunWriter
from fedepic.progress import bar, progress_bars
from fedepic.report import setting_title
from fedepic.train import evaluate, fit, resolve_device
from fedepic.seeds import selection_seed, trial_seed

TABLE_COLUMNS = CENTRALIZED.columns


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
        clean = build_model(cfg, data, cfg.seed, device)
        pre = bar(progress, "pretrain clean model", epochs)
        fit(clean, data.train_x, data.train_y, cfg.train, seed=cfg.seed, device=device, epochs=epochs,
            on_epoch=lambda rec, _: pre.advance(info=f"loss {rec.loss:.3f}"))
        sets, random_alignments = [], []
        brew_bar = bar(progress, "brew poisons", cfg.attack.targets * cfg.attack.restarts * cfg.attack.steps)
        for t in range(cfg.attack.targets):
            setup = choose_setup(data.train_y, data.test_y, data.num_classes, cfg.attack.budget, trial_seed(cfg.seed, t))
            target_x = data.test_x[setup.target_index:setup.target_index + 1].float() / 255
            poisons = brew_poisons(clean, data.train_x, data.train_y, setup.poison_indices, target_x,
                                   setup.adversarial_class, _brew_config(cfg), seed=trial_seed(cfg.seed, t),
                                   device=device, target_index=setup.target_index, target_class=setup.target_class,
                                   progress=lambda r, s, loss: brew_bar.advance(info=f"loss {loss:.3f}"))
            save_poisons(poisons, writer.dir / f"poisons-trial{t}.npz")
            sets.append(poisons)
            random_alignments.append(_random_alignment(clean, data, poisons, target_x, trial_seed(cfg.seed, t)))
    trials = [_poison_trial(t, trial_seed(cfg.seed, t), data, p) for t, p in enumerate(sets)]
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
    if DATA_ATTACKS.has(cfg.attack.data, "poison_set"):
        return _gradient_matching_trials(cfg, data, device, writer, progress, brewed)
    fraction = data_attack(cfg.attack).central_fraction  # None: the attack draws no rows (none)
    rows = poison_rows(cfg.attack, data.train_x, data.train_y, data.num_classes,
                       fraction=0.0 if fraction is None else fraction, seed=cfg.seed)
    return [Trial(t, trial_seed(cfg.seed, t), rows.x, rows.y, rows.poisoned) for t in range(cfg.attack.targets)]


class DropPolicy:
    """Which rows a defense removes after an epoch; EPIC's per-selection counts drive the controls."""

    def __init__(self, name: str, cfg: RunConfig, trial: Trial, keep: torch.Tensor, device: torch.device,
                 epic_counts: Optional[list[int]]) -> None:
        base, _, frac = name.partition("-")
        self.base, self.cfg, self.trial, self.keep, self.device = base, cfg, trial, keep, device
        self.schedule = epic_schedule(cfg, "epochs", float(frac) if frac else None)
        selects = CENTRAL_DEFENSES.has(base, "epic_selector")
        self.epic = EpicState(len(keep), self.schedule, device=device) if selects else None
        if self.epic is not None:
            self.epic.keep = keep  # share the mask the training loop reads
        fallback = [int(trial.poisoned.sum()) or max(1, round(cfg.attack.budget * len(keep)))]
        self.counts = list(epic_counts) if epic_counts else fallback
        self.generator = torch.Generator().manual_seed(selection_seed(trial.seed))
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
        return {"dropped_now": int(drop.sum()), "dropped_total": int((~self.keep).sum()),
                **poison_stats(~self.keep, self.trial.poisoned)}  # the same keys as EPIC's selections


def train_victim(cfg: RunConfig, data: ImageData, trial: Trial, defense: str, device: torch.device,
                 member: RunWriter, epic_counts: Optional[list[int]], progress_bar,
                 snapshot: Optional[dict] = None, on_snapshot=None) -> tuple[dict, list[int]]:
    """Train a fresh model on the trial's data under `defense`; returns the outcome and the drop counts.

    ``on_snapshot(state)`` gets the victim's full state after every ``checkpoint_every``-th epoch;
    passing such a state as ``snapshot`` continues the training after that epoch.
    """
    started = time.perf_counter()
    model = build_model(cfg, data, trial.seed, device)
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
            stats = {**stats, "test_accuracy": ev["accuracy"], "per_class": ev["per_class"]}
            accuracy_curve.append(ev["accuracy"])
        return stats

    def on_epoch(record, extra) -> None:
        member.log({"trial": trial.index, **record.__dict__, **extra})
        progress_bar.advance(info=f"{defense} t{trial.index} e{record.epoch} loss {record.loss:.3f}")

    def on_state(epoch: int, state: dict) -> None:
        if on_snapshot is not None and checkpoint_due(cfg.checkpoint_every, epoch, cfg.train.epochs):
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
    drops = poison_stats(dropped, trial.poisoned)
    outcome = {
        "trial": trial.index, "defense": defense, "accuracy": final["accuracy"], "per_class": final["per_class"],
        "attack_success": success, "seconds": time.perf_counter() - started, "defense_seconds": policy.seconds,
        "dropped": int(dropped.sum()), "poisons_dropped": drops["poisons_dropped"],
        "poison_recall": drops["poison_recall"] if trial.poisoned.any() else None,
        "clean_drop_rate": drops["clean_drop_rate"],
        "accuracy_curve": accuracy_curve, "diverged": _diverged(history, model, final), **trial.info,
    }
    return outcome, policy.selections


def _diverged(history: list[dict], model: torch.nn.Module, final: dict) -> bool:
    """A non-finite training loss, non-finite weights at the end (e.g. train.lr=inf), or a final model
    that predicts one class for every test image (fedepic.metrics.diverged)."""
    finite = all(math.isfinite(h["loss"]) for h in history) and all(
        bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point())
    return diverged(finite, final)


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


def _ordered(members: list[str]) -> list[str]:
    """EPIC members first: the controls replay the counts of the first EPIC member."""
    return sorted(members, key=lambda m: 0 if _is_epic(m) else 1)


def _is_epic(member: str) -> bool:
    """Whether ``defense.compare`` member ``member`` (``NAME`` or ``NAME-F``) is EPIC itself (``epic_selector``)."""
    return CENTRAL_DEFENSES.has(member.partition("-")[0], "epic_selector")


def run_centralized(cfg: RunConfig, *, interrupts: Optional[Interrupts] = None,
                    resume: Optional[Resume] = None) -> Path:
    """Run the centralized benchmark and return the run folder.

    Every exit path writes true statuses (fedepic.lifecycle): a member whose trials all finished is
    "completed", one cut short "interrupted" (SIGINT, SIGTERM) or "failed", and the root summary lists
    the finished members, which the comparison covers.

    Checkpoints (``checkpoint.pt`` in the run folder) are written after the poisons are brewed, after
    each victim, and every ``checkpoint_every`` epochs within one. With ``resume`` the run continues
    in the interrupted folder: brewed poisons are read back, finished victims kept, the interrupted
    one continues after its last checkpointed epoch.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = load_dataset(cfg.data, cfg.seed)  # before anything is written: a data error leaves no folder
    if DATA_ATTACKS.has(cfg.attack.data, "poison_set") and cfg.attack.poisons:  # a bad poison file too
        check_poisons(load_poisons(cfg.attack.poisons), data.train_x, data.train_y, data.test_y, data.num_classes,
                      cfg.attack.eps)
    device = resolve_device(cfg.train.device)
    members = _ordered(defense_members(cfg))
    saved = resume.checkpoint if resume is not None else None
    comparison = Comparison(TABLE_COLUMNS, CENTRALIZED.panels, setting_title(cfg), xlabel="epoch")
    histogram = torch.bincount(data.train_y, minlength=data.num_classes).tolist()
    life = RunLifecycle(cfg, members, comparison, interrupts=interrupts, resume=resume,
                        extras=lambda rows: _root_figures(rows, histogram))
    with life, progress_bars(cfg.progress) as progress:
        if resume is not None and saved is None:
            life.start_over()  # stopped before its first checkpoint: start over in the same folder
        checkpoint = _Progress(life, saved)
        outcomes = checkpoint.outcomes(members)
        trials = build_trials(cfg, data, device, life.root, progress, saved["brewed"] if saved else None)
        checkpoint.save(brewed=[t.info.get("random_alignment") for t in trials], outcomes=outcomes)
        _train_members(cfg, data, device, trials, members, outcomes, life, progress, checkpoint)
    return life.path


def _root_figures(rows: list[dict], histogram: list[int]) -> dict:
    """The root summary's own figures: the diverged members (each also a warning line) and the labels."""
    names = diverged_members(rows, "defense", lambda r: f"in {r['diverged_trials']} trial(s)"
                             if r["diverged_trials"] else None)
    return {"diverged": names, "class_histogram": histogram}


def _member_report(cfg: RunConfig, member: str, outcomes: list[dict]) -> MemberReport:
    """A member's summary (its trials so far), comparison row and test-accuracy curve: the mean over its
    finished trials at each evaluated epoch, with its standard error (fedepic.plots: "@se", "@x")."""
    row = summarise(member, outcomes, DATA_ATTACKS.has(cfg.attack.data, "poison_set")) if outcomes else {}
    return MemberReport({"defense": member, "trials_done": len(outcomes), "trials_detail": outcomes, **row}, row,
                        accuracy_curves([o["accuracy_curve"] for o in outcomes], cfg.train))


def accuracy_curves(per_trial: list[list[float]], train: TrainConfig) -> dict[str, list[float]]:
    """The trials' test-accuracy curves as one mean curve with its s.e. at the evaluated epochs
    (every ``train.eval_every``-th and the last); empty without a trial."""
    if not per_trial:
        return {}
    epochs = [e for e in range(1, train.epochs + 1) if e % train.eval_every == 0 or e == train.epochs]
    points = [mean_and_se([curve[j] for curve in per_trial if j < len(curve)])
              for j in range(max(len(curve) for curve in per_trial))]
    return {"test_accuracy": [m for m, _ in points], "test_accuracy@se": [se for _, se in points],
            "test_accuracy@x": epochs[:len(points)]}


class _Progress:
    """The run's checkpoint: finished victims, the interrupted one's state, the metrics files' lengths."""

    def __init__(self, life: RunLifecycle, saved: Optional[dict]) -> None:
        self.life, self.saved = life, saved or {}
        # a resumed run starts from what was saved: the interrupted victim and the trial's EPIC counts
        # stay in the checkpoint until they are replaced, so a second interruption loses nothing
        self.state: dict = {"outcomes": {}, "epic_counts": None, "victim": None, "brewed": None, "offsets": {},
                            **{k: v for k, v in self.saved.items() if k != "format_version"}}
        if self.saved:  # root lines after the checkpoint are logged again
            truncate_metrics(life.root.dir, self.saved["offsets"].get(""))

    def outcomes(self, members: list[str]) -> dict[str, list[dict]]:
        kept = self.saved.get("outcomes", {})
        return {m: [dict(o) for o in kept.get(m, [])] for m in members}

    def offset(self, member: str) -> Optional[int]:
        """The member's metrics.jsonl length at the checkpoint; None: the checkpoint has none of its lines."""
        return self.saved.get("offsets", {}).get(member)

    def victim(self, trial: int, defense: str) -> Optional[dict]:
        """The saved state of this victim's interrupted training, if the checkpoint holds it."""
        victim = self.saved.get("victim")
        if victim is not None and victim["trial"] == trial and victim["defense"] == defense:
            return victim
        return None

    def epic_counts(self, trial: int) -> Optional[list[int]]:
        counts = self.saved.get("epic_counts")
        return list(counts["counts"]) if counts is not None and counts["trial"] == trial else None

    def save(self, **updates) -> None:
        """Write the checkpoint with ``updates`` (outcomes, epic_counts, victim, brewed) applied."""
        root = self.life.root
        self.state.update(updates)
        # members closed since keep the lengths recorded while they were open
        self.state["offsets"] = {**self.state.get("offsets", {}), "": metrics_size(root.dir),
                                 **{name: metrics_size(mw.dir) for name, mw in self.life.writers.items()}}
        save_checkpoint(root.dir / CHECKPOINT, self.state)


def _member_writer(cfg: RunConfig, member: str, outcomes: dict[str, list[dict]], life: RunLifecycle,
                   checkpoint: _Progress, finished: bool = False) -> RunWriter:
    """The member's folder, opened when it first trains (reopened where the checkpoint left it; a
    member whose trials all finished keeps every line it logged)."""
    if member not in life.writers:
        offset = metrics_size(life.root.dir / member) if finished else checkpoint.offset(member)
        life.open_member(member, lambda: _member_report(cfg, member, outcomes[member]), offset)
    return life.writers[member]


def _train_members(cfg: RunConfig, data: ImageData, device: torch.device, trials: list[Trial], members: list[str],
                   outcomes: dict[str, list[dict]], life: RunLifecycle, progress, checkpoint: _Progress) -> None:
    for member in members:  # finished before the resume: kept, or (cut before its status) completed now
        if len(outcomes[member]) == len(trials):
            if life.kept(member):
                report = _member_report(cfg, member, outcomes[member])
                life.keep(member, report.row, report.curves)
            else:
                _member_writer(cfg, member, outcomes, life, checkpoint, finished=True)
                life.complete(member)
    train_bar = bar(progress, "train victims", len(trials) * len(members) * cfg.train.epochs)
    for trial in trials:
        epic_counts = checkpoint.epic_counts(trial.index)
        for member in members:
            if len(outcomes[member]) > trial.index:  # finished before the resume
                train_bar.advance(cfg.train.epochs)
                continue
            counts_record = {"trial": trial.index, "counts": epic_counts} if epic_counts is not None else None

            def save_victim(state: dict, counts: Optional[dict] = counts_record) -> None:
                checkpoint.save(epic_counts=counts, victim=state)

            writer = _member_writer(cfg, member, outcomes, life, checkpoint)
            outcome, counts = train_victim(cfg, data, trial, member, device, writer, epic_counts, train_bar,
                                           checkpoint.victim(trial.index, member), save_victim)
            if _is_epic(member) and epic_counts is None:
                epic_counts = counts
            outcomes[member].append(outcome)
            life.root.log({"event": "trial", **{k: v for k, v in outcome.items() if k != "accuracy_curve"}})
            checkpoint.save(outcomes=outcomes, victim=None,
                            epic_counts={"trial": trial.index, "counts": epic_counts} if epic_counts is not None else None)
            if len(outcomes[member]) == len(trials):  # after the checkpoint: a "completed" member is in it
                life.complete(member)
