"""The report of an accuracy run: each method's summary (accuracy with Wilson intervals, tokens, seconds,
answer lengths, candidates and drafts), paired tests between methods, ``results.json``, ``results.md``, the
accuracy chart and the Pareto chart (accuracy against seconds and tokens per question).

Built from item records alone, so a run, a merge of runs and a rescoring report the same way.

>>> from kvmas.trace import Usage
>>> s = summarise([ItemResult("single", "t1", "number", "3", "3", True, "3", Usage(), 1.0)])
>>> s["n"], s["correct"], s["ci95_wilson"]
(1, 1, [0.2065, 1.0])
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

from kvmas.bench.items import ItemResult
from kvmas.paths import atomic_write_text
from kvmas.stats import mcnemar_exact, paired_bootstrap, wilson
from kvmas.trace import Usage


def draft_summary(items: list[ItemResult]) -> dict[str, int] | None:
    """What a Review's refinement did, over the items that recorded their drafts: ``first_right`` (the first
    draft was right), ``fixed`` (first draft wrong, final answer right), ``broke`` (first draft right, final
    answer wrong); None when no item recorded drafts.

        >>> from kvmas.trace import Usage
    >>> r = ItemResult("kv:review", "t1", "number", "3", "3", True, "", Usage(), 0.0,
    ...                meta={"facts": {"review_drafts": ["4", "3"]}, "drafts_correct": [False, True]})
    >>> draft_summary([r])
    {'n': 1, 'first_right': 0, 'final_right': 1, 'fixed': 1, 'broke': 0}
    """
    rows = [r for r in items if r.meta.get("drafts_correct")]
    if not rows:
        return None
    first = [r.meta["drafts_correct"][0] for r in rows]
    return {"n": len(rows), "first_right": sum(first), "final_right": sum(r.correct for r in rows),
            "fixed": sum(r.correct and not f for r, f in zip(rows, first)),
            "broke": sum(f and not r.correct for r, f in zip(rows, first))}


def candidate_summary(items: list[ItemResult]) -> dict[str, int] | None:
    """What a method's candidates held, over the items that recorded them: ``any_correct`` (the ceiling of
    any selection), ``majority`` (items with a strict majority answer) and ``majority_correct`` (that answer
    right), ``unanimous``; None when no item recorded candidates.

        >>> from kvmas.trace import Usage
    >>> r = ItemResult("kv:vote", "t1", "number", "3", "4", False, "", Usage(), 0.0,
    ...                meta={"facts": {"vote_candidates": ["3", "3", "4"]}, "candidates_correct": [True, True, False]})
    >>> candidate_summary([r])
    {'n': 1, 'any_correct': 1, 'majority': 1, 'majority_correct': 1, 'unanimous': 0}
    """
    rows = [r for r in items if "candidates_correct" in r.meta]
    if not rows:
        return None
    out = {"n": len(rows), "any_correct": 0, "majority": 0, "majority_correct": 0, "unanimous": 0}
    for r in rows:
        keys, right = r.meta["facts"]["vote_candidates"], r.meta["candidates_correct"]
        out["any_correct"] += any(right)
        counts = Counter(k for k in keys if k)
        if counts:
            top, count = counts.most_common(1)[0]
            if count * 2 > len(keys):
                out["majority"] += 1
                out["majority_correct"] += right[keys.index(top)]
            out["unanimous"] += count == len(keys)
    return out


def summarise(items: list[ItemResult]) -> dict[str, Any]:
    n = len(items)
    k = sum(r.correct for r in items)
    wlo, whi = wilson(k, n)
    k_strict = sum(r.correct_strict for r in items)
    rules: dict[str, dict[str, int]] = {}
    for r in items:
        row = rules.setdefault(r.rule or "none", {"n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += int(r.correct)
    tot = Usage()
    for r in items:
        tot = tot + r.usage
    per = lambda v: round(v / n, 2) if n else 0.0  # noqa: E731
    out: dict[str, Any] = {
        "n": n, "correct": k, "accuracy": round(k / n, 4) if n else 0.0,
        "ci95_wilson": [round(wlo, 4), round(whi, 4)],
        "correct_strict": k_strict, "accuracy_strict": round(k_strict / n, 4) if n else 0.0,
        "ci95_wilson_strict": [round(x, 4) for x in wilson(k_strict, n)], "rules": rules,
        "tokens_per_item": {"prefilled": per(tot.prefilled), "reused": per(tot.reused), "latent": per(tot.latent),
                            "generated": per(tot.generated), "computed": per(tot.computed)},
        "tokens_total": {**tot.model_dump(), "computed": tot.computed},
        "wall_s_total": round(sum(r.wall_s for r in items), 3), "wall_s_per_item": per(sum(r.wall_s for r in items)),
        "answer_tokens_mean": per(sum(r.answer_tokens for r in items)),
        "answer_chars_mean": per(sum(len(r.answer) for r in items)),
        "empty_answers": sum(1 for r in items if not r.answer.strip()),
        "no_extractable_answer": sum(1 for r in items if r.pred is None),
        "errors": sum(1 for r in items if r.error),
        "echoes": sum(1 for r in items if r.echo),
        "samples": [{"task_id": r.task_id, "gold": r.gold, "pred": r.pred, "rule": r.rule, "answer": r.answer[:300]}
                    for r in items[:3]],
    }
    cands = candidate_summary(items)
    if cands:
        out["candidates"] = cands
    drafts = draft_summary(items)
    if drafts:
        out["drafts"] = drafts
    read = [r for r in items if "extracted" in r.meta]  # --choice-scoring loglik keeps the text's own answer too
    if read:
        k_text = sum(r.meta["extracted"] == r.gold for r in read)
        out["extracted"] = {"n": len(read), "correct": k_text,
                            "ci95_wilson": [round(x, 4) for x in wilson(k_text, len(read))]}
    chosen = [r for r in items if r.meta.get("chosen")]
    if chosen:  # how often each pipeline was chosen, and how often it was then right
        counts = Counter(r.meta["chosen"] for r in chosen)
        right = Counter(r.meta["chosen"] for r in chosen if r.correct)
        out["chosen_pipelines"] = dict(counts.most_common())
        out["chosen_correct"] = {c: right[c] for c in out["chosen_pipelines"]}
    return out


def paired_tests(results: dict[str, list[ItemResult]], seed: int) -> list[dict[str, Any]]:
    out = []
    for a, b in combinations(list(results), 2):
        ra = {r.task_id: r.correct for r in results[a]}
        rb = {r.task_id: r.correct for r in results[b]}
        ids = [t for t in ra if t in rb]
        if not ids:
            continue
        xa, xb = [int(ra[t]) for t in ids], [int(rb[t]) for t in ids]
        mc = mcnemar_exact(xa, xb)
        d = paired_bootstrap(xa, xb, seed=seed)
        out.append({"a": a, "b": b, "n": len(ids), "diff": round(d.diff, 4), "ci95": [round(d.lo, 4), round(d.hi, 4)],
                    "a_only": mc.a_only, "b_only": mc.b_only, "mcnemar_p": round(mc.p_value, 4)})
    return out


def write_summary(out: Path, config: dict[str, Any], results: dict[str, list[ItemResult]], *,
                   peak_rss_mb: dict[str, float] | None = None, extra=None) -> dict[str, Any]:
    seed = config["seed"]
    summary = {"config": config, "methods": {name: summarise(items) for name, items in results.items()},
               "paired": paired_tests(results, seed)}
    for name, mb in (peak_rss_mb or {}).items():
        summary["methods"][name]["peak_rss_mb"] = round(mb, 1)
    for name, wall in (config.get("method_wall_s") or {}).items():
        s = summary["methods"].get(name)
        if s and s["n"]:  # the cost a user pays per question at this batch size (wall clock / questions)
            s["seconds_per_question"] = round(wall / s["n"], 3)
    summary["pareto"] = pareto_fronts(summary["methods"])
    if extra is not None:
        summary["efficiency"] = extra(summary)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False))
    atomic_write_text(out / "results.md", to_markdown(summary))
    if write_chart(summary, out / "chart.png") is None or write_pareto(summary, out / "pareto.png") is None:
        summary["chart"] = "not written: matplotlib is not installed (pip install kvmas[charts])"
        atomic_write_text(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def to_markdown(summary: dict[str, Any]) -> str:
    """The results as markdown: one row per method, the paired comparisons, then any efficiency section."""
    cfg = summary["config"]
    peak = any("peak_rss_mb" in s for s in summary["methods"].values())
    lines = [f"# {cfg['data'] or 'tasks'} (n={cfg['n']}, model {cfg['model']}, seed {cfg['seed']}, "
             f"max_new_tokens {cfg['max_new_tokens']}, latent_steps "
             f"{cfg['latent_steps'] if cfg.get('latent_steps') is not None else 'default'}, "
             f"prompt {cfg.get('prompt', 'cot')})", "",
             "| method | accuracy (flexible) | 95% CI (Wilson) | strict (boxed/####) | computed tokens/item | "
             "prefilled/item | reused/item | generated/item | latent/item | s/question | answer tokens | no answer | "
             "echoed a role prompt | errors | " + ("peak RSS MB | " if peak else "") + "answers by rule (correct/read) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if peak else "") + "---|"]
    for name, s in summary["methods"].items():
        t = s["tokens_per_item"]
        lines.append(f"| {name} | {s['correct']}/{s['n']} ({100 * s['accuracy']:.1f}%) | "
                     f"{_ci_cell(s['ci95_wilson'])} | {_strict_cell(s)} | {t['computed']:.0f} | "
                     f"{t['prefilled']:.0f} | {t['reused']:.0f} | {t['generated']:.0f} | {t['latent']:.0f} | "
                     f"{seconds_per_question(s):.2f} | {s['answer_tokens_mean']:.0f} | {s['no_extractable_answer']} | "
                     f"{s.get('echoes', 0)} | {s['errors']} | " + (f"{s.get('peak_rss_mb', 0):.0f} | " if peak else "")
                     + f"{rule_counts(s)} |")
    lines += ["", "s/question: each method's wall clock over its questions (run as rows of shared forwards at "
                  "the batch size used), where recorded; else the mean time of one run."]
    if cfg.get("fanout"):
        lines += ["", fanout_line(cfg["fanout"])]
    if summary.get("pareto"):
        lines += [f"Pareto front (no method is both more accurate and cheaper): by seconds "
                  f"{', '.join(summary['pareto']['seconds'])}; by computed tokens {', '.join(summary['pareto']['tokens'])}."]
    if "prompt_echo_floor" in cfg:
        lines += ["", f"Prompt-echo floor: a reply that only repeats its prompt would be credited on "
                      f"{cfg['prompt_echo_floor']} of {cfg['n']} items."]
    first = cfg["methods"][0] if cfg.get("methods") else None
    shown = [p for p in summary["paired"] if first in (p["a"], p["b"]) or "auto" in (p["a"], p["b"])]
    if shown:
        against = first if first == "auto" else f"{first} and vs auto"
        lines += ["", f"Paired comparisons (vs {against}; all pairs in results.json):", "",
                  "| A vs B | diff (A−B) | 95% CI | only A right | only B right | McNemar p |",
                  "|---|---|---|---|---|---|"]
        for p in shown:
            lines.append(f"| {p['a']} vs {p['b']} | {100 * p['diff']:+.1f} pts | {100 * p['ci95'][0]:+.1f} to "
                         f"{100 * p['ci95'][1]:+.1f} | {p['a_only']} | {p['b_only']} | {p['mcnemar_p']:.3g} |")
    cands = {n: s["candidates"] for n, s in summary["methods"].items() if "candidates" in s}
    if cands:
        lines += ["", "What the candidates held (items with a right candidate bound any selection):", "",
                  "| method | items | method right | some candidate right | strict majority | majority right | "
                  "unanimous |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {c['n']} | {summary['methods'][n]['correct']} | {c['any_correct']} | {c['majority']} | "
                  f"{c['majority_correct']} | {c['unanimous']} |" for n, c in cands.items()]
    drafts = {n: s["drafts"] for n, s in summary["methods"].items() if "drafts" in s}
    if drafts:
        lines += ["", "What refinement did (the first draft the critic read against the final answer):", "",
                  "| method | items | first draft right | final right | fixed | broke |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {d['n']} | {d['first_right']} | {d['final_right']} | {d['fixed']} | {d['broke']} |"
                  for n, d in drafts.items()]
    both = {n: s for n, s in summary["methods"].items() if "extracted" in s}
    if both:
        lines += ["", "Both readings of the same answers (ranked by likelihood after the answer, and the option the "
                      "answer text gives):", "",
                  "| method | ranked by likelihood | 95% CI | read from the text | 95% CI |", "|---|---|---|---|---|"]
        for n, s in both.items():
            e = s["extracted"]
            lines.append(f"| {n} | {s['correct']}/{s['n']} | {_ci_cell(s['ci95_wilson'])} | {e['correct']}/{e['n']} | "
                         f"{_ci_cell(e['ci95_wilson'])} |")
    chosen = {n: s for n, s in summary["methods"].items() if "chosen_pipelines" in s}
    if chosen:
        lines += ["", "Pipelines chosen (times chosen, right when chosen):"]
        for n, s in chosen.items():
            right = s.get("chosen_correct", {})  # absent from reports written before it was counted
            lines.append(f"- {n}: " + ", ".join(f"{k} ×{v}" + (f" ({right[k]} right)" if k in right else "")
                                                for k, v in s["chosen_pipelines"].items()))
    eff = summary.get("efficiency")
    if eff:
        lines += ["", "Ratios measured in this run:", "", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f}× |" for k, v in eff.get("ratios", {}).items()]
        merge = eff.get("merge_error")
        if merge:
            lines += ["", "Vote selector merge policies vs exact re-prefill (next-token distribution of the selector, "
                          "on the state Vote builds):", ""]
            for policy in ("shared", "rerotate"):
                vals = [m[policy] for m in merge]
                lines.append(f"- {policy}: max |Δlogprob| mean "
                             f"{sum(v['max_abs_dlogprob'] for v in vals) / len(vals):.3f}, KL mean "
                             f"{sum(v['kl_exact_to_policy'] for v in vals) / len(vals):.4f}, top-1 agrees "
                             f"{sum(v['top1_agrees'] for v in vals)}/{len(vals)}")
    lines += ["", "Sample answers (first items):"]
    for name, s in summary["methods"].items():
        for smp in s["samples"][:3]:
            ans = " ".join(smp["answer"].split())[:160]
            lines.append(f"- {name} / {smp['task_id']} (gold {smp['gold']}, got {smp['pred']}): {ans}")
    return "\n".join(lines) + "\n"


def fanout_line(fanout: dict[str, Any]) -> str:
    """What a run over Ray workers says about them: how many, how many died, which tasks were re-run.

    >>> fanout_line({"workers": 2, "workers_died": 1, "reruns": {"single": ["t3"]}, "in_process": ["auto"]})
    'Run on 2 Ray workers (in this process, learning online: auto). 1 worker(s) died; re-run elsewhere: single: t3.'
    """
    text = f"Run on {fanout['workers']} Ray workers"
    if fanout.get("in_process"):
        text += f" (in this process, learning online: {', '.join(fanout['in_process'])})"
    text += "."
    if fanout.get("workers_died"):
        text += (f" {fanout['workers_died']} worker(s) died; re-run elsewhere: "
                 + "; ".join(f"{m}: {', '.join(ids)}" for m, ids in fanout["reruns"].items()) + ".")
    return text


def seconds_per_question(s: dict[str, Any]) -> float:
    """Wall clock per question of a method's whole loop when recorded, else the mean item wall time."""
    return s.get("seconds_per_question", s["wall_s_per_item"])


def pareto_fronts(methods: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The methods no other method beats on both accuracy and cost (seconds, computed tokens per question).

    >>> pareto_fronts({"a": {"accuracy": .5, "wall_s_per_item": 1, "tokens_per_item": {"computed": 10}},
    ...                "b": {"accuracy": .6, "wall_s_per_item": 3, "tokens_per_item": {"computed": 5}},
    ...                "c": {"accuracy": .4, "wall_s_per_item": 2, "tokens_per_item": {"computed": 20}}})
    {'seconds': ['a', 'b'], 'tokens': ['b']}
    """
    def front(cost) -> list[str]:
        pts = {n: (s["accuracy"], cost(s)) for n, s in methods.items() if s.get("n", 1)}
        return [n for n, (acc, c) in pts.items()
                if not any((a >= acc and k <= c) and (a > acc or k < c) for m, (a, k) in pts.items() if m != n)]

    return {"seconds": front(seconds_per_question), "tokens": front(lambda s: s["tokens_per_item"]["computed"])}


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or None when matplotlib (``kvmas[charts]``) is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(plt, fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a temp file beside it, then a rename) and close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_pareto(summary: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy (Wilson 95% interval) against seconds and against computed tokens per question, one point per
    method, the Pareto front joined (PNG). None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None

    methods = summary["methods"]
    fronts = summary.get("pareto") or pareto_fronts(methods)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label, cost in ((axes[0], "seconds", "seconds per question", seconds_per_question),
                                 (axes[1], "tokens", "computed tokens per question",
                                  lambda s: s["tokens_per_item"]["computed"])):
        for name, s in methods.items():
            acc = 100 * s["accuracy"]
            lo, hi = 100 * s["ci95_wilson"][0], 100 * s["ci95_wilson"][1]
            on = name in fronts[key]
            ax.errorbar([cost(s)], [acc], yerr=[[acc - lo], [hi - acc]], fmt="o", capsize=3,
                        color="#C44E52" if on else "#4C72B0")
            ax.annotate(name, (cost(s), acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
        pts = sorted((cost(methods[n]), 100 * methods[n]["accuracy"]) for n in fronts[key])
        if len(pts) > 1:
            ax.plot(*zip(*pts), "--", color="#C44E52", linewidth=1, label="Pareto front")
            ax.legend(loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
    fig.suptitle(f"accuracy vs cost · {summary['config']['data']} · {summary['config']['model']} · "
                 f"n={summary['config']['n']}")
    return _save_png(plt, fig, path)


def _ci_cell(ci: list[float]) -> str:
    return f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def _strict_cell(s: dict[str, Any]) -> str:
    if "correct_strict" not in s:
        return "–"  # a report written before strict figures existed
    return f"{s['correct_strict']}/{s['n']} ({100 * s['accuracy_strict']:.1f}%)"


def rule_counts(s: dict[str, Any]) -> str:
    """``boxed 12/14, answer-is 3/5, none 0/2``: per scoring rule, correct of the answers it read."""
    return ", ".join(f"{rule} {c['correct']}/{c['n']}" for rule, c in sorted(
        s.get("rules", {}).items(), key=lambda kv: -kv[1]["n"])) or "–"


def write_chart(summary: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy with Wilson 95% intervals, computed tokens per item (by kind) and seconds per item (PNG).

    Returns None (and writes nothing) when matplotlib, an optional dependency (``kvmas[charts]``), is missing.
    """
    plt = _pyplot()
    if plt is None:
        return None

    names = list(summary["methods"])
    rows = [summary["methods"][n] for n in names]
    acc = [100 * r["accuracy"] for r in rows]
    lo = [a - 100 * r["ci95_wilson"][0] for a, r in zip(acc, rows)]
    hi = [100 * r["ci95_wilson"][1] - a for a, r in zip(acc, rows)]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(max(12, 1.3 * len(names) * 3), 4.2))
    ax1.bar(names, acc, yerr=[lo, hi], capsize=4, color="#4C72B0")
    ax1.set_ylabel("accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.set_title(f"accuracy, n={summary['config']['n']} (95% Wilson CI)")
    bottom = [0.0] * len(names)
    for kind, colour in (("prefilled", "#8172B2"), ("latent", "#937860"), ("generated", "#DD8452")):
        vals = [r["tokens_per_item"][kind] for r in rows]
        ax2.bar(names, vals, bottom=bottom, color=colour, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("computed tokens per item")
    ax2.set_title("cost")
    ax2.legend()
    ax3.bar(names, [seconds_per_question(r) for r in rows], color="#55A868")
    ax3.set_ylabel("seconds per question")
    ax3.set_title("time")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", rotation=35)
        for lab in ax.get_xticklabels():
            lab.set_horizontalalignment("right")
    fig.suptitle(f"{summary['config']['data']} · {summary['config']['model']}")
    fig.subplots_adjust(bottom=0.3, top=0.85, wspace=0.3)
    return _save_png(plt, fig, path)
