"""Who&When-style evaluation: k-fold cross-validation on one set of logs, or fit on one system and score
another (:func:`transfer`), always beside the trivial baselines of the data being scored, with exact McNemar
tests, and with the published anchors of that data only (:mod:`kvmas.attribution.anchors`).

Only held-out predictions are scored: the step scorer (and the baseline that needs fitting, the most frequent
gold agent) sees the training side only. Agent accuracy compares normalised names; step accuracy is exact
integer equality, plus ±1 / ±3 tolerance. No record is dropped silently: every skip is counted with its reason.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvmas.attribution.anchors import ANCHORS, data_kind
from kvmas.attribution.attributor import AgentRule, decide, live_steps
from kvmas.attribution.log import AttributionLog, AttributionWarning, SkippedRecord, iter_logs, normalize_agent
from kvmas.attribution.portable import featurize
from kvmas.attribution.scorer import StepScorer, kfold
from kvmas.errors import BadInputError
from kvmas.stats import McNemar

RULES: tuple[AgentRule, ...] = ("shapley", "speaker")


@dataclass
class Item:
    """What the evaluator keeps per record (compact: feature rows, candidates, speakers, outcome ancestors)."""

    log_id: str
    gold_agent: str
    gold_step: int
    agents: list[str]
    cand: list[int]
    live: set[int]
    x: np.ndarray

    @property
    def players(self) -> list[str]:
        return list(dict.fromkeys(self.agents[i] for i in self.cand))


@dataclass
class Dataset:
    """The usable items of one file, under one feature set, with what was skipped and the data's kind."""

    path: str
    items: list[Item]
    names: list[str]
    warnings: list[str]
    skipped: dict[str, int]
    kind: str


def load(path: str | Path, with_gt: bool = False, feature_set: str = "portable") -> Dataset:
    """Read labelled records (streamed); bad or unlabelled records are counted under ``skipped`` by reason."""
    items: list[Item] = []
    msgs: list[str] = []
    skipped: Counter = Counter()
    names: list[str] | None = None
    logs: list[AttributionLog] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AttributionWarning)
        for log in iter_logs(path):
            if not log.labelled():
                msgs.append(f"{log.log_id}: no gold label, skipped")
                skipped["no gold label"] += 1
                continue
            if with_gt and not log.ground_truth:
                msgs.append(f"{log.log_id}: no ground_truth; gold-answer features are zero")
            try:
                fx, cand = featurize(log, feature_set, with_gt=with_gt)
            except BadInputError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the evaluation
                msgs.append(f"{log.log_id}: feature extraction failed: {exc}")
                skipped["feature extraction failed"] += 1
                continue
            spk = log.steps[log.gold_step].agent
            if normalize_agent(spk) != normalize_agent(log.gold_agent):
                msgs.append(f"{log.log_id}: label noise: step {log.gold_step} is spoken by {spk}, "
                            f"gold agent is {log.gold_agent}")
            if log.gold_step not in cand:
                msgs.append(f"{log.log_id}: gold step {log.gold_step} is a task or tool turn (never predicted)")
            names = fx.names
            logs.append(log)
            items.append(Item(log.log_id, log.gold_agent, log.gold_step, [s.agent for s in log.steps], cand,
                              live_steps(fx.perf), np.array(fx.rows)))
    bad = [str(w.message) for w in caught]
    skipped["unreadable record"] += sum(issubclass(w.category, SkippedRecord) for w in caught)
    if not items:
        raise BadInputError(f"{path}: no usable labelled records ({_skips(skipped)})")
    return Dataset(str(path), items, names or [], bad + msgs, {k: v for k, v in skipped.items() if v},
                   data_kind(logs))


def _skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in skipped.items() if v) or "none skipped"


def fit(items: list[Item], names: list[str], l2: float = 1.0) -> StepScorer:
    """The step scorer fitted on the candidates of ``items`` (records whose gold step is no candidate teach
    nothing about ranking candidates and are left out of the fit)."""
    usable = [it for it in items if it.gold_step in it.cand]
    if not usable:
        raise BadInputError("no training record has its gold step among the candidate steps")
    return StepScorer(names, l2=l2).fit([it.x[it.cand] for it in usable],
                                        [it.cand.index(it.gold_step) for it in usable])


def predict(sc: StepScorer, it: Item, rule: AgentRule) -> tuple[tuple[str, int], list[int]]:
    """``((agent, step), step order)``: candidate probabilities (zero elsewhere) through :func:`decide`."""
    probs = np.zeros(len(it.agents))
    probs[it.cand] = sc.probs(it.x[it.cand])
    agent, step, _, order = decide(probs, it.agents, it.players, it.live, rule)
    return (agent, step), [k for k in order if k in set(it.cand)]


def _first_turn(it: Item, agent: str) -> int | None:
    return next((i for i in it.cand if normalize_agent(it.agents[i]) == normalize_agent(agent)), None)


def baselines(items: list[Item], train: list[Item]) -> dict[str, list[tuple[str, int]]]:
    """Trivial predictions for every item of the scored data; ``train_gold_agent`` is fitted on ``train``
    (its most frequent gold agent and that agent's first turn; where that agent never speaks, the first
    candidate turn)."""
    gold = Counter(normalize_agent(it.gold_agent) for it in train)
    top = max(gold, key=lambda a: (gold[a], a)) if gold else ""
    out: dict[str, list[tuple[str, int]]] = {k: [] for k in (
        "always_step1", "first_agent", "majority_speaker", "last_step", "train_gold_agent")}
    for it in items:
        s1 = min(1, len(it.agents) - 1)
        c = Counter(it.agents[i] for i in it.cand)
        spk = [it.agents[i] for i in it.cand]
        maj = max(c, key=lambda k: (c[k], -spk.index(k)))
        first, last = it.cand[0], it.cand[-1]
        ft = _first_turn(it, top)
        out["always_step1"].append((it.agents[s1], s1))
        out["first_agent"].append((it.agents[first], first))
        out["majority_speaker"].append((maj, _first_turn(it, maj)))
        out["last_step"].append((it.agents[last], last))
        out["train_gold_agent"].append((it.agents[ft], ft) if ft is not None else (it.agents[first], first))
    return out


def uniform_random(items: list[Item]) -> dict[str, float]:
    """Expected accuracy of a uniform random agent (over the candidates' speakers) and a uniform random step
    (over the candidate steps)."""
    a = [float(normalize_agent(it.gold_agent) in {normalize_agent(p) for p in it.players}) / len(it.players)
         for it in items]
    s = [float(it.gold_step in it.cand) / len(it.cand) for it in items]
    return {"agent_acc": round(100 * float(np.mean(a)), 2), "step_acc": round(100 * float(np.mean(s)), 2)}


def score(pred: list[tuple[str, int]], items: list[Item]) -> dict[str, Any]:
    """Accuracies of predictions ``(agent, step)`` against the items' gold labels (hit lists under ``_``)."""
    n = len(items)
    a = [normalize_agent(p[0]) == normalize_agent(it.gold_agent) for p, it in zip(pred, items)]
    s = [p[1] == it.gold_step for p, it in zip(pred, items)]
    return {
        "n": n,
        "agent_acc": 100 * sum(a) / n,
        "step_acc": 100 * sum(s) / n,
        "step_acc_pm1": 100 * sum(abs(p[1] - it.gold_step) <= 1 for p, it in zip(pred, items)) / n,
        "step_acc_pm3": 100 * sum(abs(p[1] - it.gold_step) <= 3 for p, it in zip(pred, items)) / n,
        "_agent_hits": a,
        "_step_hits": s,
    }


def _public(sc: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in sc.items() if not k.startswith("_")}


def mcnemar(method: dict[str, Any], base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Exact McNemar of the method's hits against every baseline's, agent and step level."""
    tests = {}
    for bname, b in base.items():
        for lvl in ("agent", "step"):
            m, r = method[f"_{lvl}_hits"], b[f"_{lvl}_hits"]
            bb = sum(x and not y for x, y in zip(m, r))
            cc = sum(y and not x for x, y in zip(m, r))
            tests[f"{lvl}_vs_{bname}"] = {"method_only": bb, "baseline_only": cc,
                                          "p_mcnemar": round(McNemar.from_counts(bb, cc).p_value, 4)}
    return tests


def _report(ds: Dataset, preds: dict[str, list[tuple[str, int]]], base_preds: dict[str, list[tuple[str, int]]],
            **head: Any) -> dict[str, Any]:
    base = {k: score(v, ds.items) for k, v in base_preds.items()}
    out: dict[str, Any] = {**head, "n": len(ds.items), "skipped": ds.skipped, "warnings": ds.warnings,
                           "kind": ds.kind, "anchors": [a.__dict__ for a in ANCHORS[ds.kind]],
                           "baselines": {k: _public(v) for k, v in base.items()}, "methods": {}}
    out["baselines"]["uniform_random"] = {"n": len(ds.items), **uniform_random(ds.items)}
    for name, pred in preds.items():
        sc = score(pred, ds.items)
        out["methods"][name] = {**_public(sc), "mcnemar": mcnemar(sc, base)}
    out["items"] = [{"id": it.log_id, "gold_agent": it.gold_agent, "gold_step": it.gold_step,
                     "pred": {name: list(pred[i]) for name, pred in preds.items()}}
                    for i, it in enumerate(ds.items)]
    return out


def cross_validate(ds: Dataset, folds: int = 5, seed: int = 0, l2: float = 1.0
                   ) -> tuple[dict[str, list], dict[str, list]]:
    """Held-out predictions of both agent rules, and of the baselines (fitted ones on the training folds)."""
    items = ds.items
    preds: dict[str, list] = {r: [None] * len(items) for r in RULES}
    base: dict[str, list] = {}
    for test in kfold(len(items), folds, seed):
        tset = set(test.tolist())
        train = [it for i, it in enumerate(items) if i not in tset]
        sc = fit(train, ds.names, l2)
        held = [items[i] for i in test]
        for k, v in baselines(held, train).items():
            base.setdefault(k, [None] * len(items))
            for i, p in zip(test, v):
                base[k][i] = p
        for i in test:
            for r in RULES:
                preds[r][i] = predict(sc, items[i], r)[0]
    return preds, base


def evaluate(path: str | Path, with_gt: bool = False, folds: int = 5, seeds: tuple[int, ...] = (0, 1, 2),
             l2: float = 1.0, feature_sets: tuple[str, ...] = ("portable", "cdc")) -> dict[str, Any]:
    """k-fold cross-validated accuracies of every feature set and agent rule (mean and sd over ``seeds``;
    McNemar tests and baselines from the first seed) beside the trivial baselines of this data."""
    out: dict[str, Any] | None = None
    for fs in feature_sets:
        ds = load(path, with_gt, fs)
        if len(ds.items) < max(2, folds):
            raise BadInputError(f"{path}: {len(ds.items)} usable labelled record(s) ({_skips(ds.skipped)}); "
                                f"{folds}-fold cross-validation needs at least {max(2, folds)}")
        runs = [cross_validate(ds, folds, sd, l2) for sd in seeds]
        preds0, base0 = runs[0]
        rep = _report(ds, {f"{fs}_{r}": preds0[r] for r in RULES}, base0, mode="cv", data=str(path),
                      with_gt=with_gt, folds=folds, seeds=list(seeds), l2=l2)
        for r in RULES:
            per = [score(p[r], ds.items) for p, _ in runs]
            m = rep["methods"][f"{fs}_{r}"]
            m["per_seed"] = [{k: round(x[k], 2) for k in ("agent_acc", "step_acc")} for x in per]
            for k in ("agent_acc", "step_acc"):
                m[k] = round(float(np.mean([x[k] for x in per])), 2)
                m[f"{k}_sd"] = round(float(np.std([x[k] for x in per])), 2)
        out = _join(out, rep)
    assert out is not None
    return out


def _join(out: dict[str, Any] | None, rep: dict[str, Any]) -> dict[str, Any]:
    """The report of one more feature set added to ``out`` (its methods, and its predictions per item)."""
    if out is None:
        return rep
    out["methods"].update(rep["methods"])
    for a, b in zip(out["items"], rep["items"]):
        a["pred"].update(b["pred"])
    return out


def transfer(train_path: str | Path, test_path: str | Path, with_gt: bool = False, l2: float = 1.0,
             feature_sets: tuple[str, ...] = ("portable", "cdc")) -> dict[str, Any]:
    """Fit on every record of ``train_path``, score every record of ``test_path`` (another system)."""
    out: dict[str, Any] | None = None
    for fs in feature_sets:
        tr, te = load(train_path, with_gt, fs), load(test_path, with_gt, fs)
        sc = fit(tr.items, tr.names, l2)
        preds = {f"{fs}_{r}": [predict(sc, it, r)[0] for it in te.items] for r in RULES}
        rep = _report(te, preds, baselines(te.items, tr.items), mode="transfer", data=str(test_path),
                      train=str(train_path), train_n=len(tr.items), train_skipped=tr.skipped, with_gt=with_gt,
                      l2=l2)
        out = _join(out, rep)
    assert out is not None
    return out
