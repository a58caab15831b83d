"""Fit the shipped default step-scorer weights on a Who&When-format file and write kvmas/attribution/weights.py.

The shipped weights are fitted on ALL records of the given file (the 126 Algorithm-Generated dev records); the
accuracy figures we report come from `kvmas attribute eval`, which refits on training folds only and scores the
held-out folds. Usage:

    .venv/bin/python benchmarks/attribution_fit.py /work/shared/data/whowhen/algorithm_generated.jsonl
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from kvmas.attribution.evaluate import fit as fit_items
from kvmas.attribution.evaluate import load
from kvmas.attribution.features import step_features
from kvmas.attribution.log import iter_logs
from kvmas.attribution.scorer import StepScorer
from kvmas.paths import atomic_write_text

L2 = 1.0


def fit(path: str, with_gt: bool) -> dict[str, float]:
    logs = [lg for lg in iter_logs(path) if lg.labelled()]
    fx = [step_features(lg, with_gt=with_gt) for lg in logs]
    sc = StepScorer(fx[0].names, l2=L2).fit([np.array(f.rows) for f in fx], [lg.gold_step for lg in logs])
    return {k: round(float(v), 6) for k, v in zip(sc.names, sc.w)}


def fit_portable(path: str) -> dict[str, float]:
    """The portable scorer, fitted the way `kvmas attribute eval` fits it (candidate steps only)."""
    ds = load(path, feature_set="portable")
    sc = fit_items(ds.items, ds.names, L2)
    return {k: round(float(v), 6) for k, v in zip(sc.names, sc.w)}


def main(path: str) -> None:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    w, wg = fit(path, False), fit(path, True)
    out = Path(__file__).resolve().parents[1] / "kvmas" / "attribution" / "weights.py"
    body = (
        '"""Default step-scorer weights (conditional logit, L2=%s), fitted by benchmarks/attribution_fit.py on\n'
        "all records of %s (sha256 %s...). Generated file: refit instead of editing.\n"
        "Reported accuracies never use these: `kvmas attribute eval` refits on training folds only.\n"
        '"""\n\nDEFAULT_WEIGHTS = %r\n\nDEFAULT_WEIGHTS_GT = %r\n\nPORTABLE_WEIGHTS = %r\n'
    ) % (L2, Path(path).name, digest, w, wg, fit_portable(path))
    atomic_write_text(out, body)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/whowhen/algorithm_generated.jsonl")
