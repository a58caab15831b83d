"""Environments, the acting policy (KV prefix vs text), extraction, critic, maintenance, run-time use, the
learning loop and the CLI, on tiny models."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from kvmas.cli.skills_cmd import app
from kvmas.memory.critic import ContrastiveRuleCritic
from kvmas.memory.procedures import carried_out, extract, units
from kvmas.envs import StepResult, make_env
from kvmas.memory.lifecycle import LearnConfig, Learner, seed_skills
from kvmas.memory.maintain import MaintainConfig, maintain
from kvmas.memory.policy import ActionPolicy, StepInputs
from kvmas.memory.runtime import SkillMemory
from kvmas.memory.skill import Skill
from kvmas.memory.store import SkillStore
from kvmas.testing import tiny_model
from kvmas.trace import Step, Trace


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def oracle(env) -> list[str]:
    s = env._state
    plan = [f"go to {s['start']}", f"take {s['obj']} from {s['start']}"]
    app_ = {"clean": ("sinkbasin 1", "clean"), "heat": ("microwave 1", "heat"), "cool": ("fridge 1", "cool")}
    if env.task_family in app_:
        where, verb = app_[env.task_family]
        plan += [f"go to {where}", f"{verb} {s['obj']} with {where}"]
    return plan + [f"go to {s['target']}", f"put {s['obj']} in {s['target']}"]


def scripted_trace(env_name: str, seed: int, actions: list[str] | None = None, split: str = "train") -> Trace:
    """A finished-episode trace with the same shape run_episode writes (no model)."""
    env = make_env(env_name, seed, split)
    obs = env.reset()
    actions = actions or oracle(env)
    tr = Trace(method=f"skills:{env_name}", question=env.task, seed=seed)
    hist, reward = [], 0.0
    for a in actions:
        inp = StepInputs(task=env.task, history=hist, obs=obs, admissible=env.admissible())
        res: StepResult = env.step(a)
        tr.add(Step(agent="actor", role="actor", action="score", text_in=obs, text_out=a,
                    meta={"inputs": inp.model_dump(), "choice": inp.admissible.index(a), "logp": -1.0,
                          "skill_id": None, "event": res.event, "obs_after": res.obs, "slots": env.slots}))
        hist, obs, reward = hist + [[a, res.obs]], res.obs, res.reward
        if res.done:
            break
    tr.outcome = {"reward": reward, "success": reward > 0, "n_steps": len(tr.steps), "task_family": env.task_family,
                  "invocations": []}
    return tr


def test_envs_are_seeded_solvable_and_split():
    a, b = make_env("house", 5), make_env("house", 5)
    assert a.reset() == b.reset() and a.task == b.task and a.admissible() == b.admissible()
    fams = set()
    for seed in range(40):
        tr = scripted_trace("house", seed)
        assert tr.outcome["success"], tr.question
        fams.add(tr.outcome["task_family"])
    assert fams == {"place", "clean", "heat", "cool"}
    ood = make_env("house", 5, "ood")
    ood.reset()
    assert ood._state["obj"] not in {"apple", "mug", "potato", "plate", "tomato", "cup"}
    cb = make_env("codebreaker", 2)
    cb.reset()
    secret = "guess " + " ".join(map(str, cb.secret))
    for _ in range(6):  # the admissible list always holds a guess consistent with the feedback so far
        consistent = [g for g in cb.admissible() if cb._consistent(tuple(int(x) for x in g.split()[1:]))]
        assert consistent
        if cb.step(consistent[0]).done:
            break
    assert make_env("codebreaker", 2, "ood").reset() and secret


def test_kv_prefix_scores_equal_text_and_activation_costs_no_prefill(model):
    skill = seed_skills("house", "h")[2]
    env = make_env("house", 1)
    inp = StepInputs(task=env.task, obs=env.reset(), admissible=env.admissible())
    kv, text = ActionPolicy(model, kv_prefix=True), ActionPolicy(model, kv_prefix=False)
    a, b = kv.score(inp, skill.render()), text.score(inp, skill.render())
    assert max(abs(x - y) for x, y in zip(a.logp, b.logp)) < 1e-4
    none = kv.score(inp, None)
    assert a.prefilled == none.prefilled  # the skill adds no prefill with its cached prefix
    assert b.prefilled == a.prefilled + a.reused == a.context  # the text block is prefilled at every step
    assert a.skill_tokens > 20 and a.reused - none.reused == a.skill_tokens
    n = kv.prefix_prefills
    kv.score(inp, skill.render())
    assert kv.prefix_prefills == n  # computed once per skill and model


def test_extraction_finds_recurring_procedure_and_critic_contrasts():
    traces = [scripted_trace("house", s) for s in range(40)]
    heat = [t for t in traces if t.outcome["task_family"] == "heat"]
    assert [tpl for _, tpl in units(heat[0])] == [
        "go to <place>", "take <object> from <place>", "go to microwave 1", "heat <object> with microwave 1",
        "go to <target>", "put <object> in <target>"]
    cands = {c.provenance["family"]: c for c in extract(traces, "h").skills}
    assert cands["heat"].steps == [tpl for _, tpl in units(heat[0])] and cands["heat"].activation_terms == ["hot"]
    assert cands["heat"].termination == "You put the <object> in <target>."
    assert all(len(c.provenance["episodes"]) >= 2 for c in cands.values())
    # contrast: successes under a parent skill went to the microwave, failures did not
    parent = Skill(scope="h", name="Hot", activation="hot task", steps=["go to <place>"], termination="done")
    succ, fail = [], []
    for t in heat[:3]:
        for s in t.steps:
            s.meta["skill_id"] = parent.id
        succ.append(t)
    for seed in range(40, 200):
        env = make_env("house", seed)
        env.reset()
        if env.task_family == "heat":
            plan = oracle(env)
            t = scripted_trace("house", seed, plan[:2] + plan[4:])  # skipped the microwave: failure
            for s in t.steps:
                s.meta["skill_id"] = parent.id
            fail.append(t)
        if len(fail) == 3:
            break
    assert not any(t.outcome["success"] for t in fail)
    props = ContrastiveRuleCritic().propose(parent, succ + fail)
    assert props and all(p.parent_id == parent.id and p.version == 2 for p in props)
    assert any("go to microwave 1" in p.steps for p in props)


def test_maintenance_logs_every_archive_with_reason(tmp_path):
    st = SkillStore(tmp_path / "m.sqlite")
    base = dict(scope="m", termination="done", status="active")
    a, _ = st.add(Skill(name="A", activation="hot task one", steps=["go to microwave 1", "heat it"], **base))
    b, _ = st.add(Skill(name="B", activation="hot task one", steps=["go to microwave 1", "heat it now"], **base))
    c, _ = st.add(Skill(name="C", activation="cold task", steps=["go to fridge 1"], **base))
    d, _ = st.add(Skill(name="D", activation="clean task", steps=["go to sinkbasin 1"], **base))
    for _ in range(3):
        st.age("m")
    st.record_use(a.id, credit=0.5)
    for _ in range(8):
        st.record_use(c.id, credit=-0.5)
    gone = dict(maintain(st, "m", MaintainConfig(capacity=1, dedup_jaccard=0.7)))
    assert gone[b.id].startswith("duplicate of") and gone[c.id].startswith("harmful") and "capacity" in gone[d.id]
    assert a.id not in gone and st.get(a.id).status == "active"
    ev = [e for e in st.events(scope="m") if e.op == "archive"]
    assert {e.skill_id for e in ev} == set(gone) and all(e.reason for e in ev)


def test_runtime_selection_is_greedy_in_eval_and_termination_checks(model, tmp_path):
    st = SkillStore(tmp_path / "r.sqlite")
    for s in seed_skills("house", "h"):
        st.add(s)
    mem = SkillMemory(st, "h", ActionPolicy(model)).freeze()
    env = make_env("house", 0)
    obs = env.reset()
    picks = {mem.select(env.task, obs, random.Random(i))[0].id for i in range(3)}
    assert len(picks) == 1  # exploration off: deterministic
    heat = next(s for s in mem.snapshot if s.name == "HeatInMicrowave")
    assert [s.name for s, _ in mem.candidates("put a cold mug in table 1.", "x")] == ["FetchObject"]
    held = mem.candidates("put a cold mug in table 1.", "You pick up the mug.")
    assert held[0][0].name == "CoolInFridge" and all(s.name != "HeatInMicrowave" for s, _ in held)
    assert mem.stop_reason(heat, "put a hot mug", "You heat the mug. It is hot now.", 1) == "termination"
    assert mem.stop_reason(heat, "put a cold mug", "You arrive.", 1) == "activation_lost"
    assert mem.stop_reason(heat, "put a hot mug", "You pick up the mug. You arrive.", 8) == "max_age"
    assert mem.stop_reason(heat, "put a hot mug", "You pick up the mug. You arrive.", 1) is None
    assert mem.stop_reason(heat, "put a hot mug", "You pick up the mug.", 1, hint=None) == "termination"


def test_learning_loop_logs_decisions(model, tmp_path):
    st = SkillStore(tmp_path / "l.sqlite")
    lr = Learner(st, ActionPolicy(model), "house", "h", LearnConfig(episodes_per_iter=2, judge=False))
    assert lr.install_seeds() == 5 and lr.install_seeds() == 0
    # evidence from scripted successes so extraction has something to propose
    for seed in range(12):
        tr = scripted_trace("house", seed)
        st.add_episode(tr.run_id, scope="h", env="house", task_family=tr.outcome["task_family"], iteration=0,
                       reward=1.0, success=True, n_steps=len(tr.steps), trace_json=tr.model_dump_json())
    rep = lr.iterate()
    assert rep["episodes"] == 2 and st.iteration("h") == 1
    cands = [s for s in st.all("h") if s.source == "extracted"]
    assert cands, "extraction proposed nothing"
    ops = {e.op for e in st.events(scope="h")}
    assert "create" in ops and ({"defer", "probation", "rejected"} & ops)
    assert json.loads(st.get_meta("baseline:h"))


def test_cli_round_trip_and_bad_input(tmp_path):
    db = str(tmp_path / "cli.sqlite")
    st = SkillStore(db)
    for s in seed_skills("house", "h"):
        st.add(s)
    r = CliRunner()
    out = r.invoke(app, ["list", "--store", db, "--page-size", "2"])
    assert out.exit_code == 0 and "more: --after" in out.output
    sid = st.all("h")[0].id
    assert r.invoke(app, ["show", sid[:8], "--store", db]).exit_code == 0
    assert r.invoke(app, ["history", sid, "--store", db]).exit_code == 0
    f = tmp_path / "x.json"
    assert r.invoke(app, ["export", str(f), "--store", db]).exit_code == 0
    doc = json.loads(f.read_text())
    doc["skills"][0]["steps"] = []
    f.write_text(json.dumps(doc))
    bad = r.invoke(app, ["import", str(f), "--store", db])
    assert bad.exit_code != 0 and "skills[0].steps" in bad.output
    assert r.invoke(app, ["purge", "--store", db]).exit_code != 0  # scope required
    assert r.invoke(app, ["purge", "--scope", "h", "--store", db]).exit_code != 0  # --yes required
    assert r.invoke(app, ["purge", "--scope", "h", "--yes", "--store", db]).exit_code == 0
    assert st.all("h") == []
    assert r.invoke(app, ["stats", "--store", db]).exit_code == 0
    assert r.invoke(app, ["eval", "house", "--conditions", "bogus", "--store", db]).exit_code != 0


def test_embedding_retrieval_and_llm_critic_interface(model, tmp_path):
    from kvmas.memory.critic import LLMCritic

    st = SkillStore(tmp_path / "e.sqlite")
    for s in seed_skills("house", "h"):
        st.add(s)
    mem = SkillMemory(st, "h", ActionPolicy(model), embed=True, judge=False)
    hits = mem.candidates("put a hot mug in table 1.", "You pick up the mug.")
    assert hits and all(st.embedding(s.id, model.fingerprint.key) is not None for s in st.all("h"))
    assert all(s.name != "CoolInFridge" for s, _ in hits)  # lexical applicability still filters
    # The LLM critic sits behind the same interface; a random tiny model cannot write valid JSON -> no proposal.
    parent = st.all("h")[0]
    ok, bad = scripted_trace("house", 0), scripted_trace("house", 1, ["look"])
    for t in (ok, bad):
        for s in t.steps:
            s.meta["skill_id"] = parent.id
    assert LLMCritic(model, max_new_tokens=8).propose(parent, [ok, bad]) == []


def test_a_step_naming_a_slot_the_episode_lacks_never_stalls_the_pointer():
    """A procedure extracted across recipe sizes starts with a second ingredient's step; where there is none
    it is skipped before the actions are matched too (else the pointer stayed on it and hinted step 2 forever)."""
    from kvmas.memory.runtime import step_hint

    sk = Skill(scope="h", name="P", activation="x", termination="done",
               steps=["take <second>", "go to <place>", "take <object> from <place>", "go to <target>"])
    slots = {"object": "mug", "place": "table 1", "target": "shelf 1"}
    adm = ["go to table 1", "go to shelf 1", "take mug from table 1"]
    assert step_hint(sk, [], adm, slots) == "go to table 1"
    assert step_hint(sk, ["go to table 1"], adm, slots) == "take mug from table 1"
    assert step_hint(sk, ["go to table 1", "take mug from table 1"], adm, slots) == "go to shelf 1"
    tr = scripted_trace("house", 2)  # a "place" task: the procedure is carried out, the unbound step skipped
    assert carried_out(sk.steps, tr) == [0, 1, 2]
