"""A local model as the judge of a failure log: constrained choices scored by likelihood, never free text.

:meth:`LogJudge.verdict` is the log-odds of "Yes" over "No" to "was step k the decisive mistake?", given the
task and the log up to step k. :meth:`LogJudge.all_at_once` reads the whole log and scores every candidate
step number as the answer to "which step is the decisive mistake?" (mean log-prob per token, so that "12" is
not penalised for being two tokens against "3"). Both are cached per log (one JSON file per model, log and
prompt version under ``cache_dir``), so a re-run costs nothing.

:func:`~kvmas.attribution.attributor.rerank` re-orders the step scorer's top-k with the verdicts:
``log p_scorer + weight * verdict``
(``weight`` 1.0: the two are both log-odds-like, and no tuning on scored data picks it).

>>> from kvmas.attribution.log import from_generic
>>> from kvmas.testing import tiny_model
>>> log = from_generic([{"agent": "a", "content": "Assume 12."}, {"agent": "b", "content": "So 12."}])
>>> j = LogJudge(tiny_model("llama"))
>>> isinstance(j.verdict(log, 1), float), j.all_at_once(log, [0, 1]) in (0, 1)
(True, True)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kvmas.agents.state import LatentState
from kvmas.attribution.attributor import rerank
from kvmas.attribution.log import AttributionLog
from kvmas.errors import BadInputError
from kvmas.paths import atomic_write_text, inside, read_json, safe_name

PROMPT_VERSION = 1
SYSTEM = ("You review the log of a multi-agent system that failed its task. The decisive mistake is the earliest "
          "step that, if fixed, would have made the run succeed. Steps are numbered from 0.")
STEP_CHARS = 500  # each step's text is cut to this many characters in a prompt


def render_steps(log: AttributionLog, steps: list[int]) -> str:
    """``Step i - agent: text`` lines (text cut to :data:`STEP_CHARS`)."""
    out = []
    for i in steps:
        s = log.steps[i]
        text = " ".join(s.content.split())
        text = text if len(text) <= STEP_CHARS else text[:STEP_CHARS] + " [...]"
        out.append(f"Step {i} - {s.agent}: {text}")
    return "\n".join(out)


class LogJudge:
    """Likelihood verdicts of one model on failure logs, cached per log when ``cache_dir`` is given."""

    def __init__(self, model, cache_dir: str | Path | None = None, budget: int = 2048) -> None:
        self.model = model
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.budget = min(int(budget), int(model.max_context)) - 8  # room for the continuations
        self._cache: dict[str, dict[str, Any]] = {}

    # -- prompts --------------------------------------------------------------------------------------
    def _prompt(self, log: AttributionLog, upto: int, ask: str) -> str:
        """The chat prompt: task, the log's steps 0..upto (earliest dropped until it fits), the question."""
        first = 0
        while True:
            body = render_steps(log, list(range(first, upto + 1)))
            skipped = f"[steps 0-{first - 1} left out]\n" if first else ""
            user = f"Task: {' '.join(log.question.split())[:1500]}\n\nLog:\n{skipped}{body}\n\n{ask}"
            text = self.model.chat_text([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
            if len(self.model.encode(text)) <= self.budget or first >= upto:
                return text
            first += max(1, (upto - first) // 4)

    # -- cache ----------------------------------------------------------------------------------------
    def _key(self, log: AttributionLog) -> str:
        h = hashlib.sha256(json.dumps([log.question, [(s.agent, s.content) for s in log.steps]]).encode())
        return f"{self.model.name}-v{PROMPT_VERSION}-{log.log_id}-{h.hexdigest()[:16]}"

    def _entry(self, log: AttributionLog) -> dict[str, Any]:
        key = self._key(log)
        if key not in self._cache:
            entry: dict[str, Any] = {"verdicts": {}, "all_at_once": None}
            path = self._path(key)
            if path is not None and path.exists():
                raw = read_json(path, "judge cache")
                if not isinstance(raw, dict) or not isinstance(raw.get("verdicts"), dict):
                    raise BadInputError(f"{path}: not a judge cache entry")
                entry = raw
            self._cache[key] = entry
        return self._cache[key]

    def _path(self, key: str) -> Path | None:
        return inside(self.cache_dir, safe_name(key) + ".json") if self.cache_dir else None

    def _save(self, log: AttributionLog) -> None:
        key = self._key(log)
        path = self._path(key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(self._cache[key]))

    # -- verdicts -------------------------------------------------------------------------------------
    def verdict(self, log: AttributionLog, step: int) -> float:
        """log P("Yes") - log P("No") that ``step`` is the decisive mistake, given the log up to it."""
        return self.verdicts(log, [step])[0]

    def verdicts(self, log: AttributionLog, steps: list[int]) -> list[float]:
        """:meth:`verdict` for several steps. The prompts of one log agree up to the earliest asked step, so
        the uncached ones are scored on one prefill of their common tokens (a fork each for the rest)."""
        for step in steps:
            if not 0 <= step < len(log.steps):
                raise BadInputError(f"{log.log_id}: step {step} outside 0..{len(log.steps) - 1}")
        entry = self._entry(log)
        todo = sorted({s for s in steps if str(s) not in entry["verdicts"]})
        if todo:
            prompts = [self.model.encode(self._prompt(log, s, self._ask(log, s))) for s in todo]
            for step, (yes, no) in zip(todo, self._score_shared(prompts, ["Yes", "No"])):
                entry["verdicts"][str(step)] = float(yes - no)
            self._save(log)
        return [float(entry["verdicts"][str(s)]) for s in steps]

    @staticmethod
    def _ask(log: AttributionLog, step: int) -> str:
        return (f"Was step {step} ({log.steps[step].agent}) the decisive mistake that made the run fail? "
                "Answer Yes or No.")

    def _score_shared(self, prompts: list[list[int]], continuations: list[str]) -> list[list[float]]:
        """Each prompt's continuation log-probs, with the prompts' common leading tokens prefilled once
        (the same tokens each prompt has alone, so the scores are those of separate runs up to fp order)."""
        # commonprefix compares any sequences element-wise, token lists included
        common = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)  # each keeps a token
        shared = LatentState.empty(self.model)
        if common:
            shared = shared.extend(prompts[0][:common], agent="judge", role="scorer")
        return [shared.extend(ids[common:], agent="judge", role="scorer").score(continuations) for ids in prompts]

    def all_at_once(self, log: AttributionLog, candidates: list[int]) -> int:
        """The candidate step whose number the model finds likeliest as the decisive mistake (whole log read)."""
        if not candidates:
            raise BadInputError(f"{log.log_id}: no candidate steps")
        entry = self._entry(log)
        cached = entry.get("all_at_once")
        if not (isinstance(cached, dict) and cached.get("candidates") == list(candidates)):
            ask = "Which step is the decisive mistake? Answer with the step number only."
            prompt = self._prompt(log, len(log.steps) - 1, ask)
            conts = [str(i) for i in candidates]
            lp = self.model.score_continuations(prompt, conts)
            per_token = [float(v) / max(1, len(self.model.encode(c))) for v, c in zip(lp, conts)]
            entry["all_at_once"] = {"candidates": list(candidates), "scores": per_token}
            self._save(log)
        scores = entry["all_at_once"]["scores"]
        return int(candidates[int(np.argmax(scores))])


def judge_eval(test_path: str | Path, model, train_path: str | Path | None = None, k: int = 3, limit: int = 30,
               cache_dir: str | Path | None = None, folds: int = 5, seed: int = 0, l2: float = 1.0,
               progress=None) -> dict[str, Any]:
    """Portable scorer alone, scorer + judge re-rank of its top ``k``, and the judge all-at-once, on the first
    ``limit`` records of ``test_path`` (file order; none chosen by result), beside this data's baselines.

    The scorer (and the fitted baseline) come from ``train_path`` when given, else from the other folds of a
    ``folds``-fold split of ``test_path``; the judge is never fitted.
    """
    from kvmas.attribution.evaluate import Dataset, _report, baselines, fit, load, predict
    from kvmas.attribution.log import iter_logs
    from kvmas.attribution.scorer import kfold

    if limit < 1 or k < 1:
        raise BadInputError("--limit and --k must be >= 1")
    ds = load(test_path, feature_set="portable")
    n = len(ds.items)
    scorers: list[Any] = [None] * n
    base: dict[str, list] = {}
    if train_path is not None:
        tr = load(train_path, feature_set="portable")
        sc = fit(tr.items, tr.names, l2)
        scorers = [sc] * n
        base = baselines(ds.items, tr.items)
    else:
        for test in kfold(n, folds, seed):
            tset = set(test.tolist())
            train = [it for i, it in enumerate(ds.items) if i not in tset]
            sc = fit(train, ds.names, l2)
            for name, preds in baselines([ds.items[i] for i in test], train).items():
                base.setdefault(name, [None] * n)
                for i, pr in zip(test, preds):
                    base[name][i] = pr
            for i in test:
                scorers[i] = sc
    keep = list(range(min(limit, n)))
    logs = {}
    wanted = {ds.items[i].log_id for i in keep}
    for lg in iter_logs(test_path):
        if lg.log_id in wanted and lg.log_id not in logs:
            logs[lg.log_id] = lg
    judge = LogJudge(model, cache_dir=cache_dir)
    preds: dict[str, list] = {"portable_speaker": [], f"judge_rerank_top{k}": [], "judge_all_at_once": []}
    for i in keep:
        it, lg = ds.items[i], logs[ds.items[i].log_id]
        (agent, step), order = predict(scorers[i], it, "speaker")
        probs = np.zeros(len(it.agents))
        probs[it.cand] = scorers[i].probs(it.x[it.cand])
        preds["portable_speaker"].append((agent, step))
        verdicts = dict(zip(order[:k], judge.verdicts(lg, order[:k])))  # the top k on one shared prefill
        rs = rerank(probs, order, verdicts.__getitem__, k=k)
        preds[f"judge_rerank_top{k}"].append((it.agents[rs], rs))
        aa = judge.all_at_once(lg, it.cand)
        preds["judge_all_at_once"].append((it.agents[aa], aa))
        if progress:
            progress(f"{it.log_id}: gold {it.gold_agent}@{it.gold_step}; scorer {step}, rerank {rs}, all-at-once {aa}")
    sub = Dataset(ds.path, [ds.items[i] for i in keep], ds.names, ds.warnings, ds.skipped, ds.kind)
    return _report(sub, preds, {name: [v[i] for i in keep] for name, v in base.items()},
                   mode="transfer" if train_path else "cv", data=str(test_path), train=str(train_path),
                   train_n=None if train_path is None else len(tr.items), with_gt=False, folds=folds,
                   seeds=[seed], l2=l2, judge={"model": model.name, "k": k, "limit": limit, "n_total": n,
                                               "prompt_version": PROMPT_VERSION})
