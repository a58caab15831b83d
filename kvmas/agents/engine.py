"""The engine: every forward pass of a model goes through here, so that concurrent runs share forwards.

A :class:`LatentState` asks its model's engine to run new columns on top of its KV (:meth:`Engine.forward`).
Outside a batch the request runs at once. Inside :func:`run_batched`, B runs (questions) execute in B worker
threads; each forward they ask for waits until every run of the batch is waiting too, and then all of them run
as rows of one forward: past KV right-padded to the longest, new columns left-padded to the longest, every
padding column masked, positions explicit. So a run computes exactly what it would alone (up to the order of
fp reductions), keeps its own trace and usage, and diverging control flow (early stops, majorities, different
primitives) needs nothing special. Requests of very different widths (one run prefilling a prompt while the
others decode one token) run as separate forwards of the same tick, so no one pays for another's padding.
Rows whose new columns are all padding (finished rows of a multi-row decode) are left out of the forward.
A run that finishes frees its slot, and the next question takes it (refill, not drain).
The rows of a forward share one KV buffer per layer (:class:`_Arena`), each past left-padded so that new
columns follow it; a decode tick whose rows all continue the previous tick's writes into that buffer in place
(room for ``DECODE_SPARE`` columns), so the past is copied once per that many ticks, not once or twice per tick.

>>> from kvmas.testing import tiny_model
>>> from kvmas.agents.engine import run_batched
>>> from kvmas.agents.state import LatentState
>>> m = tiny_model()
>>> one = lambda q: LatentState.empty(m).extend(q).speak(4).texts[0]
>>> run_batched(m, [lambda q=q: one(q) for q in ("ab", "abcdef")]) == [one("ab"), one("abcdef")]
True
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

T = TypeVar("T")
# Requests whose padded cost stays within this factor of their real cost share one forward.
PAD_SLACK = 1.25
# Columns of room a decoding batch's KV buffer keeps for the next ticks (one copy of the past per this many).
DECODE_SPARE = 32


@dataclass(eq=False)
class Request:
    """New columns to run on top of a past: ``keys``/``values`` per layer ``[rows, heads, T, dim]``, the full
    ``mask`` ``[rows, T + n]``, ``positions`` ``[rows, n]`` and ``ids`` ``[rows, n]`` or ``embeds``."""

    keys: tuple
    values: tuple
    mask: torch.Tensor
    positions: torch.Tensor
    ids: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    # results: hidden states of the new columns, next-token logits (fp32) after the last column of each row,
    # and the full (past + new) KV per layer
    hidden: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None
    out_keys: tuple = ()
    out_values: tuple = ()
    error: BaseException | None = None
    done: bool = field(default=False, repr=False)

    @property
    def past(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def width(self) -> int:
        return self.positions.shape[1]

    @property
    def rows(self) -> int:
        return self.positions.shape[0]


class BatchCancelled(Exception):
    """Raised in a :func:`run_batched` job at its next forward once the caller was interrupted (not a
    :class:`KvmasError`: no per-item handler may record it as the run's own failure)."""


_batch_local = threading.local()  # .stop: the Event of the run_batched call this worker thread runs a job of


class Engine:
    """Runs a model's forwards; batches the concurrent ones of :func:`run_batched` workers."""

    def __init__(self, model):
        self.model = model
        self._cv = threading.Condition()
        self._members: set[int] = set()
        self._waiting: list[Request] = []
        self._arena: _Arena | None = None  # the last decode tick's KV buffer, for the next tick to continue
        self._exec = threading.Lock()  # one forward at a time (a batch tick, or a call from outside a batch)
        self.forwards = 0  # decoder calls made (a measure of batching: fewer calls for the same work)
        self.continued = 0  # of those, how many wrote into the previous tick's KV buffer (no copy of the past)

    # -- the public call ---------------------------------------------------------------------------
    def forward(self, req: Request) -> Request:
        """Run ``req`` (at once, or with the other runs of the batch this thread belongs to)."""
        stop = getattr(_batch_local, "stop", None)
        if stop is not None and stop.is_set():
            raise BatchCancelled("the batch this run belongs to was interrupted")
        me = threading.get_ident()
        with self._cv:
            member = me in self._members
            ready = None
            if member:
                self._waiting.append(req)
                ready = self._take_if_ready()
        if not member:
            self._execute([req])
        else:
            if ready:
                self._execute(ready)
            with self._cv:
                while not req.done:
                    self._cv.wait()
        if req.error is not None:
            raise req.error
        return req

    # -- batch membership --------------------------------------------------------------------------
    def is_member(self) -> bool:
        with self._cv:
            return threading.get_ident() in self._members

    @contextmanager
    def member(self):
        """This thread's forwards join the batch while inside (a server's request threads use it: each
        request joins the running batch at its next tick and leaves when done)."""
        if self.is_member():
            yield
            return
        self.join()
        try:
            yield
        finally:
            self.leave()

    def join(self) -> None:
        with self._cv:
            self._members.add(threading.get_ident())

    def leave(self) -> None:
        with self._cv:
            self._members.discard(threading.get_ident())
            ready = self._take_if_ready()
        if ready:
            self._execute(ready)

    def _take_if_ready(self) -> list[Request] | None:
        """Under the lock: every member waits, so the tick can run (its requests are taken)."""
        if self._waiting and len(self._waiting) >= len(self._members):
            ready, self._waiting = self._waiting, []
            return ready
        return None

    def _execute(self, reqs: list[Request]) -> None:
        try:
            with torch.no_grad(), self._exec:
                for group in _groups(reqs):
                    self._run(group)
        except BaseException as exc:  # every waiting run gets the error, none hangs
            for r in reqs:
                if r.hidden is None:
                    r.error = exc
        finally:
            with self._cv:
                for r in reqs:
                    r.done = True
                self._cv.notify_all()

    # -- one forward -------------------------------------------------------------------------------
    def _decoder(self):
        hf = self.model.hf
        return getattr(hf, hf.base_model_prefix, hf)

    def _run(self, group: list[Request]) -> None:
        live = [r.mask[:, r.past:].sum(1) > 0 for r in group]
        self.forwards += 1
        rows = [int(m.sum()) for m in live]
        total, width = sum(rows), max(r.width for r in group)
        arena = self._arena
        found = arena.continues(group, rows, width) if arena is not None else None
        if found is not None:
            self.continued += 1
            bufs, order = found
            group, live, rows = [group[i] for i in order], [live[i] for i in order], [rows[i] for i in order]
        else:
            # a new arena: each part's past copied in, left-padded so that its new columns follow it directly
            arena, bufs = _Arena.build(group, live, rows, width, spare=DECODE_SPARE if width == 1 else 0)
        keys, values = bufs
        if arena.spare:  # only decode arenas are worth continuing (a prefill's buffer is exactly its own)
            self._arena = arena
        past = arena.filled
        device = self.model.embedding.weight.device
        hidden_size, emb_dtype = self.model.embedding.weight.shape[1], self.model.embedding.weight.dtype
        mask = torch.zeros(total, past + width, dtype=group[0].mask.dtype, device=device)
        pos = torch.zeros(total, width, dtype=torch.long, device=device)
        use_embeds = any(r.embeds is not None for r in group)
        ids = torch.full((total, width), self.model.tokenizer.pad_token_id or 0, dtype=torch.long, device=device)
        embeds = torch.zeros(total, width, hidden_size, dtype=emb_dtype, device=device) if use_embeds else None
        for r, m, k, sl in zip(group, live, rows, _row_slices(rows)):
            if k == 0:
                continue
            pick = (lambda t: t) if k == r.rows else (lambda t, m=m: t[m])  # noqa: E731 (no copy when all live)
            mask[sl, past - r.past: past] = pick(r.mask[:, : r.past])
            mask[sl, past + width - r.width:] = pick(r.mask[:, r.past:])
            pos[sl, width - r.width:] = pick(r.positions)
            if use_embeds:
                embeds[sl, width - r.width:] = pick(r.embeds) if r.embeds is not None else \
                    self.model.embedding(pick(r.ids))
            else:
                ids[sl, width - r.width:] = pick(r.ids)
        out = self._decoder()(input_ids=None if use_embeds else ids, inputs_embeds=embeds, attention_mask=mask,
                              position_ids=pos, cache=arena.cache(keys, values), use_cache=True)
        arena.filled += width
        hidden = out.last_hidden_state
        logits = self._head(hidden[:, -1])  # one head matmul for every row of the tick
        # a part's outputs are views of the arena when they are contiguous there and the arena is theirs (one
        # part) or meant to be continued; else copies, so that no long-lived state pins a many-row buffer
        alone = len(group) == 1
        for r, m, k, src in zip(group, live, rows, _row_slices(rows)):
            cols = slice(past + width - r.width, past + width)
            every = k == r.rows
            hcols = slice(width - r.width, width)
            r.hidden = hidden[src, hcols] if every else _scatter(hidden[src, hcols], m, r.rows)
            r.last_logits = logits[src] if every else _scatter(logits[src], m, r.rows)
            own = slice(past - r.past, past + width)
            out_k, out_v = [], []
            for bk, bv, pk, pv in zip(keys, values, r.keys, r.values):
                if every and r.width == width:
                    nk, nv = bk[src, :, own], bv[src, :, own]
                    if not (alone or arena.spare):
                        nk, nv = nk.clone(), nv.clone()
                    out_k.append(nk)
                    out_v.append(nv)
                    continue
                nk, nv = bk[src, :, cols], bv[src, :, cols]
                if not every:
                    nk, nv = _scatter(nk, m, r.rows), _scatter(nv, m, r.rows)
                out_k.append(torch.cat([pk, nk], 2))
                out_v.append(torch.cat([pv, nv], 2))
            r.out_keys, r.out_values = tuple(out_k), tuple(out_v)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.hf.get_output_embeddings()(hidden).float()


class _InPlaceLayer(DynamicLayer):
    """A cache layer over a buffer with room for the new columns: ``update`` writes them in place, where the
    stock layer concatenates (a copy of the whole past per layer per forward)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int):
        super().__init__()
        self._k, self._v, self._filled = keys, values, filled
        self.keys, self.values = keys[:, :, :filled], values[:, :, :filled]
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        self._k[:, :, self._filled: self._filled + n] = key_states
        self._v[:, :, self._filled: self._filled + n] = value_states
        self._filled += n
        self.keys, self.values = self._k[:, :, : self._filled], self._v[:, :, : self._filled]
        return self.keys, self.values


class _Arena:
    """Per layer a KV buffer ``[rows, heads, capacity, dim]`` for the rows of one forward: each part's past sits
    left-padded (zeros, masked) so that it ends at column ``filled``, and new columns are written in place after
    it. A tick whose every request continues exactly where the previous tick's rows left off (the same rows, in
    order, their KV views of this buffer ending at ``filled``) reuses it: no copy of the past at all. Columns
    before ``filled`` are never written again, so every state viewing them stays valid (copy-on-use: a second
    continuation of the same state no longer ends at ``filled`` and gets a fresh arena)."""

    def __init__(self, keys: list, values: list, filled: int, spare: int):
        # held weakly: the states viewing the buffers keep them alive, and when they are gone so is the arena
        self._refs = [(weakref.ref(k), weakref.ref(v)) for k, v in zip(keys, values)]
        self.filled, self.spare = filled, spare
        self.rows, self.capacity = keys[0].shape[0], keys[0].shape[2]

    def buffers(self) -> tuple[list, list] | None:
        """The per-layer key and value buffers, or None when no state holds them any more."""
        keys, values = [], []
        for rk, rv in self._refs:
            k, v = rk(), rv()
            if k is None or v is None:
                return None
            keys.append(k)
            values.append(v)
        return keys, values

    @classmethod
    def build(cls, group, live, rows, width: int, spare: int) -> "_Arena":
        past = max(r.past for r in group)
        total = sum(rows)
        ref = group[0].keys
        keys, values = [], []
        for li in range(len(ref)):
            shape = (total, ref[li].shape[1], past + width + spare, ref[li].shape[3])
            bk = torch.empty(shape, dtype=ref[li].dtype, device=ref[li].device)
            bv = torch.empty_like(bk)
            for r, m, k, sl in zip(group, live, rows, _row_slices(rows)):
                if k == 0:
                    continue
                pk, pv = (r.keys[li], r.values[li]) if k == r.rows else (r.keys[li][m], r.values[li][m])
                bk[sl, :, past - r.past: past] = pk
                bv[sl, :, past - r.past: past] = pv
                if r.past < past:  # padding columns must hold finite numbers (masked, but multiplied by 0)
                    bk[sl, :, : past - r.past] = 0
                    bv[sl, :, : past - r.past] = 0
            keys.append(bk)
            values.append(bv)
        return cls(keys, values, past, spare), (keys, values)

    def continues(self, group, rows, width: int) -> tuple[tuple[list, list], list[int]] | None:
        """``(buffers, order)`` if the group is every row of this arena once (``order``: the group's requests
        in arena row order), each request's KV ending at ``filled``, with room for ``width`` more columns."""
        if self.filled + width > self.capacity or sum(rows) != self.rows:
            return None
        bufs = self.buffers()
        if bufs is None:
            return None
        k0, v0, kl = bufs[0][0], bufs[1][0], bufs[0][-1]
        base = k0.untyped_storage().data_ptr(), v0.untyped_storage().data_ptr(), kl.untyped_storage().data_ptr()
        starts = []
        for r, k in zip(group, rows):
            if k != r.rows or r.width != width or not r.keys:
                return None
            t = r.keys[0]
            if ((t.untyped_storage().data_ptr(), r.values[0].untyped_storage().data_ptr(),
                 r.keys[-1].untyped_storage().data_ptr()) != base or t.stride() != k0.stride()):
                return None
            row, rest = divmod(t.storage_offset() - k0.storage_offset(), k0.stride(0))
            if rest != (self.filled - r.past) * k0.stride(2) or r.values[0].storage_offset() != \
                    t.storage_offset() or r.keys[-1].storage_offset() != t.storage_offset():
                return None
            starts.append(row)
        order = sorted(range(len(group)), key=starts.__getitem__)
        row = 0
        for i in order:  # the requests tile the arena's rows exactly
            if starts[i] != row:
                return None
            row += rows[i]
        return (bufs, order) if row == self.rows else None

    def cache(self, keys: list, values: list) -> Cache:
        return Cache(layers=[_InPlaceLayer(k, v, self.filled) for k, v in zip(keys, values)])


def _row_slices(rows: list[int]):
    """The batch rows of each part, in order: ``rows`` are the parts' live row counts."""
    at = 0
    for k in rows:
        yield slice(at, at + k)
        at += k


def _scatter(part: torch.Tensor, live: torch.Tensor, rows: int) -> torch.Tensor:
    """``part`` (the live rows) placed into ``rows`` rows; the others zero (their columns are masked)."""
    full = part.new_zeros((rows,) + tuple(part.shape[1:]))
    full[live] = part
    return full


def _groups(reqs: list[Request]) -> list[list[Request]]:
    """Requests in order of width, grouped while the padded cost stays within ``PAD_SLACK`` of the real one."""
    out: list[list[Request]] = []
    for r in sorted(reqs, key=lambda r: r.width):
        if out:
            g = out[-1]
            real = sum(x.rows * x.width for x in g) + r.rows * r.width
            padded = sum(x.rows for x in g + [r]) * r.width
            if padded <= PAD_SLACK * real:
                g.append(r)
                continue
        out.append([r])
    return out


def run_batched(model, jobs: Sequence[Callable[[], T]], batch_size: int | None = None,
                on_done: Callable[[int, T], None] | None = None) -> list[T]:
    """Run ``jobs`` (each one whole run) ``batch_size`` at a time (default all), their forwards shared.

    Results come back in the order of ``jobs``; ``on_done(index, result)`` is called as each one finishes.
    The first error (in job order) is raised after every job ended. Interrupted (Ctrl-C in the calling
    thread), jobs not yet started never start and running ones stop at their next forward
    (:class:`BatchCancelled`), so the interrupt reaches the caller after one tick, not after every job.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    size = max(1, min(batch_size or len(jobs), len(jobs)))
    engine = model.engine
    if engine.is_member():  # a batch inside a batch job: this thread's slot runs them one after another
        size = 1

    # The first wave starts together: a worker that began before the others joined would run its first
    # forwards alone (seen on a loaded machine: a 5-run batch took 24 forwards instead of ~8).
    start = threading.Barrier(size)
    stop = threading.Event()

    def member(i, job):
        _batch_local.stop = stop
        try:
            with engine.member():
                if i < size:
                    start.wait()
                result = job()
        finally:
            _batch_local.stop = None
        if on_done is not None:
            on_done(i, result)
        return result

    if size == 1:
        if engine.is_member():
            results = [job() for job in jobs]
            for i, r in enumerate(results):
                if on_done is not None:
                    on_done(i, r)
            return results
        return [member(i, job) for i, job in enumerate(jobs)]
    try:
        with ThreadPoolExecutor(max_workers=size, thread_name_prefix="kvmas-row") as pool:
            futures = [pool.submit(member, i, job) for i, job in enumerate(jobs)]
            try:
                errors = [f.exception() for f in futures]
            except BaseException:
                stop.set()
                start.abort()  # a first-wave job cancelled before it started would leave the others waiting
                for f in futures:
                    f.cancel()
                raise
    finally:
        _trim()
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]


_LIBC = None


def _tune_allocator() -> None:
    """glibc malloc, once per process (``KVMAS_MALLOC_TUNE=0`` leaves it alone): one arena, and large blocks
    neither mmapped nor trimmed, so the KV buffers every tick allocates and frees are reused in place. Measured on qwen 0.5B, 32 rows x 64 tokens: with glibc's defaults
    (an arena per thread, fresh mmaps) peak RSS 9.5 GB and 39 tokens/s; tuned 4.3 GB and 57 tokens/s (the
    defaults ran a 100-question GSM8K batch out of 24 GB). No effect off glibc."""
    global _LIBC
    if _LIBC is not None:
        return
    try:
        import ctypes

        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(-8, 1)  # M_ARENA_MAX
        _LIBC.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: fixed, so it no longer adapts per thread
        _LIBC.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep freed blocks for the next tick (trimmed after)
    except (OSError, AttributeError):
        _LIBC = False


def _trim() -> None:
    """Give freed memory back to the system after a batch (glibc ``malloc_trim``)."""
    if _LIBC:
        _LIBC.malloc_trim(0)


def default_batch_size(model, positions: int, limit: int = 32) -> int:
    """As many runs as fit: a run's KV at ``positions`` columns (summed over its rows: a Vote's solvers count
    n times), kept about three times over while a tick runs (its state, the padded batch, the new state),
    within a quarter of the memory free now; at most ``limit`` (on these CPUs throughput stops growing well
    before 32 runs)."""
    fp = model.fingerprint
    per_run = 3 * fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim * positions * model.dtype.itemsize
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(limit, int(free * 0.25 // max(1, per_run))))


if os.environ.get("KVMAS_MALLOC_TUNE", "1") != "0":  # at import, before the batch threads allocate
    _tune_allocator()
