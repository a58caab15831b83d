"""A kvmas trace as a Who&When record: the task as a ``human`` turn, then every step that said something.

Only speech goes into the history (reads are prefills of prompts and earlier messages, latent thoughts have no
text), so the record reads like any other system's log. A labelled trace keeps its label: the planted (or
annotated) trace step maps to its position in the exported history.

>>> from kvmas.trace import Trace, Step
>>> t = Trace(question="2+3?", answer="6")
>>> _ = t.add(Step(agent="solver", role="solver", action="read", text_in="prompt"))
>>> _ = t.add(Step(agent="solver", role="solver", action="speak", text_out="It is 6."))
>>> rec = to_whowhen(t, mistake=("solver", 1))
>>> [h["name"] for h in rec["history"]], rec["mistake_step"]
(['human', 'solver'], '1')
"""

from __future__ import annotations

from typing import Any

from kvmas.errors import BadInputError
from kvmas.trace import Trace

TASK_AGENT = "human"


def spoken_steps(trace: Trace) -> list[int]:
    """Indices of the trace steps that produced text (the ones an exported history holds, in order)."""
    return [i for i, s in enumerate(trace.steps) if s.action == "speak" and (s.text_out or "").strip()]


def to_whowhen(trace: Trace, mistake: tuple[str, int] | None = None, system: str | None = None,
               record_id: str | None = None) -> dict[str, Any]:
    """Who&When-format record of ``trace``; ``mistake`` = (agent, trace step index) of the decisive error.

    The mistaken step must be one that spoke (else there is nothing in the history to point at): a
    :class:`BadInputError` says so.
    """
    spoken = spoken_steps(trace)
    if not spoken:
        raise BadInputError(f"trace {trace.run_id}: no step produced text; nothing to export")
    history = [{"content": trace.question, "role": "user", "name": TASK_AGENT}]
    history += [{"content": trace.steps[i].text_out, "role": "assistant", "name": trace.steps[i].agent}
                for i in spoken]
    rid = record_id or trace.run_id
    rec: dict[str, Any] = {
        "source_file": f"{rid}.json", "question": trace.question, "question_ID": rid,
        "ground_truth": None if (trace.outcome or {}).get("gold") is None else str(trace.outcome["gold"]),
        "is_correct": False, "history": history, "system": system or f"kvmas/{trace.method}",
    }
    if mistake is not None:
        agent, step = mistake
        if step not in spoken:
            raise BadInputError(f"trace {trace.run_id}: mistake step {step} produced no text "
                                f"(spoken steps: {spoken})")
        if trace.steps[step].agent != agent:
            raise BadInputError(f"trace {trace.run_id}: step {step} is spoken by {trace.steps[step].agent}, "
                                f"not {agent}")
        rec.update(mistake_agent=agent, mistake_step=str(1 + spoken.index(step)),
                   mistake_reason=(trace.outcome or {}).get("planted", {}).get("reason", ""))
    return rec


def label_of(trace: Trace) -> tuple[str, int] | None:
    """The ``(agent, step)`` a trace's ``outcome["planted"]`` records, if any."""
    p = (trace.outcome or {}).get("planted")
    if not isinstance(p, dict):
        return None
    agent, step = p.get("agent"), p.get("step")
    if not isinstance(agent, str) or not isinstance(step, int) or isinstance(step, bool):
        raise BadInputError(f"trace {trace.run_id}: outcome.planted needs a string agent and an integer step")
    return agent, step
