"""Mutation check: plant known bugs in the KV algebra one at a time and show that the tests catch each.

Not part of ``make test`` (it runs the state tests once per mutation: a few minutes). Each mutation is applied
to a scratch copy of the package, never to this checkout; a mutation whose text is no longer in the source is
reported as stale (the code moved: update the mutation), not as caught.

    .venv/bin/python scripts/mutation_check.py            # every mutation
    .venv/bin/python scripts/mutation_check.py rerotate   # those whose name contains "rerotate"

Exit status 0 when every mutation is caught, 1 when one survives or is stale.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = "kvmas/agents/state.py"
ALGEBRA = "tests/test_state_algebra.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str  # what the planted bug does
    path: str
    old: str
    new: str
    tests: tuple[str, ...] = (ALGEBRA,)


MUTATIONS = [
    # the four that survived the suite in the audit
    Mutation("rerotate-layer0-only", "deeper layers not re-rotated in a rerotate merge", STATE,
             "                if delta:\n                    from kvmas.agents.rope import rotate_keys",
             "                if delta and li == 0:\n                    from kvmas.agents.rope import rotate_keys"),
    Mutation("speak-feeds-padding", "rows that finished speaking keep being fed padding as real tokens", STATE,
             "            live = (~done).long()[:, None]", "            live = torch.ones_like(done).long()[:, None]"),
    Mutation("merge-values-shifted", "merged values shifted by one column", STATE,
             "                values[li].append(v[:, :, shared:])",
             "                values[li].append(torch.roll(v[:, :, shared:], 1, dims=2))"),
    Mutation("cache-memoised-in-place", "a cache memoised on the state and grown in place", STATE,
             "        if self.length == 0:\n            return DynamicCache()\n"
             "        return DynamicCache(list(zip(self.keys, self.values)))",
             "        memo = self.__dict__.get('_memo')\n        if memo is None:\n"
             "            memo = DynamicCache() if self.length == 0 else DynamicCache(list(zip(self.keys, self.values)))\n"
             "            object.__setattr__(self, '_memo', memo)\n        return memo",
             # the tests written for it: immutability judged by results (the audit found the first one missed it)
             (f"{ALGEBRA}::test_speak_and_extend_never_mutate",
              f"{ALGEBRA}::test_two_calls_on_one_state_give_what_a_fresh_state_gives")),
    # the rest of the audit's nine, and more
    Mutation("extend-positions-restart", "extend restarts positions at 0 instead of continuing", STATE,
             "        pos = self.next_pos[:, None] + offsets", "        pos = offsets"),
    Mutation("rotate-sign", "keys re-rotated the wrong way", "kvmas/agents/rope.py",
             "    out = k_rot * emb.cos() + _rotate_half(k_rot) * emb.sin()",
             "    out = k_rot * emb.cos() - _rotate_half(k_rot) * emb.sin()"),
    Mutation("shared-merge-next-pos", "a shared merge continues after the first branch, not the longest", STATE,
             "            next_pos = max(next_pos, int(s.next_pos[0]) + delta)",
             "            next_pos = next_pos if b else int(s.next_pos[0]) + delta"),
    Mutation("reprefill-skips-latent", "a reprefill merge leaves out the branches' latent steps", STATE,
             "                    if seg.kind == \"latent\":\n                        emb = s.latent_inputs[seg.id]",
             "                    if seg.kind == \"latent\":\n                        continue\n"
             "                        emb = s.latent_inputs[seg.id]"),
    Mutation("score-off-by-one", "continuation scores read the wrong position's log-probs", STATE,
             "                        total[i] += float(lps[i, j - 1, c[j]])",
             "                        total[i] += float(lps[i, min(j, n - 1), c[j]])"),
    Mutation("speak-drops-tail", "the state after speaking lacks the last emitted tokens", STATE,
             "        if any(tail):\n            state = state.extend(tail,",
             "        if False:\n            state = state.extend(tail,"),
    Mutation("drop-keeps-head", "drop of the tail keeps the stale next-token distribution", STATE,
             "        if self.length - 1 in gone:\n            state = state._with(last_hidden=None, last_logits=None)",
             "        if False:\n            state = state._with(last_hidden=None, last_logits=None)"),
    Mutation("fork-shares-rows", "fork does not record the shared prefix", STATE,
             "            shared_cols=self.length if self.rows == 1 else self.shared_cols,\n        )",
             "            shared_cols=0,\n        )"),
    Mutation("think-raw-hidden", "latent steps feed the raw hidden state, not the realigned embedding", STATE,
             "            emb = realign(state.last_hidden)[:, None, :]", "            emb = state.last_hidden[:, None, :]"),
    Mutation("select-ignores-order", "select keeps rows in their old order", STATE,
             "        idx = torch.tensor(list(rows), dtype=torch.long)",
             "        idx = torch.tensor(sorted(rows), dtype=torch.long)"),
    Mutation("load-drops-latent-inputs", "a loaded state forgets its latent input embeddings", STATE,
             "            shared_cols=int(meta[\"shared_cols\"]), latent_inputs=latent,",
             "            shared_cols=int(meta[\"shared_cols\"]), latent_inputs={},"),
]


def scratch_copy(dest: Path) -> None:
    for name in ("kvmas", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml",):
        shutil.copy2(ROOT / name, dest / name)


def run_tests(where: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """(all passed, the last lines of the output) for ``tests`` run against the package in ``where``."""
    env = dict(os.environ, PYTHONPATH=str(where), PYTHONDONTWRITEBYTECODE="1")
    probe = subprocess.run([sys.executable, "-c", "import kvmas, sys; print(kvmas.__file__)"], cwd=where, env=env,
                           capture_output=True, text=True)
    if not probe.stdout.strip().startswith(str(where)):
        raise SystemExit(f"the scratch copy is not the package under test (imports {probe.stdout.strip()})")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                           *tests], cwd=where, env=env, capture_output=True, text=True)
    return proc.returncode == 0, "\n".join(proc.stdout.strip().splitlines()[-3:])


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or any(a in m.name for a in argv)]
    with tempfile.TemporaryDirectory(prefix="kvmas-mutation-") as tmp:
        base = Path(tmp) / "clean"
        scratch_copy(base)
        ok, tail = run_tests(base, tuple(sorted({t for m in chosen for t in m.tests})))
        if not ok:
            print(f"the unmutated suite fails; fix that first:\n{tail}")
            return 1
        failures = 0
        for m in chosen:
            work = Path(tmp) / m.name
            shutil.copytree(base, work)
            src = (work / m.path).read_text(encoding="utf-8")
            if src.count(m.old) != 1:
                print(f"STALE     {m.name}: its text occurs {src.count(m.old)} times in {m.path}")
                failures += 1
                continue
            (work / m.path).write_text(src.replace(m.old, m.new), encoding="utf-8")
            t0 = time.perf_counter()
            passed, tail = run_tests(work, m.tests)
            verdict = "SURVIVED" if passed else "caught"
            failures += passed
            first_fail = next((line for line in tail.splitlines() if line.startswith("FAILED")), tail.splitlines()[-1])
            print(f"{verdict:<9} {m.name} ({m.why}) [{time.perf_counter() - t0:.0f} s] {first_fail}", flush=True)
            shutil.rmtree(work)
    print(f"{len(chosen) - failures} of {len(chosen)} planted bugs caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
