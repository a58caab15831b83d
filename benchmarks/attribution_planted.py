"""Planted-fault suite on real primitives with the default embedded model (CPU). Writes JSON to OUT.

    .venv/bin/python benchmarks/attribution_planted.py OUT.json [first_task] [last_task] [review,plan]
"""

from __future__ import annotations

import json
import sys

from kvmas.agents.model import Model
from kvmas.attribution.planted import TASKS, run_suite
from kvmas.paths import atomic_write_text
from kvmas.primitives import build

PRIMS = {
    "review": lambda: build("review", comm="latent", rounds=1, early_stop=False, max_new_tokens=16, latent_steps=4),
    "plan": lambda: build("plan", comm="latent", k=2, max_new_tokens=16, latent_steps=4),
}


def main(out: str, lo: int = 0, hi: int = 4, names: str = "review,plan") -> None:
    model = Model.load()
    prims = {f"latent:{n}": PRIMS[n]() for n in names.split(",")}

    def progress(case):
        print(f"{case.primitive} {case.question[:24]!r} planted {case.agent}@{case.step}: effective="
              f"{case.effective} -> {case.pred_agent}@{case.pred_step} ({case.wall_s:.0f}s, {case.replays} replays)",
              flush=True)

    res = run_suite(prims, TASKS[lo:hi], model, seed=0, progress=progress)
    atomic_write_text(out, json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "cases"}))


if __name__ == "__main__":
    a = sys.argv
    main(a[1], int(a[2]) if len(a) > 2 else 0, int(a[3]) if len(a) > 3 else 4, a[4] if len(a) > 4 else "review,plan")
