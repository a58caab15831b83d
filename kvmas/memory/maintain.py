"""Pool maintenance for one scope: semantic duplicates, superseded versions, harmful skills, capacity.
Removal is always an ``archived`` status with a logged reason (never a delete).

>>> from kvmas.memory.maintain import jaccard
>>> round(jaccard("go to sinkbasin 1", "go to sinkbasin 2"), 2)
0.6
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmas.memory.skill import LIVE, Skill
from kvmas.memory.store import SkillStore


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9<>]+", text.lower()))


def jaccard(a: str, b: str) -> float:
    ta, tb = _tokens(a), _tokens(b)
    return len(ta & tb) / max(1, len(ta | tb))


@dataclass
class MaintainConfig:
    capacity: int = 8
    dedup_jaccard: float = 0.8
    newborn_protect_iters: int = 2
    superseded_min_age: int = 3
    harmful_min_uses: int = 6
    harmful_lcb: float = -0.001
    lcb_beta: float = 0.2


def maintain(store: SkillStore, scope: str, cfg: MaintainConfig | None = None, *, dry_run: bool = False,
             actor: str = "maintain") -> list[tuple[str, str]]:
    """Run the four passes; returns [(skill id, reason)] of archived skills (or that would be, on ``dry_run``)."""
    cfg = cfg or MaintainConfig()
    t = store.iteration(scope)
    live = store.all(scope, LIVE)
    stats = {s.id: store.stats(s.id) for s in live}
    lcb = {s.id: stats[s.id].lcb(t, cfg.lcb_beta) for s in live}
    gone: dict[str, str] = {}

    def protected(s: Skill) -> bool:
        return s.pinned or stats[s.id].age_iters < cfg.newborn_protect_iters

    def alive() -> list[Skill]:
        return [s for s in live if s.id not in gone]

    # 1. semantic duplicates: keep the best LCB of each near-identical pair
    for a in alive():
        for b in alive():
            if a.id < b.id and a.id not in gone and b.id not in gone:
                sim = jaccard(a.activation + " " + " ".join(a.steps), b.activation + " " + " ".join(b.steps))
                if sim >= cfg.dedup_jaccard:
                    loser = min((a, b), key=lambda s: (lcb[s.id], s.created_at))
                    if not protected(loser):
                        gone[loser.id] = f"duplicate of {(b if loser is a else a).id} (jaccard {sim:.2f})"
    # 2. superseded versions in one lineage (all mature): keep the best LCB
    by_lineage: dict[str, list[Skill]] = {}
    for s in alive():
        by_lineage.setdefault(s.lineage_id, []).append(s)
    for versions in by_lineage.values():
        if len(versions) > 1 and all(stats[s.id].age_iters >= cfg.superseded_min_age for s in versions):
            best = max(versions, key=lambda s: lcb[s.id])
            for s in versions:
                if s is not best and not s.pinned:
                    gone[s.id] = f"superseded by version {best.version} ({best.id}, lcb {lcb[best.id]:.4f})"
    # 3. harmful: enough evidence and a negative lower bound
    for s in alive():
        st = stats[s.id]
        if st.age_iters > 2 and st.n_episodes >= cfg.harmful_min_uses and lcb[s.id] < cfg.harmful_lcb \
                and not s.pinned and s.source != "seed":
            gone[s.id] = f"harmful: lcb {lcb[s.id]:.4f} after {st.n_episodes} episodes"
    # 4. capacity: archive the lowest LCB beyond K
    rest = sorted(alive(), key=lambda s: (s.pinned, lcb[s.id]), reverse=True)
    for s in rest[cfg.capacity:]:
        if not s.pinned:
            gone[s.id] = f"capacity {cfg.capacity}: lcb {lcb[s.id]:.4f} ranks below the kept skills"
    if not dry_run:
        for sid, why in gone.items():
            status = next(s.status for s in live if s.id == sid)
            store.set_status(sid, "archived", expected=status, reason=why, actor=actor, op="archive")
    return list(gone.items())
