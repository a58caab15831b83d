"""Golden tests of the LatentState algebra against full recomputation on tiny random models."""

import pytest
import torch

from kvmas.agents.realign import Realigner
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError, CacheCorruptError, FingerprintMismatchError
from kvmas.testing import tiny_model

ARCHS = ["llama", "qwen"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


def joint_logits(model, ids):
    with torch.no_grad():
        return model.hf(torch.tensor([ids])).logits[0].float()


def joint_cache(model, ids):
    with torch.no_grad():
        return model.hf(torch.tensor([ids]), use_cache=True).cache


def snapshot(state):
    return [t.clone() for t in (*state.keys, *state.values, state.mask, state.positions, state.next_pos)]


def unchanged(state, snap):
    now = (*state.keys, *state.values, state.mask, state.positions, state.next_pos)
    return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(now, snap))


def test_incremental_prefill_equals_joint(model):
    parts = ["System: be brief.\n", "Q: what is 12+30?\n", "A: let me think", " step by step."]
    state = LatentState.empty(model)
    for i, p in enumerate(parts):
        state = state.extend(p, agent=f"a{i}", role="r")
    ids = sum((model.encode(p) for p in parts), [])
    ref = joint_logits(model, ids)
    assert state.length == len(ids)
    assert torch.equal(state.positions[0], torch.arange(len(ids)))
    assert (state.last_logits[0] - ref[-1]).abs().max() < 1e-4
    cache = joint_cache(model, ids)
    for layer, k in zip(cache.layers, state.keys):
        assert (layer.keys - k).abs().max() < 1e-4
    assert [s.length for s in state.segments] == [len(model.encode(p)) for p in parts]
    assert [s.start for s in state.segments] == [0] + list(torch.tensor([len(model.encode(p)) for p in parts[:-1]]).cumsum(0).tolist())


def test_think_uses_realigned_embedding(model):
    s = LatentState.empty(model).extend("Question: 3+4?", agent="u", role="q")
    t = s.think(3, agent="solver", role="solver")
    assert t.length == s.length + 3
    assert t.positions[0, -3:].tolist() == [s.length, s.length + 1, s.length + 2]
    assert int(t.next_pos[0]) == s.length + 3
    seg = t.segments[-1]
    assert (seg.kind, seg.start, seg.length, seg.token_ids) == ("latent", s.length, 3, None)
    # Recompute by hand: each step feeds realign(last hidden) as an input embedding.
    realign = Realigner.for_model(model, cache=False)
    ids = torch.tensor([model.encode("Question: 3+4?")])
    with torch.no_grad():
        out = model.hf.model(ids, use_cache=True)
        cache, h = out.cache, out.last_hidden_state[:, -1]
        for _ in range(3):
            e = realign(h)[:, None]
            assert torch.allclose(e, t.latent_inputs[seg.id][:, _: _ + 1], atol=1e-5)
            out = model.hf.model(inputs_embeds=e, cache=cache, use_cache=True)
            cache, h = out.cache, out.last_hidden_state[:, -1]
    assert (t.last_hidden - h).abs().max() < 1e-4
    for layer, k in zip(cache.layers, t.keys):
        assert (layer.keys - k).abs().max() < 1e-4
    # the realigned input is not the raw hidden state (the realignment is really applied)
    assert not torch.allclose(t.latent_inputs[seg.id][:, 0], s.last_hidden, atol=1e-3)


def test_tied_embeddings_realign_is_identity():
    r = Realigner.for_model(tiny_model("qwen", tie=True), cache=False)
    assert r.tied and r.identity_error < 1e-2
    assert not Realigner.for_model(tiny_model("qwen"), cache=False).tied


def test_fork_rows_equal_independent_runs(model):
    prefix = LatentState.empty(model).extend("Shared question: name a colour.", agent="u", role="q")
    suffixes = ["A:", "Persona two says:", "B?"]
    rows = prefix.fork(3).extend(suffixes, agent="solvers", role="solver")
    batched = rows.speak(12, agent="solvers", role="solver")
    for i, suf in enumerate(suffixes):
        alone = prefix.extend(suf).speak(12)
        assert batched.token_ids[i] == alone.token_ids[0]
        assert (rows.last_logits[i] - prefix.extend(suf).last_logits[0]).abs().max() < 1e-4
    assert rows.shared_cols == prefix.length


def test_speak_and_extend_never_mutate(model):
    s = LatentState.empty(model).extend("Hello there, agent.")
    snap = snapshot(s)
    ptrs = [k.data_ptr() for k in s.keys]
    s.speak(8)
    s.extend(" more text")
    s.think(2)
    s.fork(2).speak(4, temperature=1.0, seed=3)
    s.score(["abc", "de"])
    assert unchanged(s, snap)
    assert ptrs == [k.data_ptr() for k in s.keys]
    # the speaker's own state is the same object before and after: reading it again gives the same tokens
    assert s.speak(8).token_ids == s.speak(8).token_ids


def test_two_calls_on_one_state_give_what_a_fresh_state_gives(model):
    """Immutability judged by results: after any other use of a state, an operation on it returns exactly what
    the same operation on a freshly built twin returns (a cache grown in place would change the second call)."""
    fresh = lambda: LatentState.empty(model).extend("Hello there, agent.")  # noqa: E731
    s = fresh()
    first = s.extend(" more text")
    spoken = s.speak(6)
    s.think(2)
    s.fork(2).speak(4, temperature=1.0, seed=3)
    s.score(["abc", "de"])
    second = s.extend(" more text")
    twin = fresh().extend(" more text")
    for got in (first, second):
        assert got.length == twin.length and torch.equal(got.positions, twin.positions)
        assert torch.equal(got.last_logits, twin.last_logits)
        assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values, twin.keys + twin.values))
    assert s.speak(6).token_ids == spoken.token_ids == fresh().speak(6).token_ids
    assert torch.equal(s.speak(6).state.last_logits, fresh().speak(6).state.last_logits)


def test_rows_that_stop_early_equal_single_row_speech(model):
    """In a multi-row speak, a row that stops (stop string) stops growing: every row's state equals the state a
    single-row speak of that row builds (attended columns, positions, next position, next-token logits)."""
    prefix = LatentState.empty(model).extend("Shared question: name a colour.", agent="u", role="q")
    suffixes = ["A:", "Persona two says:", "B?"]
    alone_full = [prefix.extend(x).speak(12, min_new_tokens=12) for x in suffixes]
    stop = alone_full[0].text[1:3]  # row 0 stops after a few tokens; the others (usually) run on
    assert stop and not all(stop in a.text[:4] for a in alone_full[1:])
    rows = prefix.fork(3).extend(suffixes)
    batched = rows.speak(12, min_new_tokens=0, stop=[stop])
    lengths = [len(t) for t in batched.token_ids]
    assert min(lengths) < max(lengths)  # rows really finished at different steps
    for i, x in enumerate(suffixes):
        alone = prefix.extend(x).speak(12, stop=[stop])
        assert batched.token_ids[i] == alone.token_ids[0] and batched.texts[i] == alone.text
        row, ref = batched.state.select([i]), alone.state
        assert row.row_lengths() == ref.row_lengths()
        real = row.mask[0].bool()
        assert torch.equal(row.positions[0][real], ref.positions[0][ref.mask[0].bool()])
        assert torch.equal(row.next_pos, ref.next_pos)
        assert (row.last_logits - ref.last_logits).abs().max() < 1e-4
        # and what the row holds is what it said: reading on gives the single-row continuation
        assert (row.extend(" next").last_logits - ref.extend(" next").last_logits).abs().max() < 1e-4


def test_speak_state_holds_exactly_the_text(model):
    s = LatentState.empty(model).extend("Write:")
    sp = s.speak(6)
    ids = model.encode("Write:") + sp.token_ids[0]
    assert sp.state.length == len(ids)
    assert (sp.state.last_logits[0] - joint_logits(model, ids)[-1]).abs().max() < 1e-4


def test_sampling_is_seeded(model):
    s = LatentState.empty(model).extend("Sample:")
    a = s.speak(10, temperature=1.0, seed=7).token_ids
    assert a == s.speak(10, temperature=1.0, seed=7).token_ids
    assert a != s.speak(10, temperature=1.0, seed=8).token_ids


def test_stop_strings_cut_text(model):
    s = LatentState.empty(model).extend("Go:")
    full = s.speak(12, min_new_tokens=12).text
    assert len(full) >= 6
    stop = full[3:5]
    cut = s.speak(12, min_new_tokens=12, stop=[stop]).text
    assert stop not in cut and full.startswith(cut) and len(cut) <= 3 + len(stop)


def test_drop_equals_masking_the_segment_out(model):
    a, b, c = "Context one. ", "Critique to forget. ", "Now answer:"
    s = LatentState.empty(model).extend(a).extend(b, agent="critic", role="critic").extend(c)
    dropped = s.drop(s.segments[1].id).extend(" yes")
    ids = model.encode(a + b + c) if False else model.encode(a) + model.encode(b) + model.encode(c)
    new = model.encode(" yes")
    # reference: the full run, then the new tokens with the critique columns masked out
    cache = joint_cache(model, ids)
    nb = len(model.encode(a))
    mask = torch.ones(1, len(ids) + len(new), dtype=torch.long)
    mask[0, nb: nb + len(model.encode(b))] = 0
    with torch.no_grad():
        ref = model.hf(torch.tensor([new]), cache=cache, attention_mask=mask,
                       position_ids=torch.arange(len(ids), len(ids) + len(new))[None]).logits[0, -1]
    assert (dropped.last_logits[0] - ref).abs().max() < 1e-4
    assert [x.role for x in dropped.segments] == ["user", "user", "user"]
    assert dropped.length == len(ids) - len(model.encode(b)) + len(new)
    # dropping the tail leaves no valid next-token distribution: it must be recomputed, never reused stale
    tail_gone = s.drop(s.segments[-1].id)
    assert tail_gone.last_logits is None and tail_gone.last_hidden is None
    with pytest.raises(BadInputError):
        tail_gone.speak(2)
    # dropping a middle segment keeps the head: the last column is still the one that computed it
    assert torch.equal(s.drop(s.segments[1].id).last_logits, s.last_logits)


def test_select_keeps_the_rows_asked_for_in_that_order(model):
    prefix = LatentState.empty(model).extend("Q:")
    rows = prefix.fork(3).extend(["one", "second row", "3"])
    picked = rows.select([2, 0])
    for got, src in ((0, 2), (1, 0)):
        assert torch.equal(picked.last_logits[got], rows.last_logits[src])
        assert picked.segments[-1].token_ids[got] == rows.segments[-1].token_ids[src]
        ref = prefix.extend(["one", "second row", "3"][src])
        assert (picked.select([got]).extend("!").last_logits - ref.extend("!").last_logits).abs().max() < 1e-4


def test_crop_then_extend_equals_joint(model):
    s = LatentState.empty(model).extend("Keep this part.").extend(" and drop this tail")
    n = len(model.encode("Keep this part."))
    c = s.crop(n).extend(" new")
    ref = joint_logits(model, model.encode("Keep this part.") + model.encode(" new"))
    assert (c.last_logits[0] - ref[-1]).abs().max() < 1e-4
    assert len(c.segments) == 2


def _branches(model):
    prefix = LatentState.empty(model).extend("Question: pick one.\n", agent="u", role="q")
    texts = ["Candidate one says 4.\n", "Two: 5!\n", "Third answer is 9\n"]
    return prefix, texts, prefix.fork(3).extend(texts, agent="solvers", role="solver")


def test_merge_reprefill_is_exact(model):
    prefix, texts, rows = _branches(model)
    merged = rows.merge_rows("reprefill").extend("Selector:")
    ids = model.encode("Question: pick one.\n") + sum((model.encode(t) for t in texts), []) + model.encode("Selector:")
    assert merged.length == len(ids)
    assert (merged.last_logits[0] - joint_logits(model, ids)[-1]).abs().max() < 1e-4


def test_merge_rerotate_exact_at_layer0_and_states_its_error(model):
    prefix, texts, rows = _branches(model)
    merged = rows.merge_rows("rerotate")
    ids = model.encode("Question: pick one.\n") + sum((model.encode(t) for t in texts), [])
    cache = joint_cache(model, ids)
    assert torch.equal(merged.positions[0], torch.arange(len(ids)))
    assert (merged.keys[0] - cache.layers[0].keys).abs().max() < 1e-4  # exact where it claims to be
    deep = (merged.keys[-1] - cache.layers[-1].keys).abs().max().item()
    # Approximate beyond layer 0: later branches never attended to earlier ones. Measured on these tiny
    # random models (init 0.5): ~0.5-3 in key units; real models are far smoother. Asserted > 0 so the test
    # fails if the claim "approximate" ever stops being true (e.g. a silent re-prefill).
    assert deep > 1e-3
    reader = merged.extend("Selector:")
    exact = rows.merge_rows("reprefill").extend("Selector:")
    err = (reader.last_logits - exact.last_logits).abs().max().item()
    # approximate, not exact (> 1e-4), and bounded by what no merge at all gives: the reader's distribution
    # after rerotate is nearer the exact one than the distribution of a reader that saw the prefix only
    alone = prefix.extend("Selector:").last_logits
    assert 1e-4 < err < (alone - exact.last_logits).abs().max().item()


def _by_hand_rotation(model, prefix, texts, policy):
    """Every layer's merged keys and values, rebuilt from each branch's own run: keys rotated by hand (RoPE at
    angle delta * inv_freq, fp32) by the branch's offset under ``policy``, values copied."""
    from kvmas.agents.rope import inv_freq_of

    inv = inv_freq_of(model.hf)
    p, offset = prefix.length, 0
    keys, values = [[k for k in prefix.keys]], [[v for v in prefix.values]]
    for t in texts:
        own = prefix.extend(t)  # the branch run alone on top of the prefix
        delta = offset if policy == "rerotate" else 0
        ks, vs = [], []
        for k, v in zip(own.keys, own.values):
            k = k[:, :, p:].double()
            half = k.shape[-1] // 2
            ang = delta * inv.double()
            cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
            rot = torch.cat([-k[..., half:], k[..., :half]], -1)
            ks.append((k * cos + rot * sin).float())
            vs.append(v[:, :, p:])
        keys.append(ks)
        values.append(vs)
        offset += own.length - p
    n = len(prefix.keys)
    return ([torch.cat([keys[0][li]] + [b[li] for b in keys[1:]], 2) for li in range(n)],
            [torch.cat([values[0][li]] + [b[li] for b in values[1:]], 2) for li in range(n)])


@pytest.mark.parametrize("policy", ["rerotate", "shared"])
def test_merge_every_layer_keys_and_values_equal_each_branch_rotated_by_hand(model, policy):
    prefix, texts, rows = _branches(model)
    merged = rows.merge_rows(policy)
    want_k, want_v = _by_hand_rotation(model, prefix, texts, policy)
    assert len(merged.keys) == len(want_k) == model.fingerprint.num_layers
    for li, (k, v, wk, wv) in enumerate(zip(merged.keys, merged.values, want_k, want_v)):
        assert k.shape == wk.shape and v.shape == wv.shape, li
        assert (k - wk).abs().max() < 1e-4, f"layer {li} keys"
        assert (v - wv).abs().max() < 1e-5, f"layer {li} values"
    # the re-rotation really moved the later branches (a merge that skipped it would not match)
    if policy == "rerotate":
        unrotated, _ = _by_hand_rotation(model, prefix, texts, "shared")
        assert all((k - u).abs().max() > 1e-3 for k, u in zip(merged.keys, unrotated))


def test_shared_merge_reader_continues_after_the_longest_branch(model):
    prefix = LatentState.empty(model).extend("Question: pick one.\n", agent="u", role="q")
    texts = ["4\n", "Third answer is 9, surely\n", "Two: 5!\n"]  # the longest branch is not the first
    merged = prefix.fork(3).extend(texts).merge_rows("shared")
    lens = [len(model.encode(t)) for t in texts]
    assert int(merged.next_pos[0]) == prefix.length + max(lens)
    reader = merged.extend("Pick:")
    assert reader.positions[0, -1].item() == prefix.length + max(lens) + len(model.encode("Pick:")) - 1


def test_merge_shared_positions(model):
    prefix, texts, rows = _branches(model)
    merged = rows.merge_rows("shared")
    p = prefix.length
    lens = [len(model.encode(t)) for t in texts]
    # each branch keeps the positions it was computed at: all start right after the prefix
    starts = [s.start for s in merged.segments[1:]]
    for start, n in zip(starts, lens):
        assert merged.positions[0, start].item() == p
        assert merged.positions[0, start + n - 1].item() == p + n - 1
    assert int(merged.next_pos[0]) == p + max(lens)
    # each branch's KV is exactly its own run's (here: the branch run alone on top of the prefix)
    for (start, n), t in zip(zip(starts, lens), texts):
        alone = prefix.extend(t)
        for k_m, k_a, v_m, v_a in zip(merged.keys, alone.keys, merged.values, alone.values):
            assert (k_m[:, :, start: start + n] - k_a[:, :, p:]).abs().max() < 1e-4
            assert (v_m[:, :, start: start + n] - v_a[:, :, p:]).abs().max() < 1e-5
    # a reader continues from the merge like a hand-built cache with the same columns, positions and mask
    reader = merged.extend("Pick:")
    ids = torch.tensor([model.encode("Pick:")])
    from transformers import DynamicCache
    cache = DynamicCache(list(zip(merged.keys, merged.values)))
    pos = int(merged.next_pos[0]) + torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = model.hf(ids, cache=cache, position_ids=pos,
                       attention_mask=torch.ones(1, merged.length + ids.shape[1], dtype=torch.long)).logits[0, -1]
    assert (reader.last_logits[0] - ref.float()).abs().max() < 1e-4


def test_merge_rejects_bad_policy_and_other_models(model):
    _, _, rows = _branches(model)
    with pytest.raises(BadInputError):
        rows.merge_rows("average")
    other = LatentState.empty(tiny_model("llama", seed=9)).extend("x")
    with pytest.raises(FingerprintMismatchError):
        LatentState.merge([rows.select([0]), other])


def test_score_matches_full_forward(model):
    s = LatentState.empty(model).extend("Answer:")
    conts = [" yes", " no way", "!"]
    got = s.score(conts)
    for c, g in zip(conts, got):
        ids = model.encode("Answer:") + model.encode(c)
        lp = torch.log_softmax(joint_logits(model, ids), -1)
        n = len(model.encode("Answer:"))
        ref = sum(float(lp[n - 1 + j, t]) for j, t in enumerate(model.encode(c)))
        assert abs(g - ref) < 1e-3


def test_save_load_bit_exact_and_refusals(model, tmp_path):
    s = LatentState.empty(model).extend("Persist me.").think(2).extend(" ok")
    path = s.save(tmp_path / "s.safetensors")
    back = LatentState.load(path, model)
    assert unchanged(back, snapshot(s))
    assert torch.equal(back.last_logits, s.last_logits) and back.segments == s.segments
    assert torch.equal(back.latent_inputs[s.segments[1].id], s.latent_inputs[s.segments[1].id])
    with pytest.raises(FingerprintMismatchError):
        LatentState.load(path, tiny_model("llama", seed=5))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(CacheCorruptError):
        LatentState.load(junk, model)
    import safetensors.torch as st
    st.save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CacheCorruptError):
        LatentState.load(tmp_path / "foreign.safetensors", model)


def test_bad_input(model):
    s = LatentState.empty(model)
    with pytest.raises(BadInputError):
        s.extend("")
    with pytest.raises(BadInputError):
        s.speak(4)  # nothing computed yet
    with pytest.raises(BadInputError):
        s.extend("x").speak(0)
    from kvmas.errors import ContextOverflowError
    with pytest.raises(ContextOverflowError):
        s.extend("x" * (model.max_context + 1))


def test_merge_keeps_every_branch_even_when_rows_look_alike(model):
    """Rows of one forked segment share its id; merge must still keep each row's own content."""
    prefix = LatentState.empty(model).extend("Q: pick.\n")
    rows = prefix.fork(3).extend(["Row 1 here", "Row 2 here", "Row 3 here"]).think(1)
    merged = rows.merge_rows("reprefill")
    ids = model.encode("Q: pick.\n") + sum((model.encode(f"Row {i} here") for i in (1, 2, 3)), [])
    assert merged.length == len(ids) + 3
    assert [s.branch for s in merged.segments] == [None, 0, 0, 1, 1, 2, 2]
    for policy in ("shared", "rerotate"):
        m = rows.merge_rows(policy)
        assert m.length == merged.length
        # a dropped forked segment leaves every row's copy
        assert m.drop(m.segments[1].id).length == m.length - 3 * len(model.encode("Row 1 here"))


def test_merge_keeps_latent_inputs_of_the_shared_prefix(model):
    """A prefix with latent steps, merged once, can still be re-prefilled exactly by a later merge."""
    prefix = LatentState.empty(model).extend("Plan:").think(2)
    first = prefix.fork(2).extend(["a", "bb"]).merge_rows("shared")
    assert prefix.segments[1].id in first.latent_inputs
    again = LatentState.merge([first.extend(" x"), first.extend(" yy")], "reprefill")
    assert again.length == first.length + len(model.encode(" x")) + len(model.encode(" yy"))
