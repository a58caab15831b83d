"""Fixtures shared by several test modules."""

import pytest


def _write_small_pool(path) -> str:
    from kvmas.organizer import KnowledgePool, PipelineSpec

    pool = KnowledgePool(path, seed=False)
    for q, spec in [("sums", PipelineSpec.chain("single")), ("options", PipelineSpec.chain(("vote", {"n": 2}))),
                    ("steps", PipelineSpec.chain(("plan", {"k": 1})))]:
        pool.add(q, spec)
    pool.close()
    return str(path)


@pytest.fixture(scope="session")
def small_pool():
    """``small_pool(path)`` writes a knowledge pool of three entries (single, vote n=2, plan k=1) at ``path``
    and returns the path as a string: a start pool for ``auto`` in bench tests."""
    return _write_small_pool
