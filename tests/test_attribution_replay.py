"""Counterfactual replays on real agents (tiny random model): Shapley via replays, earliest flipping step."""

import pytest

from kvmas.agents.agent import Agent, Intervention, RunContext
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError
from kvmas.attribution.replay import NotReplayable, ReplayAttributor, compose
from kvmas.testing import tiny_model

MODEL = tiny_model("llama")
WRONG = "The answer is 13."


def pipeline(question: str, seed: int, interventions: dict):
    """drafter speaks, checker reads the draft and speaks; the answer is the last non-empty text."""
    ctx = RunContext(model=MODEL, question=question, seed=seed, interventions=interventions)
    drafter, checker = Agent("drafter", max_new_tokens=3), Agent("checker", max_new_tokens=3)
    s = drafter.read(ctx, LatentState.empty(MODEL), question)
    draft, s = drafter.speak(ctx, s)
    s = checker.read(ctx, s, "Check it.")
    final, s = checker.speak(ctx, s)
    ctx.trace.answer = final or draft
    return type("R", (), {"answer": final or draft, "trace": ctx.trace})()


def judge(answer):
    return 0.0 if answer and "13" in answer else 1.0


@pytest.mark.parametrize("planted_agent, planted_step", [("checker", 3), ("drafter", 1)])
def test_planted_fault_is_found(planted_agent, planted_step):
    planted = {planted_agent: Intervention("replace", WRONG, {planted_step})}
    if planted_agent == "drafter":  # make the checker copy its input so the drafter's fault reaches the answer
        planted["checker"] = Intervention("ablate")
    run = lambda iv: pipeline("2+3?", 0, compose(planted, iv))  # noqa: E731
    failed = run({})
    assert judge(failed.answer) == 0.0
    att = ReplayAttributor(run, judge)
    res = att.attribute(failed.trace, players=["drafter", "checker"] if planted_agent == "checker" else ["drafter"])
    assert res.agent == planted_agent and res.step == planted_step
    # the fault is in the answer step itself: nothing upstream repairs the run
    assert any("answer step" in e and "is where it fails" in e for e in res.evidence)
    assert len(att.replays) <= 2 ** 2 + 4  # memoised: coalitions + single-step ablations


def test_upstream_fault_found_by_a_flipping_replay():
    """The drafter's wrong draft is copied by the checker (the answering agent): ablating the drafter repairs
    the run, so the drafter gets the blame and its step is the earliest flipping one."""
    from types import SimpleNamespace as NS

    from kvmas.trace import Step, Trace

    def run(iv):
        t = Trace(question="q")
        draft = "" if "drafter" in iv else "13"
        script = [("drafter", "read", None), ("drafter", "speak", draft), ("checker", "read", None),
                  ("checker", "speak", draft or "5")]
        for i, (agent, action, out) in enumerate(script):
            t.add(Step(agent=agent, role="r", action=action, reads=list(range(i)), writes=[i], text_out=out))
        return NS(answer=draft or "5", trace=t)

    res = ReplayAttributor(run, judge=lambda a: float(a == "5")).attribute(run({}).trace)
    assert res.agent == "drafter" and res.step == 1
    assert res.blame[0].agent == "drafter" and res.blame[0].phi == 1.0
    assert any("flips the outcome" in e for r in res.ranking for e in r.evidence)


def test_compose_refuses_unrepresentable():
    base = {"a": Intervention("replace", "x", {3})}
    with pytest.raises(NotReplayable):
        compose(base, {"a": Intervention("ablate", steps={1})})
    assert compose(base, {"a": Intervention("ablate")})["a"].steps is None


def test_replay_budget():
    run = lambda iv: pipeline("2+3?", 0, compose({"checker": Intervention("replace", WRONG, {3})}, iv))  # noqa: E731
    with pytest.raises(BadInputError, match="budget"):  # the original + the drafter's coalition do not fit
        ReplayAttributor(run, judge, max_replays=1).attribute(run({}).trace)
    att = ReplayAttributor(run, judge, max_replays=2)  # 2 coalitions; no replay left for the step ablation
    res = att.attribute(run({}).trace)
    assert len(att.replays) == 2 and any("budget" in e for e in res.evidence)


def test_planted_suite_on_a_real_primitive():
    """Single (latent, one thought): the fault is planted on the solver's last content step, its speech."""
    from kvmas.attribution.planted import run_suite
    from kvmas.primitives import build

    prim = build("single", max_new_tokens=3, latent_steps=1)
    marker = "ZZZ"
    res = run_suite({"single": prim}, [("2+3?", "5")], MODEL,
                    judge_for=lambda gold: (lambda a: float(marker not in (a or ""))),
                    fault_for=lambda gold: f"{marker} is the answer", plant="last")
    assert res["effective"] == 1 and res["agent_acc"] == 100.0 and res["step_acc"] == 100.0
    case = res["cases"][0]
    assert case["decided_by"] == "answer step"  # nothing upstream repairs it: the speech itself fails
    assert case["agent"] == "solver" and case["step"] == 2 and case["faulted_answer"].startswith(marker)
    assert any("not replayable" in e for e in case["evidence"])  # the think step cannot be ablated alone


def test_zero_shapley_takes_agent_from_flipping_step():
    """Whole-agent ablations never flip (the reader of the fault also needs the faulty agent's prompt), but
    ablating the faulty agent's single step does: the agent must come from that step, not from a tie."""
    from types import SimpleNamespace as NS

    from kvmas.trace import Step, Trace

    def run(iv):
        t = Trace(question="q")
        a_off = "a" in iv and iv["a"].steps is None
        b_step = "b" in iv and iv["b"].steps == {2}
        for i, (agent, action) in enumerate([("a", "speak"), ("b", "read"), ("b", "think"), ("a", "speak")]):
            t.add(Step(agent=agent, role="r", action=action, reads=list(range(i)), writes=[i], text_out="x"))
        ok = b_step and not a_off
        return NS(answer="5" if ok else "7", trace=t)

    res = ReplayAttributor(run, judge=lambda a: float(a == "5")).attribute(run({}).trace)
    assert all(b.phi == 0 for b in res.blame)
    assert res.agent == "b" and res.step == 2
