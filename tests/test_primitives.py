"""Primitives on tiny random models: latent handoff, batching, same prompts in both modes, determinism, usage."""

import pytest
import torch

from kvmas.agents.agent import Intervention
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError, ContextOverflowError
from kvmas.primitives import PlanExecute, Review, Sequence, Single, Vote, build, parse_method
from kvmas.primitives import plan as plan_mod
from kvmas.primitives import review as review_mod
from kvmas.primitives import vote as vote_mod
from kvmas.primitives.run import Output, open_run
from kvmas.testing import tiny_model

Q = "What is 2+3?"


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen", seed=1)


def small(cls, comm="latent", **kw):
    return cls(comm=comm, max_new_tokens=4, latent_steps=2, **kw)


def stable(trace):
    d = trace.model_dump(exclude={"run_id", "created", "wall_s", "versions"})
    for s in d["steps"]:
        s.pop("wall_s")
    return d


def test_latent_handoff_conditions_on_sender(model):
    prim = small(Review, rounds=1, early_stop=False)
    base = prim(Q, model=model)
    critic_read = next(s for s in base.trace.steps if s.agent == "critic" and s.action == "read")
    solver_thoughts = {i for s in base.trace.steps[: critic_read.index] if s.agent == "solver" and s.action == "think"
                       for i in s.writes}
    # the critic's prompt was prefilled on top of the solver's state: it read the solver's thoughts
    assert solver_thoughts and solver_thoughts <= set(critic_read.reads)
    st = base.state
    critic_seg = next(s for s in st.segments if s.agent == "critic")
    solver_seg = next(s for s in st.segments if s.agent == "solver")
    assert critic_seg.start > solver_seg.start  # on top, not beside
    pos = st.positions[0]
    assert torch.all(pos[1:] > pos[:-1])  # one stream: dropped role prompts leave gaps, never overlaps

    ref = _head_logprobs(base)
    ablated = _head_logprobs(prim(Q, model=model, interventions={"critic": Intervention("ablate")}))
    replaced = _head_logprobs(prim(Q, model=model, interventions={"critic": Intervention("replace", "All wrong!")}))
    assert (ref - ablated).abs().max() > 1e-3
    assert (ref - replaced).abs().max() > 1e-3


def _head_logprobs(result):
    """The solver's next-token distribution right before it speaks (replayed from the trace's steps)."""
    speak = [s for s in result.trace.steps if s.action == "speak"][-1]
    # the state before speaking is the final state minus the spoken segment
    st = result.state
    spoken = [s for s in st.segments if s.id in speak.writes]
    if spoken:
        st = st.crop(spoken[0].start)
        # re-run the last prompt column to recover the head after crop
        last = st.segments[-1]
        st = st.crop(st.length - 1).extend([last.token_ids[0][-1]] if last.token_ids else [0])
    return st.next_logprobs()[0]


def test_vote_rows_equal_separate_runs_and_prefill_question_once(model):
    prim = Vote(comm="text", n=3, max_new_tokens=6)
    r = prim(Q, model=model)
    speak = next(s for s in r.trace.steps if s.agent == "solvers" and s.action == "speak")
    assert speak.rows == 3
    prompts = [prim.text_context(type("C", (), {"question": Q})(), Output.start(model)) + "\n\n" + f"{p} {vote_mod.SOLVE}"
               for p in prim._personas()]
    from kvmas.agents.agent import Agent, RunContext
    for i, p in enumerate(prompts):
        ctx = RunContext(model=model, question=Q, system="You are a helpful assistant working in a team of agents on one problem.")
        a = Agent("solo", max_new_tokens=6)
        text, _ = a.speak(ctx, a.read(ctx, LatentState.empty(model), p))
        assert text == r.trace.steps[1].text_out.split("\n---\n")[i]
    # latent mode: the question is prefilled once for all rows
    lat = Vote(n=3, max_new_tokens=4, latent_steps=2)(Q, model=model)
    q_steps = [s for s in lat.trace.steps if s.agent == "user"]
    assert len(q_steps) == 1 and q_steps[0].rows == 1
    solvers_read = next(s for s in lat.trace.steps if s.agent == "solvers" and s.action == "read")
    assert solvers_read.rows == 3
    assert solvers_read.usage.reused == q_steps[0].usage.prefilled  # shared prefix counted once


@pytest.mark.parametrize("cls,instructions", [
    (Review, [review_mod.SOLVE, review_mod.CRITIQUE, review_mod.REFINE]),
    (Vote, [vote_mod.SOLVE, vote_mod.SELECT]),
    (PlanExecute, [plan_mod.PLAN, plan_mod.INTEGRATE, "You are Executor 1 of 3"]),
])
def test_text_and_latent_run_same_roles_same_prompts(model, cls, instructions):
    kw = {"early_stop": False, "rounds": 1} if cls is Review else {}
    lat, txt, kv = (small(cls, comm, **kw)(Q, model=model) for comm in ("latent", "text", "kv"))
    roles = lambda t: {(s.agent, s.role) for s in t.steps if s.agent != "user"}  # noqa: E731
    assert roles(lat.trace) == roles(txt.trace) == roles(kv.trace)
    for instr in instructions:
        for t in (lat.trace, txt.trace, kv.trace):
            assert any(s.text_in and instr in s.text_in for s in t.steps), (instr, t.method)
    # every mode shows every agent the original question
    for t in (lat.trace, txt.trace, kv.trace):
        assert any(s.text_in and Q in s.text_in for s in t.steps)


@pytest.mark.parametrize("prim", [
    lambda: small(Review, early_stop=False), lambda: small(Vote, temperature=0.9, top_p=0.9),
    lambda: small(PlanExecute, "text"), lambda: Sequence(small(PlanExecute), small(Review)),
])
def test_seed_in_identical_trace_out(model, prim):
    a, b = prim()(Q, model=model, seed=5), prim()(Q, model=model, seed=5)
    assert stable(a.trace) == stable(b.trace)


def test_sampling_seed_changes_text_vote(model):
    p = Vote(comm="text", n=3, max_new_tokens=8, temperature=1.0)
    assert p(Q, model=model, seed=1).trace.steps[1].text_out != p(Q, model=model, seed=2).trace.steps[1].text_out


@pytest.mark.parametrize("prim", [lambda: small(Review, early_stop=False), lambda: small(Vote),
                                  lambda: small(PlanExecute), lambda: small(Review, "text", early_stop=False),
                                  lambda: Sequence(small(PlanExecute), small(Review, early_stop=False)),
                                  lambda: small(Review, "kv"), lambda: small(Vote, "kv"),
                                  lambda: Sequence(small(PlanExecute, "kv"), small(Review, "kv"))])
def test_usage_equals_the_positions_the_model_computed(model, prim):
    """The trace's computed tokens (prefilled + latent + generated) equal the real (unmasked) positions that
    actually went through the model, counted by a hook on its decoder, independently of the accounting."""
    seen = {"positions": 0, "calls": 0}

    def count(_module, _args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        seen["positions"] += int(mask[:, -x.shape[1]:].sum()) if mask is not None else x.shape[0] * x.shape[1]
        seen["calls"] += 1

    decoder = getattr(model.hf, model.hf.base_model_prefix)
    handle = decoder.register_forward_pre_hook(count, with_kwargs=True)
    try:
        r = prim()(Q, model=model)
    finally:
        handle.remove()
    u = r.trace.usage
    assert seen["calls"] > 0 and u.generated > 0
    assert u.prefilled + u.latent + u.generated == seen["positions"]


@pytest.mark.parametrize("prim", [
    lambda: small(Review, rounds=2, early_stop=True), lambda: small(Review, "text", rounds=1, early_stop=True),
    lambda: small(Vote, merge_policy="reprefill"), lambda: small(PlanExecute, merge_policy="reprefill"),
])
def test_usage_counts_scoring_and_merging(model, prim):
    """Verdict scoring and re-prefilling merges spend forward passes too: each is a recorded step."""
    test_usage_equals_the_positions_the_model_computed(model, prim)
    actions = {s.action for s in prim()(Q, model=model).trace.steps}
    assert "score" in actions or "merge" in actions


def test_reuse_counted_once_per_agent_and_segment(model):
    r = small(Review, rounds=1, early_stop=False)(Q, model=model)
    seg: dict = {}
    for s in r.state.segments:  # first segment of each (agent, kind)
        seg.setdefault((s.agent, s.kind), s.length)
    reads = [s for s in r.trace.steps if s.action == "read"]
    q = seg[("user", "prompt")]
    solver_first, critic, solver_refine = reads[1], reads[2], reads[3]
    assert solver_first.usage.reused == q
    # the hand-off dropped the solver's role prompt: the critic reuses the question and the solver's thoughts
    assert critic.usage.reused == q + seg[("solver", "latent")]
    # the solver was credited for the question already: only the critic's thoughts are new to it
    assert solver_refine.usage.reused == seg[("critic", "latent")]
    # the solver's own later steps never count its own growing state as reuse
    assert all(s.usage.reused == 0 for s in r.trace.steps if s.action in ("think", "speak") and s.agent == "solver"
               and s.index > solver_refine.index)


def test_review_drops_old_critiques(model):
    r = small(Review, rounds=3, early_stop=False)(Q, model=model)
    critic_segments = [s for s in r.state.segments if s.agent == "critic"]
    assert [s.kind for s in critic_segments] == ["latent"]  # only the latest round's critique, prompt handed off
    assert len([s for s in r.trace.steps if s.agent == "critic" and s.action == "read"]) == 3
    full = small(Review, rounds=3, early_stop=False, handoff="full")(Q, model=model)
    assert [s.kind for s in full.state.segments if s.agent == "critic"] == ["prompt", "latent"]


def test_handoff_keeps_thoughts_and_question_drops_role_prompts(model):
    for prim in (small(Review, rounds=1), small(Vote, n=2), small(PlanExecute, k=2)):
        st = prim(Q, model=model).state
        speaker = st.segments[-2].agent  # the output agent's prompt, then its spoken answer
        kinds = {(s.agent, s.kind) for s in st.segments}
        assert ("user", "prompt") in kinds  # the question prefix stays
        others = {(a, k) for a, k in kinds if a not in ("user", speaker)}
        assert others and all(k == "latent" for _, k in others), (prim.method, others)
        full = type(prim)(**{**prim.params(), "handoff": "full"})(Q, model=model).state
        assert any(s.kind == "prompt" and s.agent not in ("user", speaker) for s in full.segments)
        assert full.length > st.length
    with pytest.raises(BadInputError, match="handoff"):
        Review(handoff="none")


def test_review_early_stop_is_measured(model):
    r = Review(max_new_tokens=4, latent_steps=1, early_stop=True, stop_margin=-1e9)(Q, model=model)  # always agrees
    assert r.meta["review_stopped_at_round"] == 0 and len(r.meta["review_verdict_margins"]) == 1
    r = Review(max_new_tokens=4, latent_steps=1, early_stop=True, stop_margin=1e9)(Q, model=model)  # never agrees
    assert r.meta["review_stopped_at_round"] is None and len(r.meta["review_verdict_margins"]) == 2


@pytest.mark.parametrize("comm", ["kv", "text"])
@pytest.mark.parametrize("margin", [-1e9, 1e9])
def test_review_records_the_answer_of_each_draft_the_critic_read(model, comm, margin):
    """review_drafts: one answer key per critiqued draft (the draft's own words, read as the scorer reads them),
    so a study can tell a refinement that fixed a draft from one that broke it."""
    prim = Review(comm=comm, rounds=2, max_new_tokens=4, early_stop=True, stop_margin=margin)
    speaks = [s.index for s in prim(Q, model=model).trace.steps if s.agent == "solver" and s.action == "speak"]
    drafts = [r"so \boxed{5}", "The answer is 6.", "It is 7."]
    ivs = {"solver": [Intervention("replace", d, steps={i}) for d, i in zip(drafts, speaks)]}
    r = prim(Q, model=model, interventions=ivs)
    read = 1 if margin < 0 else 2  # an agreeing critic stops after the first draft
    assert r.meta["review_drafts"] == ["5", "6"][:read]
    assert r.answer == drafts[read - 1 if margin < 0 else 2]


def test_plan_executors_all_merged(model):
    r = small(PlanExecute, k=3)(Q, model=model)
    ex = [s for s in r.state.segments if s.agent == "executors"]
    assert [s.kind for s in ex] == ["latent"] * 3  # 3 latent blocks (prompts handed off), none thrown away
    integ = next(s for s in r.trace.steps if s.agent == "integrator" and s.action == "read")
    assert {s.id for s in ex} <= set(integ.reads)


def test_composition_carries_question_and_state(model):
    r = Sequence(small(PlanExecute), small(Review, early_stop=False))(Q, model=model)
    agents = [s.agent for s in r.state.segments]
    assert agents.index("planner") < agents.index("critic")
    assert sum(1 for s in r.trace.steps if s.agent == "user") == 1  # question read once, kept in context


def test_bad_input(model):
    with pytest.raises(BadInputError):
        build("debate")
    with pytest.raises(BadInputError):
        Review(rounds=0)
    with pytest.raises(BadInputError):
        Vote(n=1000)
    with pytest.raises(BadInputError):
        Vote(comm="telepathy")
    with pytest.raises(BadInputError):
        build("vote", bogus=1)
    with pytest.raises(BadInputError):
        Single()("   ", model=model)
    with pytest.raises(ContextOverflowError):
        Single(max_new_tokens=4096)("x" * 100, model=model)
    assert parse_method("text:review").comm == "text" and parse_method("single").name == "single"


@pytest.mark.parametrize("margin", [-1e9, 1e9])
def test_non_final_review_leaves_thoughts_for_the_next_primitive(model, margin):
    prim = Review(max_new_tokens=4, latent_steps=2, early_stop=True, stop_margin=margin)
    ctx = open_run(model, Q, method=prim.method)
    out = prim.forward(ctx, Output.start(model), final=False)
    st = out.state
    assert st.segments[-1].kind == "latent" and st.segments[-1].agent == "solver"
    assert st.last_logits is not None and out.answer is None


def test_agents_take_a_skill_memory(model, tmp_path):
    from kvmas.memory.policy import ActionPolicy
    from kvmas.memory.runtime import SkillMemory
    from kvmas.memory.skill import Skill
    from kvmas.memory.store import SkillStore

    store = SkillStore(tmp_path / "skills.sqlite")
    skill, _ = store.add(Skill(scope="math", name="CheckSums", activation="question asks for a sum",
                               activation_terms=["what is"], steps=["add the numbers", "check the total"],
                               termination="total checked", status="active"))
    mem = SkillMemory(store, "math", ActionPolicy(model), judge=False)
    r = small(Review, rounds=1, early_stop=False)(Q, model=model, skills=mem)
    reads = [s for s in r.trace.steps if s.action == "read" and s.agent != "user"]
    assert reads and all(s.meta.get("skill") == skill.id for s in reads)
    assert all(skill.render() in s.text_in for s in reads)
    plain = small(Review, rounds=1, early_stop=False)(Q, model=model)
    assert r.usage.prefilled > plain.usage.prefilled  # the skill text is really in the prompts
    other = small(Review, rounds=1, early_stop=False)("Name a colour.", model=model, skills=mem)
    assert not any(s.meta.get("skill") for s in other.trace.steps)  # activation terms do not match


def test_interventions_target_steps_and_stack_per_agent(model):
    base = small(Review, "text", rounds=1, early_stop=False)(Q, model=model)
    speaks = [s.index for s in base.trace.steps if s.agent == "solver" and s.action == "speak"]
    ivs = {"solver": [Intervention("replace", "first draft X", steps={speaks[0]}),
                      Intervention("replace", "final Y", steps={speaks[1]})]}
    r = small(Review, "text", rounds=1, early_stop=False)(Q, model=model, interventions=ivs)
    outs = [s.text_out for s in r.trace.steps if s.agent == "solver" and s.action == "speak"]
    assert outs == ["first draft X", "final Y"] and r.answer == "final Y"
    critic_in = next(s.text_in for s in r.trace.steps if s.agent == "critic")
    assert "first draft X" in critic_in  # the replaced text is what the critic re-read


def test_echo_detector_flags_copied_role_prompts_only():
    from kvmas.primitives.echo import echoes_role_prompt

    assert echoes_role_prompt(review_mod.CRITIQUE)
    assert echoes_role_prompt("Sure. " + plan_mod.EXECUTE.format(i=3, k=3))
    assert echoes_role_prompt(vote_mod.SELECT.upper())
    assert not echoes_role_prompt("Let's solve the problem step by step: 16 - 3 - 4 = 9, so \\boxed{18}.")
    assert not echoes_role_prompt(None)
