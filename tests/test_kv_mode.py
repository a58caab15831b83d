"""comm="kv": agents decode their messages into the shared state and the next agent reads them there.

Golden tests against full recomputation: what a kv reader computes equals what a text reader computes when it is
given the same message tokens at the same positions.
"""

import pytest
import torch

from kvmas.agents.agent import Agent, RunContext
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError
from kvmas.primitives import PlanExecute, Review, Sequence, Single, Vote
from kvmas.primitives import plan as plan_mod
from kvmas.primitives import review as review_mod
from kvmas.primitives import vote as vote_mod
from kvmas.primitives.run import TEAM_SYSTEM, Output
from kvmas.testing import tiny_model

Q = "Tom has 5 apples and eats 2. How many are left?"


@pytest.fixture(scope="module", params=["llama", "qwen"])
def model(request):
    return tiny_model(request.param, seed=1)


def transcript_ids(state: LatentState) -> list[int]:
    """The token ids of a one-row state, segment after segment (every kv segment is text, none latent)."""
    assert state.rows == 1
    ids = []
    for seg in state.segments:
        assert seg.token_ids is not None, f"segment {seg.id} ({seg.kind}) holds no tokens"
        ids += seg.token_ids[0]
    return ids


def recomputed(model, ids):
    with torch.no_grad():
        return model.hf(torch.tensor([ids])).logits[0, -1].float()


def test_the_turn_end_is_what_the_template_writes_after_a_reply(model):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "reply"}]
    assert model.chat_text(msgs, add_generation_prompt=False).endswith("reply" + model.turn_end)
    assert model.turn_end  # both tiny templates close a reply with a marker


@pytest.mark.parametrize("rounds,draft", [(1, "solver"), (2, "solver"), (2, "question")])
def test_kv_review_is_the_chat_transcript_and_its_reader_equals_a_text_reader(model, rounds, draft):
    res = Review(comm="kv", rounds=rounds, max_new_tokens=5, draft=draft)(Q, model=model)
    state = res.state
    ids = transcript_ids(state)
    assert state.length == len(ids) and torch.equal(state.positions[0], torch.arange(len(ids)))
    # the cache holds exactly the conversation a chat transcript of the same messages holds
    assert sum(s.action == "speak" for s in res.trace.steps) == 1 + 2 * rounds
    speeches = [model.decode(s.token_ids[0], skip_special_tokens=False) for s in state.segments
                if s.kind == "generated"]  # as emitted (a tiny random model also emits special tokens)
    assert len(speeches) == 1 + 2 * rounds
    refine = Review().final_instruction(RunContext(model=model, question=Q), review_mod.REFINE)
    turns = [review_mod.SOLVE] + [review_mod.CRITIQUE, refine] * rounds
    msgs = [{"role": "system", "content": TEAM_SYSTEM},
            {"role": "user", "content": f"Problem:\n{Q}"}]
    if draft == "question":  # the draft answers the question as the single agent is asked it
        turns, msgs = [Q] + turns[1:], msgs[:1]
    for instruction, reply in zip(turns, speeches):
        msgs += [{"role": "user", "content": instruction}, {"role": "assistant", "content": reply}]
    want = model.chat_text(msgs, add_generation_prompt=False)
    got = model.decode(ids, skip_special_tokens=False)
    assert want.startswith(got) and want[len(got):] == model.turn_end  # the answer's turn is left open
    # a text reader given these tokens from scratch computes the same next-token distribution
    assert (state.last_logits[0] - recomputed(model, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("comm", ["kv", "text", "latent"])
def test_a_question_draft_is_the_single_agents_answer(model, comm):
    """draft="question": a fresh review's first draft reads the single agent's prompt token for token, so its
    draft is the single agent's answer (kv, text) and, in latent mode, the question stays in the critic's view."""
    single = Single(max_new_tokens=6)(Q, model=model)
    prim = Review(comm=comm, rounds=1, max_new_tokens=6, latent_steps=2, draft="question")
    res = prim(Q, model=model)
    asked = res.trace.steps[0]
    assert asked.agent == "user" and asked.text_in == single.trace.steps[0].text_in
    if comm != "latent":
        draft = next(s for s in res.trace.steps if s.agent == "solver" and s.action == "speak")
        assert draft.text_out == single.answer
        return
    critic_read = next(s for s in res.trace.steps if s.agent == "critic" and s.action == "read")
    assert set(asked.writes) <= set(critic_read.reads)  # the hand-off keeps the question


def test_a_question_draft_after_another_stage_falls_back_to_the_solver_instruction(model):
    """In a pipeline the input already holds a conversation: there is no fresh question to answer as single."""
    res = Sequence(Single(comm="kv", max_new_tokens=3), Review(comm="kv", rounds=1, max_new_tokens=3,
                                                               draft="question"))(Q, model=model)
    solver_reads = [s for s in res.trace.steps if s.agent == "solver" and s.action == "read"]
    assert review_mod.SOLVE in solver_reads[1].text_in
    with pytest.raises(BadInputError, match="draft"):
        Review(draft="answer")


def test_kv_review_prefills_less_than_its_text_twin_for_the_same_work(model):
    kv, text = (Review(comm=c, rounds=2, max_new_tokens=5)(Q, model=model) for c in ("kv", "text"))
    assert kv.trace.usage.prefilled < text.trace.usage.prefilled
    assert kv.trace.usage.latent == 0
    # nothing of another agent is prefilled again: every other reading is reuse
    assert kv.trace.usage.reused > 0 and text.trace.usage.reused == 0


@pytest.mark.parametrize("cls,kw,instruction", [(Vote, {"n": 3}, vote_mod.SELECT),
                                                (Vote, {"n": 3, "candidates": "question"}, vote_mod.SELECT),
                                                (PlanExecute, {"k": 3}, plan_mod.INTEGRATE)])
def test_kv_fan_in_reader_equals_each_branch_run_alone_then_merged(model, cls, kw, instruction):
    """Branches decode as rows of one state (finishing at different steps); the reader on their merge equals a
    reader on the merge of each branch decoded alone (its own run), and answers the same."""
    prim = cls(comm="kv", max_new_tokens=6, **kw)
    res = prim(Q, model=model)
    steps = res.trace.steps
    branch_speech = next(s for s in steps if s.action == "speak" and s.rows > 1)
    texts = branch_speech.text_out.split("\n---\n")
    # rebuild by hand: question once, (a plan), each branch alone on top of it, merged, the reader's turn
    ctx = RunContext(model=model, question=Q, system=TEAM_SYSTEM)
    prefix = prim.shared_prefix(ctx, Output.start(model))
    if cls is PlanExecute:
        plan_ids = next(s for s in steps if s.agent == "planner" and s.action == "speak")
        prefix = Agent("planner").read(ctx, prefix, plan_mod.PLAN)
        prefix = prefix.extend(model.encode(plan_ids.text_out) + model.encode(model.turn_end), kind="generated")
        turns = [plan_mod.EXECUTE.format(i=i + 1, k=kw["k"]) for i in range(kw["k"])]
    elif prim.candidates == "question":  # each candidate answers the single agent's prompt, no persona turn
        prefix, turns = prim.asked(ctx, Output.start(model)), [None] * kw["n"]
    else:
        turns = [f"{p} {vote_mod.SOLVE}" for p in prim._personas()]
    alone = []
    for turn, text in zip(turns, texts):
        row = prefix if turn is None else prefix.extend(Agent("x").turn(ctx, turn, fresh=False))
        sp = row.speak(6)
        assert sp.text == text  # a batch row decodes what the branch decodes alone
        alone.append(sp.state.extend(model.turn_end))
    merged = LatentState.merge(alone, policy="shared")
    reader = merged.extend(Agent("x").turn(ctx, prim.final_instruction(ctx, instruction), fresh=False))
    answer = reader.speak(6)
    assert answer.text == res.answer
    assert (answer.state.last_logits[0] - res.state.last_logits[0]).abs().max() < 1e-4


@pytest.mark.parametrize("comm", ["kv", "text"])
def test_question_candidates_are_the_single_agents_answer(model, comm):
    """candidates="question": each candidate reads the single agent's prompt token for token (greedy: each is
    the single agent's answer); after another stage the personas answer; latent mode is refused."""
    single = Single(max_new_tokens=6)(Q, model=model)
    res = Vote(comm=comm, n=3, max_new_tokens=6, candidates="question")(Q, model=model)
    asked = res.trace.steps[0]
    assert asked.agent == "user" and asked.text_in == single.trace.steps[0].text_in
    cands = next(s for s in res.trace.steps if s.agent == "solvers" and s.action == "speak").text_out
    assert cands.split("\n---\n") == [single.answer] * 3
    assert not any(s.agent == "solvers" and s.action == "read" for s in res.trace.steps)  # no persona turn
    later = Sequence(Single(comm=comm, max_new_tokens=3), Vote(comm=comm, n=2, max_new_tokens=3,
                                                               candidates="question"))(Q, model=model)
    reads = [s for s in later.trace.steps if s.agent == "solvers" and s.action == "read"]
    assert reads and vote_mod.SOLVE in reads[0].text_in
    with pytest.raises(BadInputError, match="kv' or 'text"):
        Vote(candidates="question")
    with pytest.raises(BadInputError, match="candidates"):
        Vote(comm="kv", candidates="everyone")


def test_kv_vote_majority_answers_with_the_majority_candidate(model):
    """Answer-level majority over the decoded candidates: rigged by answer keys that agree (two of three)."""
    keys = iter(["7", "7", "3"])
    res = Vote(comm="kv", n=3, max_new_tokens=6, aggregate="majority", answer_key=lambda t: next(keys))(Q, model=model)
    assert res.meta["vote_candidates"] == ["7", "7", "3"] and res.meta["vote_majority"] == "7"
    cands = next(s for s in res.trace.steps if s.action == "speak").text_out.split("\n---\n")
    assert res.answer == cands[0]
    assert not any(s.agent == "selector" for s in res.trace.steps)  # no selector needed


def test_kv_sequence_hands_the_decoded_answer_to_the_next_primitive_in_the_cache(model):
    seq = Sequence(PlanExecute(comm="kv", k=2, max_new_tokens=4), Review(comm="kv", rounds=1, max_new_tokens=4))
    res = seq(Q, model=model)
    assert [s.agent for s in res.trace.steps].count("user") == 1  # the question is prefilled once
    integrated = next(s for s in res.trace.steps if s.agent == "integrator" and s.action == "speak")
    assert integrated.usage.prefilled == len(model.encode(model.turn_end))  # its turn closed in the cache
    # the review's solver reads on top of the integrator's reply: its read step reuses those columns
    solver_read = next(s for s in res.trace.steps if s.agent == "solver" and s.action == "read")
    assert set(integrated.writes) <= set(solver_read.reads)
    assert model.decode(transcript_ids(res.state), skip_special_tokens=False).count(integrated.text_out) >= 1


@pytest.mark.parametrize("comm", ["kv", "text"])
def test_vote_likelihood_chooses_the_candidate_answer_the_selector_scores_highest(model, comm):
    """aggregate="likelihood": the selector reads the candidates and scores each distinct answer; the vote's
    answer is the first candidate with the best one. Golden in kv mode: the scores equal a reader's on the merge
    of each branch decoded alone."""
    keys = ["7", "3", "7"]
    picks = iter(keys)
    prim = Vote(comm=comm, n=3, max_new_tokens=6, aggregate="likelihood", answer_key=lambda t: next(picks))
    res = prim(Q, model=model)
    facts = res.meta
    scores = facts["vote_likelihoods"]
    assert facts["vote_candidates"] == keys and len(scores) == 2  # "7" and "3", in first-seen order
    assert facts["vote_choice"] == ("7" if scores[0] >= scores[1] else "3")
    cands = next(s for s in res.trace.steps if s.action == "speak").text_out.split("\n---\n")
    assert res.answer == cands[keys.index(facts["vote_choice"])]
    selector = [s.action for s in res.trace.steps if s.agent == "selector"]
    assert "score" in selector and "speak" not in selector  # a constrained choice, nothing decoded
    if comm != "kv":
        return
    ctx = RunContext(model=model, question=Q, system=TEAM_SYSTEM)
    prefix = prim.shared_prefix(ctx, Output.start(model))
    alone = [prefix.extend(Agent("x").turn(ctx, f"{p} {vote_mod.SOLVE}", fresh=False))
             for p in prim._personas()]
    alone = [row.speak(6).state.extend(model.turn_end) for row in alone]
    reader = LatentState.merge(alone, policy="shared").extend(
        Agent("x").turn(ctx, prim.final_instruction(ctx, vote_mod.SELECT), fresh=False))
    expected = reader.score([vote_mod.ANSWER_FORM.format(k) for k in ("7", "3")])
    assert scores == pytest.approx(expected, abs=1e-3)


def test_vote_likelihood_with_one_distinct_answer_needs_no_selector(model):
    picks = iter(["7", None, "7"])
    res = Vote(comm="kv", n=3, max_new_tokens=6, aggregate="likelihood", answer_key=lambda t: next(picks))(
        Q, model=model)
    assert res.meta["vote_choice"] == "7" and "vote_likelihoods" not in res.meta
    assert not any(s.agent == "selector" for s in res.trace.steps)
