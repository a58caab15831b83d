"""The PPO gate on a tiny random model and a scripted one-decision environment."""

from __future__ import annotations

import random

import pytest

from kvmas.memory.episode import run_episode
from kvmas.envs import StepResult
from kvmas.memory.gate import GateConfig, Transition, gate, replay_inputs, surrogate, transitions_from
from kvmas.memory.policy import ActionPolicy, StepInputs
from kvmas.memory.skill import Skill
from kvmas.testing import tiny_model

ACTIONS = ["open door", "wait"]


class DoorEnv:
    """One decision; reward 1 for the planted good action."""

    name, split, task, task_family, slots = "door", "train", "open the door", "door", {}

    def __init__(self, seed: int):
        self.seed = seed

    def reset(self) -> str:
        return "A door."

    def admissible(self) -> list[str]:
        return list(ACTIONS)

    good = ACTIONS[1]  # planted per model in the fixture: the action the behaviour policy rarely takes

    def step(self, action: str) -> StepResult:
        return StepResult("Done.", float(action == self.good), True, "act")


def skill(word: str) -> Skill:
    return Skill(scope="door", name=f"S{word.replace(' ', '')}", activation=word, steps=[word], termination="done")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (and do not fight other processes for cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(one_thread):
    model = tiny_model()
    pol = ActionPolicy(model, temperature=3.0, reduction="mean")
    first = pol.score(StepInputs(task=DoorEnv.task, obs="A door.", admissible=ACTIONS), None).logp
    DoorEnv.good = ACTIONS[min(range(2), key=lambda i: first[i])]
    GOOD = DoorEnv.good
    traces = [run_episode(DoorEnv(i), pol, None, random.Random(i)) for i in range(24)]
    outcomes = {t.outcome["success"] for t in traces}
    assert outcomes == {True, False}, "the behaviour policy must produce both outcomes"
    data = transitions_from(traces, baseline={"door": 0.0})
    # Plant: measure with the acting model which skill texts raise / lower the good action's probability.
    # Every episode is the same one-decision state, so one replayed prompt measures the shift exactly.
    inp = data[0].inputs
    assert inp == StepInputs(task=DoorEnv.task, obs="A door.", admissible=ACTIONS)
    base = pol.score(inp, None).logp[ACTIONS.index(GOOD)]
    shift = {}
    for w in ["knock", "go north", "push it", "wait wait", "open", "look around", "sit"]:
        sk = skill(w)
        shift[w] = pol.score(replay_inputs(data[0], sk), sk.render()).logp[ACTIONS.index(GOOD)] - base
    better = max(shift, key=shift.get)
    worse = min(shift, key=shift.get)
    assert shift[better] > 0.1 and shift[worse] < -0.05
    return pol, data, skill(better), skill(worse), traces


def test_gate_accepts_planted_better_and_rejects_planted_worse(setup):
    pol, data, better, worse, _ = setup
    cfg = GateConfig(min_transitions=16, max_abs_logratio=3.0)
    good = gate(pol, better, data, cfg)
    bad = gate(pol, worse, data, cfg)
    assert good.decision == "accept" and good.delta > 0, good.reason
    assert bad.decision == "reject" and bad.delta < 0, bad.reason
    assert good.n_transitions == len(data) == 24 and 0 < good.adv_pos_share < 1


def test_trust_region_guard_and_deferral(setup):
    pol, data, better, _, _ = setup
    tight = gate(pol, better, data, GateConfig(min_transitions=16, max_abs_logratio=1e-3))
    assert tight.decision == "reject" and tight.reason.startswith("trust region")
    few = gate(pol, better, data[:4], GateConfig(min_transitions=16))
    assert few.decision == "defer"
    too_big = better.model_copy()
    assert gate(pol, too_big, data, GateConfig(max_tokens=3)).decision == "reject"


def test_replay_set_keeps_only_comparable_decisions(setup):
    """Decisions made under another prompt version or by another model would make rho measure that change."""
    pol, data, _, _, traces = setup
    key = pol.model.fingerprint.key
    assert len(transitions_from(traces, baseline={"door": 0.0}, model_key=key)) == len(data)
    assert transitions_from(traces, baseline={"door": 0.0}, model_key="another-model") == []
    old = traces[0].model_copy(deep=True)
    for st in old.steps:
        st.meta["inputs"]["prompt_version"] = 1
    assert len(transitions_from([old] + traces[1:], baseline={"door": 0.0})) == len(data) - len(old.steps)


def test_no_op_candidate_never_passes(setup):
    pol, data, better, _, _ = setup
    # Replay recorded *under the candidate itself*: every ratio is 1, so the centred surrogate gain is 0.
    text = better.render()
    same = [Transition(inputs=t.inputs, choice=t.choice,
                       behavior_logp=pol.score(replay_inputs(t, better), text).logp[t.choice],
                       advantage=t.advantage, episode_id=t.episode_id, behavior_skill_id=better.id) for t in data]
    rep = gate(pol, better, same, GateConfig(min_transitions=16))
    assert rep.decision == "reject" and abs(rep.delta) < 1e-9 and rep.mean_abs_logratio < 1e-6
    # ProcMEM's uncentred test would pass it whenever the batch sits above the baseline:
    assert sum(t.advantage for t in same) / len(same) > 0


def test_surrogate_clips_large_ratios():
    s = surrogate([5.0, -5.0], [1.0, -1.0], eps=0.2)
    assert s["clip_fraction"] == 1.0
    # min(ρÂ, clip(ρ)Â): ρ=e^5 with Â=+1 -> 1.2; ρ=e^-5 with Â=-1 -> max penalty is -0.8 (min picks -0.8)
    assert s["new"] == pytest.approx((1.2 - 0.8) / 2, abs=1e-6)


def _solved(n_steps: int):
    """A trace of a solved one-family episode of ``n_steps`` decisions (no model needed)."""
    from kvmas.trace import Step, Trace

    tr = Trace(method="skills:house", question="put a mug in table 1.")
    inp = StepInputs(task="put a mug in table 1.", obs="You are in a room.", admissible=["look", "go to table 1"])
    for _ in range(n_steps):
        tr.add(Step(agent="actor", role="actor", action="score", text_out="look",
                    meta={"inputs": inp.model_dump(), "choice": 0, "logp": -0.7, "skill_id": None}))
    tr.outcome = {"reward": 1.0, "success": True, "n_steps": n_steps, "task_family": "place"}
    return tr


def test_always_solved_family_still_gives_the_gate_a_contrast():
    """Reward alone: every transition of an always-solved family has advantage 0 (the gate would defer
    forever); with the step cost, the shorter solutions are the better ones."""
    from kvmas.memory.episode import episode_return

    traces = [_solved(n) for n in (4, 6, 8)]
    base = {"place": sum(episode_return(t.outcome) for t in traces) / 3}
    adv = [t.advantage for t in transitions_from(traces, baseline=base)]
    assert any(a > 0 for a in adv) and any(a < 0 for a in adv)
    short = transitions_from(traces[:1], baseline=base)
    assert all(t.advantage > 0 for t in short)  # the 4-step solution beats the family's mean
    flat = transitions_from(traces, baseline={"place": 1.0}, step_cost=0.0)
    assert all(t.advantage == 0 for t in flat)


def test_new_skill_is_replayed_from_the_episode_start():
    """A step taken under a skill activated at step 2: an edit of that skill replays from there; a new skill
    matches its steps against the whole episode (else it would be handed its first step again)."""
    from kvmas.trace import Step, Trace

    acts = ["go to shelf 1", "take mug from shelf 1", "go to table 1"]
    inp = StepInputs(task="put a mug in table 1.", obs="You arrive at table 1.",
                     history=[[a, "ok"] for a in acts], admissible=["go to shelf 1", "put mug in table 1", "look"])
    tr = Trace(method="skills:house", question=inp.task)
    tr.add(Step(agent="actor", role="actor", action="score", text_out="put mug in table 1",
                meta={"inputs": inp.model_dump(), "choice": 1, "logp": -0.5, "skill_id": "deliver",
                      "skill_since": 2, "slots": {"object": "mug", "place": "shelf 1", "target": "table 1"}}))
    tr.outcome = {"reward": 1.0, "success": True, "n_steps": 4, "task_family": "place"}
    whole = Skill(scope="house", name="PlaceMug", activation="put", termination="done",
                  steps=["go to <place>", "take <object> from <place>", "go to <target>", "put <object> in <target>"])
    edit, = transitions_from([tr], baseline={})
    new, = transitions_from([tr], baseline={}, from_start=True)
    assert (edit.since, new.since) == (2, 0)
    assert replay_inputs(new, whole).hint == "put mug in table 1"
    assert replay_inputs(edit, whole).hint == "go to shelf 1"  # the wrong step a new skill used to get
