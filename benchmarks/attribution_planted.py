"""Planted-fault suite on real primitives with the default embedded model (CPU). Writes JSON to argv[1].

    .venv/bin/python benchmarks/attribution_planted.py /tmp/planted.json [n_tasks]
"""

from __future__ import annotations

import json
import sys

from kvmas.agents.model import Model
from kvmas.attribution.planted import TASKS, run_suite
from kvmas.paths import atomic_write_text
from kvmas.primitives import build


def main(out: str, n: int = 4) -> None:
    model = Model.load()
    prims = {
        "latent:review": build("review", comm="latent", rounds=1, early_stop=False, max_new_tokens=16,
                               latent_steps=4),
        "latent:plan": build("plan", comm="latent", k=2, max_new_tokens=16, latent_steps=4),
    }
    done = []

    def progress(case):
        done.append(case)
        print(f"{case.primitive} {case.question[:24]!r} planted {case.agent}@{case.step}: effective="
              f"{case.effective} -> {case.pred_agent}@{case.pred_step} ({case.wall_s:.0f}s, {case.replays} replays)",
              flush=True)

    res = run_suite(prims, TASKS[:n], model, seed=0, progress=progress)
    atomic_write_text(out, json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "cases"}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4)
