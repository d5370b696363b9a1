"""Continuous batching for `moe serve`: one thread owns the model and runs every decode step.

Requests arrive from the HTTP event loop (`submit`), wait in a FIFO queue, and join the running
batch at the next step while it has a free row: the newcomer takes its own KV-cache row of a
core.generation.DecodeBatch (add(defer=True)), and every step is ONE decode forward pass that
draws a token for each running sequence (so the expert cache, and its cache/stream regime switch,
sees the real batch), then ONE prefill pass over the newcomers' next prompt chunks, at most
--max-prefill-tokens in all (chunked prefill: a long prompt costs the running streams a bounded
delay per step instead of its whole prefill; several newcomers share the pass). Each sequence
stops on its own (EOS / stop token, stop string, max_tokens: the DecodeBatch's rules); a
cancelled request (client gone, shutdown) leaves the queue at once, or the batch at the next
step. Results go back to the event loop through each request's `emit` callback.

Step of the loop: 1. take cancellations, 2. admit queued requests into free rows, 3. one step:
decode for all prefilled rows, a prefill chunk for the others, 4. hand out text deltas and
finished answers.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from moe_runtime.core.generation import DecodeBatch, SamplingParams, TokenEvent
from moe_runtime.offload.serve.metrics import ServerMetrics


@dataclass(kw_only=True)
class Chunk:
    """What the scheduler hands a request: new text and tokens, and at the end its finish reason."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    """None while running; "stop" | "length" at the end; "cancelled" | "error" when it did not finish."""
    error: str | None = None


@dataclass(kw_only=True, eq=False)
class Request:
    """One generation; compared by identity (the queue removes exactly this one on cancel)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Chunk], None]
    """Called from the scheduler thread; must be thread-safe and must not block."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    seq_id: int = -1


class Scheduler:
    """See module docstring. `start()` launches the thread; `close(timeout)` drains then cancels."""

    def __init__(self, batch: DecodeBatch, *, max_queue: int, metrics: ServerMetrics):
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1")
        self.batch, self.metrics = batch, metrics
        self.max_batch, self.max_queue = batch.cache.batch, max_queue
        self._pending: deque[Request] = deque()
        self._active: dict[int, Request] = {}
        self._cv = threading.Condition()
        self._closing = self._abort = False
        self._thread = threading.Thread(target=self._run, name="moe-serve-scheduler", daemon=True)

    # ---------------------------------------------------------------- event-loop side
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> bool:
        """Queue a request; False when the queue is full or the server is shutting down."""
        with self._cv:
            if self._closing or len(self._pending) >= self.max_queue:
                return False
            self._pending.append(req)
            self.metrics.set_queue(len(self._pending), len(self._active))
            self._cv.notify()
        return True

    def cancel(self, req: Request) -> None:
        """Cancel `req`: a queued request leaves the queue now (and gets its "cancelled" chunk),
        a running one leaves the batch at the next step; a finished one is left alone."""
        req.cancelled.set()
        with self._cv:
            try:
                self._pending.remove(req)
            except ValueError:  # not queued: running (the thread drops it), admitting, or finished
                self._cv.notify()
                return
            self.metrics.set_queue(len(self._pending), len(self._active))
        self._finish(req, "cancelled", registered=False)

    def stop_accepting(self) -> None:
        """New submissions are refused from now on; queued and running requests carry on."""
        with self._cv:
            self._closing = True
            self._cv.notify()

    def close(self, timeout: float) -> None:
        """Refuse new work, let running requests finish for up to `timeout` s, then cancel the rest."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.ident is None:  # never started (the server failed to start)
            return
        self._thread.join(timeout)
        with self._cv:
            self._abort = True
            self._cv.notify()
        self._thread.join(5.0 + timeout)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def closing(self) -> bool:
        return self._closing

    # ---------------------------------------------------------------- scheduler thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._pending or self._active or self._closing):
                    self._cv.wait()
                if self._abort or (self._closing and not self._pending and not self._active):
                    break
                admit = []
                while self._pending and len(self._active) + len(admit) < self.max_batch:
                    admit.append(self._pending.popleft())
                self.metrics.set_queue(len(self._pending), len(self._active))
            self._drop_cancelled()
            for req in admit:
                try:
                    self._admit(req)
                except Exception as e:  # this request fails; the running ones carry on
                    self._reject(req, e)
            if self._active:
                try:
                    self._step()
                except Exception as e:  # a failed step fails its requests; the server keeps serving
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._shutdown()

    def _admit(self, req: Request) -> None:
        if req.cancelled.is_set():
            self._finish(req, "cancelled", registered=False)
            return
        seqs, _ = self.batch.add([req.prompt_ids], [req.params], defer=True)  # takes a row; steps prefill it
        req.seq_id = seqs[0].seq_id
        self._active[req.seq_id] = req
        self._gauges()

    def _step(self) -> None:
        events = self.batch.step()
        st = self.batch.last_step
        if st.decode_rows:
            self.metrics.decode_step(st.decode_rows, st.decode_s)
        if st.prefill_tokens:
            self.metrics.prefill(st.prefill_tokens, st.prefill_s)
        self._deliver(events)

    def _deliver(self, events: list[TokenEvent]) -> None:
        self.metrics.tokens_out(len(events))
        for e in events:
            if e.finished:  # the DecodeBatch has freed the row already
                req = self._active.pop(e.seq_id)
                self._gauges()
                self.metrics.finished(e.finish_reason)
                req.emit(Chunk(text=e.text, token_ids=[e.token], finish=e.finish_reason))
            else:
                self._active[e.seq_id].emit(Chunk(text=e.text, token_ids=[e.token]))

    def _finish(self, req: Request, reason: str, *, registered: bool = True, error: str | None = None) -> None:
        """End a request that did not finish by itself (cancelled)."""
        if registered and self._active.pop(req.seq_id, None) is not None:
            self.batch.cancel(req.seq_id)
            self._gauges()
        self.metrics.finished(reason)
        req.emit(Chunk(finish=reason, error=error))

    def _gauges(self) -> None:
        with self._cv:
            self.metrics.set_queue(len(self._pending), len(self._active))

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._active.values() if r.cancelled.is_set()]:
            self._finish(req, "cancelled")

    def _reject(self, req: Request, e: Exception) -> None:
        """A prefill that raised: drop whatever of it the batch kept, answer the request with an error."""
        owned = set(self._active)
        for seq in self.batch.running:
            if seq.seq_id not in owned:
                self.batch.cancel(seq.seq_id)
        self.metrics.finished("error")
        req.emit(Chunk(finish="error", error=f"generation failed: {type(e).__name__}: {e}"))

    def _fail_all(self, message: str) -> None:
        for seq in self.batch.running:
            if seq.seq_id not in self._active:
                self.batch.cancel(seq.seq_id)
        for req in list(self._active.values()):
            self._active.pop(req.seq_id, None)
            try:
                self.batch.cancel(req.seq_id)
            except Exception:  # the batch is already broken; the request still gets its error
                pass
            self.metrics.finished("error")
            req.emit(Chunk(finish="error", error=message))

    def _shutdown(self) -> None:
        with self._cv:
            left = list(self._pending)
            self._pending.clear()
        for req in left:
            self._finish(req, "cancelled", registered=False, error="the server is shutting down")
        for req in list(self._active.values()):
            self._finish(req, "cancelled", error="the server is shutting down")
        self.metrics.set_queue(0, 0)


__all__ = ["Scheduler", "Request", "Chunk"]
