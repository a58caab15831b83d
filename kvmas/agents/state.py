"""LatentState: the value every agent reads and writes — a KV cache with positions and provenance.

A state is immutable to its holders: every operation returns a new state, and a transformers
``DynamicCache`` is only materialised inside a call (its ``update`` concatenates into new tensors, so the
tensors a state holds are never grown in place). Layout::

    keys/values  per layer [rows, kv_heads, columns, head_dim]   (keys post-RoPE)
    mask         [rows, columns]  1 = real position, 0 = padding (never attended)
    positions    [rows, columns]  the RoPE position each column was computed at
    next_pos     [rows]           position the next token of each row gets
    segments     provenance: which agent/role/kind wrote which columns

>>> from kvmas.testing import tiny_model
>>> from kvmas.agents.state import LatentState
>>> s = LatentState.empty(tiny_model()).extend("Q: 2+3?", agent="user", role="question")
>>> t = s.think(2, agent="solver", role="solver")
>>> (s.length, t.length, [seg.kind for seg in t.segments])
(7, 9, ['prompt', 'latent'])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict

from kvmas.agents.engine import Request
from kvmas.agents.realign import Realigner
from kvmas.agents.rope import inv_freq_of, rotate_keys
from kvmas.agents.state_file import read_state, write_state
from kvmas.errors import BadInputError

MergePolicy = Literal["shared", "rerotate", "reprefill"]
MERGE_POLICIES = ("shared", "rerotate", "reprefill")


class Segment(BaseModel):
    """A span of columns written by one agent call. ``token_ids``/``text`` are per row (None for latent)."""

    model_config = ConfigDict(frozen=True)

    id: int
    agent: str
    role: str
    kind: Literal["prompt", "latent", "generated", "text"]
    start: int  # first column
    length: int  # number of columns
    rows: int = 1
    token_ids: list[list[int]] | None = None
    text: list[str] | None = None
    branch: int | None = None  # after a merge: which parallel branch (row) this span came from


class _Ids:
    """Segment-id counter shared by all states derived from one ``empty()`` (deterministic per run)."""

    def __init__(self, start: int = 0):
        self.value = start

    def take(self) -> int:
        self.value += 1
        return self.value - 1


@dataclass(frozen=True)
class Speech:
    """What ``speak`` returns: decoded text and token ids per row, and the state including them.

    ``prefilled``: positions the backend computed for this speech that no read step counted (0 here: a local
    prompt is prefilled when it is read; a remote endpoint's ``usage.prompt_tokens``, see
    :mod:`kvmas.agents.remote`)."""

    texts: list[str]
    token_ids: list[list[int]]
    state: "LatentState"
    prefilled: int = 0

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass(frozen=True)
class LatentState:
    model: object  # kvmas.agents.model.Model
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask: torch.Tensor
    positions: torch.Tensor
    next_pos: torch.Tensor
    segments: tuple[Segment, ...]
    last_hidden: torch.Tensor | None = None  # [rows, d], post-norm hidden of each row's last real position
    last_logits: torch.Tensor | None = None  # [rows, vocab]
    shared_cols: int = 0  # leading columns identical in every row (a forked prefix); counted once as reused
    latent_inputs: dict = field(default_factory=dict)  # segment id -> [rows, n, d] input embeddings
    ids: _Ids = field(default_factory=_Ids, repr=False, compare=False)

    def __repr__(self) -> str:
        """Short: shape and provenance, never the tensors.

        >>> from kvmas.testing import tiny_model
        >>> LatentState.empty(tiny_model()).extend("hi", agent="user", role="question")
        LatentState(model='tiny-llama-s0', rows=1, length=2, segments=[#0 user/prompt:2])
        """
        segs = ", ".join(f"#{s.id} {s.agent}/{s.kind}:{s.length}" for s in self.segments[:8])
        more = f", … {len(self.segments) - 8} more" if len(self.segments) > 8 else ""
        name = getattr(self.model, "name", "?")
        return f"LatentState(model={name!r}, rows={self.rows}, length={self.length}, segments=[{segs}{more}])"

    # ------------------------------------------------------------------ construction / views
    @classmethod
    def empty(cls, model, rows: int = 1) -> "LatentState":
        if getattr(model, "remote", False):  # served elsewhere, no KV here: its states are its own
            return model.empty_state(rows)
        fp = model.fingerprint
        dev = model.device
        kv = torch.zeros(rows, fp.num_kv_heads, 0, fp.head_dim, dtype=model.dtype, device=dev)
        n = fp.num_layers
        return cls(
            model=model, keys=(kv,) * n, values=(kv,) * n,
            mask=torch.zeros(rows, 0, dtype=torch.long, device=dev),
            positions=torch.zeros(rows, 0, dtype=torch.long, device=dev),
            next_pos=torch.zeros(rows, dtype=torch.long, device=dev), segments=(),
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        """Columns (including padding)."""
        return self.mask.shape[1]

    def row_lengths(self) -> list[int]:
        return [int(x) for x in self.mask.sum(1)]

    def segment(self, seg_id: int) -> Segment:
        for s in self.segments:
            if s.id == seg_id:
                return s
        raise BadInputError(f"no segment {seg_id} in this state (have {[s.id for s in self.segments]})")

    def segment_ids(self) -> list[int]:
        return [s.id for s in self.segments]

    def _with(self, **kw) -> "LatentState":
        return replace(self, **kw)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.hf.get_output_embeddings()(hidden).float()

    def _settled(self) -> "LatentState":
        """This state with its KV in memory of its own: a decode loop's states are views of the engine's batch
        buffer, which a state kept after the loop would otherwise hold (every row of it) for as long as it
        lives."""
        def own(t: torch.Tensor) -> torch.Tensor:
            whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            return t if whole else t.clone(memory_format=torch.contiguous_format)
        return self._with(keys=tuple(own(t) for t in self.keys), values=tuple(own(t) for t in self.values))

    # ------------------------------------------------------------------ the one forward helper
    @torch.no_grad()
    def _forward(self, new_mask: torch.Tensor, ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None):
        """Run new columns (left-padded per row by ``new_mask``) on top of this state; returns the pieces."""
        rows, n = new_mask.shape
        self.model.check_fits(int(self.next_pos.max()) + n if rows else n, "state + new tokens")
        offsets = (new_mask.cumsum(1) - 1).clamp_min(0)
        pos = self.next_pos[:, None] + offsets
        full_mask = torch.cat([self.mask, new_mask], dim=1)
        out = self.model.engine.forward(Request(self.keys, self.values, full_mask, pos, ids=ids, embeds=embeds))
        last_h, last_logits = out.hidden[:, -1], out.last_logits  # the engine applies the head, batched
        if self.last_hidden is not None:  # rows that got no new column keep their head
            has_new = (new_mask.sum(1) > 0)[:, None]
            last_h = torch.where(has_new, last_h, self.last_hidden)
            last_logits = torch.where(has_new, last_logits, self.last_logits)
        new_next = self.next_pos + new_mask.sum(1)
        return dict(keys=out.out_keys, values=out.out_values, mask=full_mask,
                    positions=torch.cat([self.positions, pos], 1), next_pos=new_next, last_hidden=last_h,
                    last_logits=last_logits)

    # ------------------------------------------------------------------ algebra
    def _ids_per_row(self, content) -> list[list[int]]:
        if isinstance(content, str):
            rows = [self.model.encode(content)] * self.rows
        elif content and isinstance(content[0], str):
            if len(content) != self.rows:
                raise BadInputError(f"{len(content)} texts for a state with {self.rows} rows")
            rows = [self.model.encode(t) for t in content]
        elif content and isinstance(content[0], int):
            rows = [list(content)] * self.rows
        else:
            rows = [list(r) for r in content]
            if len(rows) != self.rows:
                raise BadInputError(f"{len(rows)} id lists for a state with {self.rows} rows")
        if not any(rows):
            raise BadInputError("nothing to extend with (empty text)")
        return rows

    def extend(self, content, *, agent: str = "user", role: str = "user",
               kind: Literal["prompt", "generated", "text"] = "prompt") -> "LatentState":
        """Prefill text or token ids on top of the state (exact: positions continue per row).

        ``content``: one text/id list for every row, or a list with one per row (left-padded to align).
        """
        per_row = self._ids_per_row(content)
        n = max(len(r) for r in per_row)
        pad = self.model.tokenizer.pad_token_id or 0
        ids = torch.full((self.rows, n), pad, dtype=torch.long)
        new_mask = torch.zeros(self.rows, n, dtype=torch.long)
        for i, r in enumerate(per_row):
            if r:
                ids[i, n - len(r):] = torch.tensor(r)
                new_mask[i, n - len(r):] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)  # built on the host, moved once
        parts = self._forward(new_mask, ids=ids)
        same = all(r == per_row[0] for r in per_row)
        seg = Segment(id=self.ids.take(), agent=agent, role=role, kind=kind, start=self.length, length=n,
                      rows=self.rows, token_ids=per_row,
                      text=[self.model.decode(r, skip_special_tokens=False) for r in per_row])
        shared = self.shared_cols + n if (same and self.shared_cols == self.length) else self.shared_cols
        return self._with(**parts, segments=self.segments + (seg,), shared_cols=shared)

    def think(self, steps: int, *, agent: str = "agent", role: str = "agent") -> "LatentState":
        """``steps`` latent steps: last hidden state -> realigned input embedding -> one new position."""

        if steps < 0:
            raise BadInputError(f"latent steps must be >= 0, got {steps}")
        if steps == 0:
            return self
        if self.last_hidden is None:
            raise BadInputError("think needs a state that ends in a computed position (extend it first)")
        realign = Realigner.for_model(self.model)
        state, inputs = self, []
        for _ in range(steps):
            emb = realign(state.last_hidden)[:, None, :]
            inputs.append(emb)
            parts = state._forward(torch.ones(self.rows, 1, dtype=torch.long, device=self.device), embeds=emb)
            state = state._with(**parts)
        seg = Segment(id=self.ids.take(), agent=agent, role=role, kind="latent", start=self.length,
                      length=steps, rows=self.rows)
        latent_inputs = dict(self.latent_inputs)
        latent_inputs[seg.id] = torch.cat(inputs, dim=1)
        return state._with(segments=self.segments + (seg,), latent_inputs=latent_inputs)._settled()

    def next_logprobs(self) -> torch.Tensor:
        if self.last_logits is None:
            raise BadInputError("no next-token distribution: the state does not end in a computed position")
        return torch.log_softmax(self.last_logits.float(), dim=-1)

    @torch.no_grad()
    def speak(self, max_new_tokens: int = 256, *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
              stop: Sequence[str] = (), agent: str = "agent", role: str = "agent",
              min_new_tokens: int = 0, on_token: Callable[[int, int], None] | None = None) -> Speech:
        """Decode text from every row (greedy, or sampled with ``seed``); the state itself is never changed.

        Stops per row at EOS, at any ``stop`` string (cut from the text), or after ``max_new_tokens``.
        ``on_token(row, token_id)`` is called for every token a row emits, as it is emitted.
        """
        if max_new_tokens <= 0:
            raise BadInputError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        if self.last_logits is None:
            raise BadInputError("speak needs a state that ends in a computed position (extend it first)")
        self.model.check_fits(int(self.next_pos.max()) + max_new_tokens, "state + max_new_tokens")
        eos = set(self.model.eos_ids)
        gen = torch.Generator().manual_seed(seed)
        rows = self.rows
        done = torch.zeros(rows, dtype=torch.bool)
        out: list[list[int]] = [[] for _ in range(rows)]
        texts = [""] * rows
        # Finished rows leave the decode: ``live`` holds the rows still fed (their original indices, in order)
        # and ``state`` only those rows, so every tick is one continuation of the engine's batch buffer; a
        # finished row is parked and laid back in place after the loop, as if it had been fed masked padding.
        # Sampling still draws over every row (finished rows keep their last logits): the same draws as one
        # tick over all rows.
        live, state, head = list(range(rows)), self, self.last_logits.float()
        parked: dict[int, tuple[LatentState, int]] = {}
        fed = [0] * rows
        for t in range(max_new_tokens):
            logits = head
            if t < min_new_tokens and eos:
                logits = logits.clone()
                logits[:, sorted(eos)] = float("-inf")
            nxt = _sample(logits.cpu(), temperature, top_p, gen)  # on the host: the same draws on every device
            for i in live:
                tok = int(nxt[i])
                if tok in eos:
                    done[i] = True
                    continue
                out[i].append(tok)
                if on_token is not None:
                    on_token(i, tok)
                if stop:
                    text = self.model.decode(out[i])
                    hit = min((text.find(s) for s in stop if s in text), default=-1)
                    if hit >= 0:
                        texts[i] = text[:hit]
                        done[i] = True
                        continue
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            keep = [j for j, i in enumerate(live) if not done[i]]
            if len(keep) < len(live):
                for j, i in enumerate(live):
                    if done[i]:
                        parked[i] = (state._rows([j]), 0)
                state, live = state._rows(keep), [live[j] for j in keep]
            feed = nxt[live][:, None].to(self.device)
            state = state._with(**state._forward(torch.ones_like(feed), ids=feed))
            for i in live:
                fed[i] += 1
            head = head.index_copy(0, torch.tensor(live, device=head.device), state.last_logits.float())
        for j, i in enumerate(live):
            parked[i] = (state, j)
        state = self._laid_back([parked[i] for i in range(rows)], self.length + max(fed))
        for i in range(rows):
            if not texts[i]:
                texts[i] = self.model.decode(out[i])
                for s in stop:
                    if s in texts[i]:
                        texts[i] = texts[i][: texts[i].find(s)]
        # The state after speaking holds every emitted token: the loop fed back all but the last sampled token
        # of rows that hit the budget or a stop string; feed those too, so a reader sees exactly the text.
        tail = [out[i][fed[i]:] for i in range(rows)]
        if any(tail):
            state = state.extend(tail, agent=agent, role=role, kind="generated")
        total = state.length - self.length
        seg = Segment(id=self.ids.take(), agent=agent, role=role, kind="generated", start=self.length,
                      length=total, rows=rows, token_ids=out, text=texts)
        if total:
            state = state._with(segments=self.segments + (seg,))
        return Speech(texts=texts, token_ids=out, state=state._settled())

    def _rows(self, rows: list[int]) -> "LatentState":
        """The given rows with every column kept (the decode loop's live rows; segments are not updated)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
        return self._with(keys=tuple(pick(t) for t in self.keys), values=tuple(pick(t) for t in self.values),
                          mask=pick(self.mask), positions=pick(self.positions), next_pos=pick(self.next_pos),
                          last_hidden=pick(self.last_hidden), last_logits=pick(self.last_logits))

    def _laid_back(self, sources: list[tuple["LatentState", int]], length: int) -> "LatentState":
        """This state's rows grown to ``length`` columns, row i taken from row ``j`` of ``sources[i] = (s, j)``
        (a row of ``s`` extends this state's row i); the columns a row lacks are padding: masked, zero KV,
        at the row's next position. With one source holding every row in order, that source itself."""
        first = sources[0][0]
        if all(s is first and j == i for i, (s, j) in enumerate(sources)) and first.rows == len(sources) \
                and first.length == length:
            return first
        rows = len(sources)
        keys = [t.new_zeros((rows, t.shape[1], length, t.shape[3])) for t in first.keys]
        values = [t.new_zeros((rows, t.shape[1], length, t.shape[3])) for t in first.values]
        mask = first.mask.new_zeros((rows, length))
        next_pos = torch.stack([s.next_pos[j] for s, j in sources])
        positions = next_pos[:, None].repeat(1, length)
        for i, (s, j) in enumerate(sources):
            n = s.length
            for dst, src in zip(keys + values, s.keys + s.values):
                dst[i, :, :n] = src[j]
            mask[i, :n] = s.mask[j]
            positions[i, :n] = s.positions[j]
        return self._with(keys=tuple(keys), values=tuple(values), mask=mask, positions=positions,
                          next_pos=next_pos, last_hidden=torch.stack([s.last_hidden[j] for s, j in sources]),
                          last_logits=torch.stack([s.last_logits[j] for s, j in sources]))

    def fork(self, k: int) -> "LatentState":
        """k batch rows per row sharing the prefix (row i of the result came from row i // k)."""
        if k < 1:
            raise BadInputError(f"fork needs k >= 1, got {k}")
        rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731
        return self._with(
            keys=tuple(rep(t) for t in self.keys), values=tuple(rep(t) for t in self.values),
            mask=rep(self.mask), positions=rep(self.positions), next_pos=rep(self.next_pos),
            last_hidden=None if self.last_hidden is None else rep(self.last_hidden),
            last_logits=None if self.last_logits is None else rep(self.last_logits),
            segments=tuple(s.model_copy(update=_seg_rows_repeat(s, k)) for s in self.segments),
            latent_inputs={i: rep(t) for i, t in self.latent_inputs.items()},
            shared_cols=self.length if self.rows == 1 else self.shared_cols,
        )

    def select(self, rows: Sequence[int]) -> "LatentState":
        """Keep the given rows (in that order); padding columns no row needs are removed."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.rows:
            raise BadInputError(f"rows {list(rows)} out of range for a state with {self.rows} rows")
        pick = lambda t: t.index_select(0, idx)  # noqa: E731
        state = self._with(
            keys=tuple(pick(t) for t in self.keys), values=tuple(pick(t) for t in self.values),
            mask=pick(self.mask), positions=pick(self.positions), next_pos=pick(self.next_pos),
            last_hidden=None if self.last_hidden is None else pick(self.last_hidden),
            last_logits=None if self.last_logits is None else pick(self.last_logits),
            segments=tuple(s.model_copy(update=_seg_rows_select(s, list(rows))) for s in self.segments),
            latent_inputs={i: pick(t) for i, t in self.latent_inputs.items()},
        )
        return state._compact()

    def crop(self, n: int) -> "LatentState":
        """Keep the first ``n`` columns (segments cut at the boundary are cut too); ends the state's head."""
        if not 0 <= n <= self.length:
            raise BadInputError(f"crop({n}) outside 0..{self.length}")
        keep = torch.arange(n, device=self.device)
        return self._keep_columns(keep, trim_tokens=True)

    def drop(self, seg_id: int) -> "LatentState":
        """Remove a segment's columns. Later columns keep their positions and what they already absorbed;
        future tokens no longer attend to the dropped span (equal to masking it out; golden-tested)."""
        spans = [s for s in self.segments if s.id == seg_id] or [self.segment(seg_id)]
        gone = {c for sp in spans for c in range(sp.start, sp.start + sp.length)}
        keep = torch.tensor([c for c in range(self.length) if c not in gone], dtype=torch.long, device=self.device)
        state = self._keep_columns(keep, dropped=seg_id)
        # the head (last hidden/logits) stays valid only if the dropped span was not the tail
        if self.length - 1 in gone:
            state = state._with(last_hidden=None, last_logits=None)
        else:
            state = state._with(last_hidden=self.last_hidden, last_logits=self.last_logits)
        return state

    def _keep_columns(self, keep: torch.Tensor, dropped: int | None = None, trim_tokens: bool = False) -> "LatentState":
        col_map = {int(c): i for i, c in enumerate(keep)}
        segs = []
        for s in self.segments:
            if s.id == dropped:
                continue
            kept = [col_map[c] for c in range(s.start, s.start + s.length) if c in col_map]
            if not kept:
                continue
            upd = {"start": kept[0], "length": len(kept)}
            if trim_tokens and s.token_ids is not None and len(kept) < s.length:
                upd["token_ids"] = [r[: max(0, len(r) - (s.length - len(kept)))] for r in s.token_ids]
            segs.append(s.model_copy(update=upd))
        sel = lambda t: t.index_select(-2 if t.dim() == 4 else 1, keep)  # noqa: E731
        next_pos = self.next_pos if dropped is not None else (
            torch.where(self.mask.index_select(1, keep).bool(), self.positions.index_select(1, keep) + 1,
                        torch.zeros_like(self.positions.index_select(1, keep))).max(1).values
            if keep.numel() else torch.zeros_like(self.next_pos))
        latent = {i: t for i, t in self.latent_inputs.items() if any(s.id == i for s in segs)}
        return self._with(
            keys=tuple(sel(t) for t in self.keys), values=tuple(sel(t) for t in self.values),
            mask=self.mask.index_select(1, keep), positions=self.positions.index_select(1, keep),
            next_pos=next_pos, last_hidden=None, last_logits=None, segments=tuple(segs),
            shared_cols=min(self.shared_cols, int((keep < self.shared_cols).sum())), latent_inputs=latent,
        )

    def _compact(self) -> "LatentState":
        """Remove columns that are padding in every row."""
        used = self.mask.sum(0) > 0
        if bool(used.all()):
            return self
        keep = used.nonzero().flatten()
        state = self._keep_columns(keep, dropped=-1)
        return state._with(last_hidden=self.last_hidden, last_logits=self.last_logits, next_pos=self.next_pos)

    # ------------------------------------------------------------------ merge
    def merge_rows(self, policy: MergePolicy = "shared") -> "LatentState":
        """Place this state's rows (parallel branches of one shared prefix) side by side in one row."""
        return LatentState.merge([self.select([i]) for i in range(self.rows)], policy)

    @classmethod
    def merge(cls, states: Sequence["LatentState"], policy: MergePolicy = "shared") -> "LatentState":
        """Put single-row branches that share a prefix into one row, for a reader.

        Branches were computed separately, so their concatenation is not a joint run. ``policy``:
        - ``shared``: every branch keeps the positions it was computed at (all start right after the prefix,
          none is "closer" to the reader); each branch's KV is exactly its own run's. The reader continues at
          the largest next position.
        - ``rerotate``: branches laid out one after another; keys re-rotated (fp32, from inv_freq) to their new
          positions. Layer-0 keys equal a joint run exactly; deeper layers lack cross-branch attention.
        - ``reprefill``: exact: each branch's tokens (and latent input embeddings) recomputed in sequence on
          top of the prefix. Costs a prefill of all branch tokens.
        """
        if policy not in MERGE_POLICIES:
            raise BadInputError(f"unknown merge policy {policy!r} (one of {', '.join(MERGE_POLICIES)})")
        if not states:
            raise BadInputError("merge needs at least one state")
        model = states[0].model
        for s in states:
            model.fingerprint.check(s.model.fingerprint)
            if s.rows != 1:
                raise BadInputError("merge takes single-row states; use merge_rows() for a multi-row state")
        states = [s._strip_padding() for s in states]
        shared = _merge_prefix(states)
        dev = model.device
        base = states[0]._keep_columns(torch.arange(shared, device=dev), dropped=-1)
        base = base._with(next_pos=base.positions[:, -1] + 1 if shared else torch.zeros(1, dtype=torch.long,
                                                                                            device=dev))
        if policy == "reprefill":
            state = base
            for b, s in enumerate(states):
                for seg in s.segments:
                    if seg.start < shared:
                        continue
                    if seg.kind == "latent":
                        emb = s.latent_inputs[seg.id]
                        parts = state._forward(torch.ones(1, seg.length, dtype=torch.long, device=dev), embeds=emb)
                        li = dict(state.latent_inputs)
                        li[seg.id] = emb
                        state = state._with(**parts, latent_inputs=li)
                    else:
                        ids = torch.tensor([seg.token_ids[0]], device=dev)
                        parts = state._forward(torch.ones_like(ids), ids=ids)
                        state = state._with(**parts)
                    state = state._with(segments=state.segments + (seg.model_copy(
                        update={"start": state.length - seg.length, "branch": b}),))
            return state._with(last_hidden=None, last_logits=None, shared_cols=state.length)
        inv = None
        keys = [[k[:, :, :shared]] for k in base.keys]
        values = [[v[:, :, :shared]] for v in base.values]
        positions, segs, latent = [base.positions], list(base.segments), dict(base.latent_inputs)
        col, offset, next_pos = shared, 0, int(base.next_pos[0])
        for b, s in enumerate(states):
            n = s.length - shared
            if n <= 0:
                continue
            delta = 0
            if policy == "rerotate":
                delta = offset
                if inv is None:
                    inv = inv_freq_of(model.hf)
            for li, (k, v) in enumerate(zip(s.keys, s.values)):
                kk = k[:, :, shared:]
                if delta:
                    kk = rotate_keys(kk, torch.tensor([delta], device=dev), inv)
                keys[li].append(kk)
                values[li].append(v[:, :, shared:])
            positions.append(s.positions[:, shared:] + delta)
            for seg in s.segments:
                if seg.start >= shared:
                    segs.append(seg.model_copy(update={"start": seg.start - shared + col, "branch": b}))
                    if seg.id in s.latent_inputs:
                        latent[seg.id] = s.latent_inputs[seg.id]
            col += n
            offset += n
            next_pos = max(next_pos, int(s.next_pos[0]) + delta)
        pos = torch.cat(positions, 1)
        return base._with(
            keys=tuple(torch.cat(k, 2) for k in keys), values=tuple(torch.cat(v, 2) for v in values),
            mask=torch.ones_like(pos), positions=pos, next_pos=torch.tensor([next_pos], device=dev),
            segments=tuple(segs), last_hidden=None, last_logits=None, shared_cols=col, latent_inputs=latent,
        )

    @classmethod
    def merge_cost(cls, states: Sequence["LatentState"], policy: MergePolicy) -> int:
        """Positions :meth:`merge` runs through the model: every branch position past the shared prefix for
        ``reprefill``, none for the other policies."""
        if policy != "reprefill":
            return 0
        states = [s._strip_padding() for s in states]
        shared = _merge_prefix(states)
        return sum(max(0, s.length - shared) for s in states)

    def _strip_padding(self) -> "LatentState":
        keep = self.mask[0].nonzero().flatten()
        if keep.numel() == self.length:
            return self
        st = self._keep_columns(keep, dropped=-1)
        st = st._with(shared_cols=int((keep < self.shared_cols).sum()))
        return st._with(last_hidden=self.last_hidden, last_logits=self.last_logits, next_pos=self.next_pos)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, continuations: Sequence[str | Sequence[int]], *, mean: bool = False,
              batch: int = 16) -> list[float]:
        """Log-probability of each continuation after this (single-row) state; the state's KV is reused."""
        if self.rows != 1:
            raise BadInputError("score needs a single-row state")
        lp0 = self.next_logprobs()[0]
        conts = [self.model.encode(c) if isinstance(c, str) else list(c) for c in continuations]
        if any(not c for c in conts):
            raise BadInputError("empty continuation")
        scores: list[float] = []
        pad = self.model.tokenizer.pad_token_id or 0
        for b in range(0, len(conts), batch):
            chunk = conts[b: b + batch]
            n = max(len(c) for c in chunk) - 1
            total = [float(lp0[c[0]]) for c in chunk]
            if n > 0:
                ids = torch.full((len(chunk), n), pad, dtype=torch.long)
                m = torch.zeros(len(chunk), n, dtype=torch.long)
                for i, c in enumerate(chunk):
                    ids[i, : len(c) - 1] = torch.tensor(c[:-1])
                    m[i, : len(c) - 1] = 1
                ids, m = ids.to(self.device), m.to(self.device)
                # right padding here: pad columns come after every real token, so no real token sees them
                base = self.fork(len(chunk))
                offsets = torch.arange(n, device=self.device)[None].expand(len(chunk), n)
                pos = base.next_pos[:, None] + offsets
                out = self.model.engine.forward(Request(base.keys, base.values, torch.cat([base.mask, m], 1), pos,
                                                        ids=ids))
                lps = torch.log_softmax(self._head(out.hidden), -1)
                for i, c in enumerate(chunk):
                    for j in range(1, len(c)):
                        total[i] += float(lps[i, j - 1, c[j]])
            scores.extend(t / len(c) if mean else t for t, c in zip(total, chunk))
        return scores

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the state as safetensors with checksummed JSON metadata (:mod:`kvmas.agents.state_file`)."""
        tensors = {"mask": self.mask, "positions": self.positions, "next_pos": self.next_pos}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"layers.{i}.keys"] = k
            tensors[f"layers.{i}.values"] = v
        if self.last_hidden is not None:
            tensors["last_hidden"] = self.last_hidden
            tensors["last_logits"] = self.last_logits
        for sid, t in self.latent_inputs.items():
            tensors[f"latent_inputs.{sid}"] = t
        return write_state(path, tensors, self.model.fingerprint, [s.model_dump() for s in self.segments],
                           self.shared_cols, self.ids.value)

    @classmethod
    def load(cls, path: str | Path, model) -> "LatentState":
        """Read a saved state; anything not checksummed, shaped and tabled for ``model`` is a ``KvmasError``."""
        f = read_state(path, model, Segment)
        return cls(model=model, keys=f.keys, values=f.values, mask=f.mask, positions=f.positions,
                   next_pos=f.next_pos, segments=f.segments, last_hidden=f.last_hidden, last_logits=f.last_logits,
                   shared_cols=f.shared_cols, latent_inputs=f.latent_inputs, ids=_Ids(f.next_id))


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).flatten()


def _seg_rows_repeat(seg: Segment, k: int) -> dict:
    upd: dict = {"rows": seg.rows * k}
    if seg.token_ids is not None:
        upd["token_ids"] = [r for r in seg.token_ids for _ in range(k)]
    if seg.text is not None:
        upd["text"] = [t for t in seg.text for _ in range(k)]
    return upd


def _seg_rows_select(seg: Segment, rows: list[int]) -> dict:
    upd: dict = {"rows": len(rows)}
    if seg.token_ids is not None:
        upd["token_ids"] = [seg.token_ids[i] for i in rows]
    if seg.text is not None:
        upd["text"] = [seg.text[i] for i in rows]
    return upd


def _merge_prefix(states: Sequence[LatentState]) -> int:
    """Columns single-row branches share: leading segments every branch holds, and never past a fork point
    (rows of one forked segment share its id but not its content)."""
    return min([_common_prefix_columns(states)] + [s.shared_cols for s in states])


def _common_prefix_columns(states: Sequence[LatentState]) -> int:
    """Columns of the leading segments that every state holds (same segment ids, same spans)."""
    first = states[0].segments
    cols = 0
    for i, seg in enumerate(first):
        for s in states[1:]:
            if i >= len(s.segments) or s.segments[i].id != seg.id or s.segments[i].length != seg.length:
                return cols
        cols = seg.start + seg.length
    return cols
