"""Who&When-style evaluation: k-fold cross-validated attributor vs trivial baselines, with exact McNemar tests.

Only held-out predictions are scored: for every fold the step scorer is refitted on the other folds. Agent
accuracy compares normalised names; step accuracy is exact integer equality, plus ±1 / ±3 tolerance and the
official scorer's substring-compatible numbers.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvmas.attribution.attributor import AgentRule, decide, live_steps, players_of
from kvmas.attribution.features import step_features
from kvmas.attribution.log import AttributionLog, AttributionWarning, iter_logs, normalize_agent
from kvmas.attribution.scorer import StepScorer, kfold
from kvmas.errors import BadInputError
from kvmas.stats import McNemar


@dataclass
class Item:
    """What the evaluator keeps per record (compact: feature rows, speakers, players, outcome ancestors)."""

    log_id: str
    gold_agent: str
    gold_step: int
    agents: list[str]
    players: list[str]
    live: set[int]
    x: np.ndarray
    baselines: dict[str, tuple[str, int]] = field(default_factory=dict)


def _baselines(log: AttributionLog) -> dict[str, tuple[str, int]]:
    steps = log.steps
    speakers = [s.agent for s in steps if not s.is_terminal] or [s.agent for s in steps]
    c = Counter(speakers)
    maj = max(c, key=lambda k: (c[k], -speakers.index(k)))
    maj_first = next(s.index for s in steps if s.agent == maj)
    first = steps[0].agent
    return {
        "majority_speaker": (maj, maj_first),
        "first_speaker_step1": (first, min(1, len(steps) - 1)),
        "always_step1": (steps[min(1, len(steps) - 1)].agent, min(1, len(steps) - 1)),
    }


def load_items(path: str | Path, with_gt: bool) -> tuple[list[Item], list[str], list[str]]:
    """Read labelled records (streamed), returning items, feature names and warnings (bad records skipped)."""
    items: list[Item] = []
    msgs: list[str] = []
    names: list[str] | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AttributionWarning)
        for log in iter_logs(path):
            if not log.labelled():
                msgs.append(f"{log.log_id}: no gold label, skipped")
                continue
            if with_gt and not log.ground_truth:
                msgs.append(f"{log.log_id}: no ground_truth; gold-answer features are zero")
            try:
                fx = step_features(log, with_gt=with_gt)
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the evaluation
                msgs.append(f"{log.log_id}: feature extraction failed: {exc}")
                continue
            spk = log.steps[log.gold_step].agent
            if normalize_agent(spk) != normalize_agent(log.gold_agent):
                msgs.append(f"{log.log_id}: label noise: step {log.gold_step} is spoken by {spk}, "
                            f"gold agent is {log.gold_agent}")
            names = fx.names
            items.append(Item(log.log_id, log.gold_agent, log.gold_step, [s.agent for s in log.steps],
                              players_of(log), live_steps(fx.perf), np.array(fx.rows), _baselines(log)))
    msgs = [str(w.message) for w in caught] + msgs
    if not items:
        raise BadInputError(f"{path}: no usable labelled records")
    return items, names or [], msgs


def _score(pred: list[tuple[str, int]], items: list[Item]) -> dict[str, Any]:
    n = len(items)
    a = [normalize_agent(p[0]) == normalize_agent(it.gold_agent) for p, it in zip(pred, items)]
    s = [p[1] == it.gold_step for p, it in zip(pred, items)]
    return {
        "agent_acc": 100 * sum(a) / n,
        "step_acc": 100 * sum(s) / n,
        "step_acc_pm1": 100 * sum(abs(p[1] - it.gold_step) <= 1 for p, it in zip(pred, items)) / n,
        "step_acc_pm3": 100 * sum(abs(p[1] - it.gold_step) <= 3 for p, it in zip(pred, items)) / n,
        "agent_acc_substring": 100 * sum(it.gold_agent in p[0] for p, it in zip(pred, items)) / n,
        "step_acc_substring": 100 * sum(str(it.gold_step) in str(p[1]) for p, it in zip(pred, items)) / n,
        "_agent_hits": a,
        "_step_hits": s,
    }


def cross_validate(items: list[Item], names: list[str], folds: int = 5, seed: int = 0, l2: float = 1.0,
                   agent_rule: AgentRule = "shapley") -> tuple[list[tuple[str, int]], list[dict], list[list]]:
    """Held-out predictions for every item, per-fold scores, and each item's top-3 held-out step ranking."""
    pred: list[Any] = [None] * len(items)
    tops: list[Any] = [None] * len(items)
    per_fold = []
    for f, test in enumerate(kfold(len(items), folds, seed)):
        tset = set(test.tolist())
        train = [it for i, it in enumerate(items) if i not in tset]
        sc = StepScorer(names, l2=l2).fit([it.x for it in train], [it.gold_step for it in train])
        for i in test:
            it = items[i]
            probs = sc.probs(it.x)
            agent, step, _, order = decide(probs, it.agents, it.players, it.live, agent_rule)
            pred[i] = (agent, step)
            tops[i] = [[int(k), round(float(probs[k]), 4)] for k in order[:3]]
        fs = _score([pred[i] for i in test], [items[i] for i in test])
        per_fold.append({"fold": f, "n": len(test), "agent_acc": fs["agent_acc"], "step_acc": fs["step_acc"]})
    return pred, per_fold, tops


def evaluate(path: str | Path, with_gt: bool = False, folds: int = 5, seeds: tuple[int, ...] = (0, 1, 2),
             l2: float = 1.0) -> dict[str, Any]:
    """Cross-validated accuracies of both agent rules next to the trivial baselines, McNemar tests and
    per-item predictions (first seed)."""
    items, names, msgs = load_items(path, with_gt)
    base = {k: _score([it.baselines[k] for it in items], items) for k in items[0].baselines}
    out: dict[str, Any] = {"data": str(path), "n": len(items), "with_gt": with_gt, "folds": folds,
                           "seeds": list(seeds), "l2": l2, "warnings": msgs, "baselines": {}, "methods": {}}
    for k, v in base.items():
        out["baselines"][k] = {m: round(x, 2) for m, x in v.items() if not m.startswith("_")}
    first_pred: dict[str, list] = {}
    first_tops: list = []
    for rule in ("shapley", "speaker"):
        runs = []
        for sd in seeds:
            pred, per_fold, tops = cross_validate(items, names, folds, sd, l2, rule)
            sc = _score(pred, items)
            runs.append((sc, per_fold))
            if sd == seeds[0]:
                first_pred[rule] = pred
                first_tops = tops
                hits0 = sc
        keys = [k for k in runs[0][0] if not k.startswith("_")]
        summary = {k: round(float(np.mean([r[0][k] for r in runs])), 2) for k in keys}
        summary.update({f"{k}_sd": round(float(np.std([r[0][k] for r in runs])), 2)
                        for k in ("agent_acc", "step_acc")})
        summary["per_seed"] = [{k: round(r[0][k], 2) for k in ("agent_acc", "step_acc")} for r in runs]
        summary["per_fold_seed0"] = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in f.items()}
                                     for f in runs[0][1]]
        tests = {}
        for bname, b in base.items():
            for lvl in ("agent", "step"):
                m, r = hits0[f"_{lvl}_hits"], b[f"_{lvl}_hits"]
                bb = sum(x and not y for x, y in zip(m, r))
                cc = sum(y and not x for x, y in zip(m, r))
                tests[f"{lvl}_vs_{bname}"] = {"method_only": bb, "baseline_only": cc,
                                              "p_mcnemar": round(McNemar.from_counts(bb, cc).p_value, 4)}
        summary["mcnemar_seed0"] = tests
        out["methods"][f"cdc_{rule}"] = summary
    out["items"] = [
        {"id": it.log_id, "gold_agent": it.gold_agent, "gold_step": it.gold_step,
         "pred_agent": first_pred["shapley"][i][0], "pred_step": first_pred["shapley"][i][1],
         "agent_ok": normalize_agent(first_pred["shapley"][i][0]) == normalize_agent(it.gold_agent),
         "step_ok": first_pred["shapley"][i][1] == it.gold_step,
         "speaker_rule": list(first_pred["speaker"][i]), "top3_steps": first_tops[i],
         "baseline_majority": list(it.baselines["majority_speaker"])}
        for i, it in enumerate(items)
    ]
    return out
