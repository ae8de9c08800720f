"""The engine worker: one thread that owns the rollout `Engine` and is the only code that touches it.

Request handlers submit `EngineJob`s through its command queue; it runs `engine.step()` in a loop while there
is work, so concurrent requests share decode steps (continuous batching), and never waits for an event loop.
Each step's new tokens, for every job, go into one `_Outbox` per event loop, woken once per step
(`loop.call_soon_threadsafe`). If `engine.step()` raises, the jobs submitted since the last good step are the
suspects: they fail alone, the engine is rebuilt, and every other job resumes where it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from r1lab.rollout import Engine, SamplingParams

logger = logging.getLogger("r1lab.serve")

__all__ = ["EngineFailure", "EngineJob", "EngineWorker", "default_engine_factory"]


class EngineFailure(RuntimeError):
    """The engine raised while this request was in it."""


@dataclass(eq=False)
class EngineJob:
    """`params.n` samples of one prompt, as submitted to the worker. `deliver` receives a list of
    (sample_index, new_token_ids, finished, finish_reason), one per sample that advanced in a step, or an
    EngineFailure. Without an `outbox` it is called in the worker thread; with one, in the outbox's event loop
    (the worker wakes that loop once per step for all of the step's deliveries)."""

    prompt: list[int]
    params: SamplingParams
    deliver: Callable[[Any], None]
    outbox: _Outbox | None = None
    generated: list[list[int]] = field(default_factory=list)
    open_samples: set[int] = field(default_factory=set)
    request_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.generated = [[] for _ in range(self.params.n)]
        self.open_samples = set(range(self.params.n))


class EngineWorker:
    """A thread that owns an Engine: takes jobs and cancellations from a queue, steps the engine while any
    sequence is unfinished, and delivers the new tokens of every step to the jobs."""

    def __init__(self, engine_factory: Callable[[], Any]) -> None:
        self.engine_factory = engine_factory
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[int, tuple[EngineJob, list[int]]] = {}  # engine request id → job, sample map
        self._new_jobs: set[EngineJob] = set()  # submitted since the last good step: the crash suspects
        self._touched: dict[int, _Outbox] = {}  # outboxes holding deliveries whose loop was not woken yet
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.engine: Any = None
        self.alive = False
        self.error: str | None = None
        """Why the worker thread stopped, if it died (the next submission restarts it with a new engine)."""
        self.steps = 0
        self.failures = 0

    # -- called from any thread ------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="r1lab-engine", daemon=True)
                self.alive, self.error = True, None
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout)

    def submit(self, job: EngineJob) -> None:
        self.start()
        self._commands.put(("add", job))

    def cancel(self, job: EngineJob) -> None:
        self._commands.put(("cancel", job))

    @property
    def active_jobs(self) -> int:
        return len({id(job) for job, _ in list(self._routes.values())})

    # -- the worker thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self.engine_factory()
            while True:
                busy = self.engine.has_unfinished()
                for kind, job in self._drain(block=not busy):
                    if kind == "stop":
                        return
                    getattr(self, f"_{kind}")(job)
                if self.engine.has_unfinished():
                    self._step()
                self._flush()
        except BaseException as error:  # noqa: BLE001 - report, fail everyone, and mark the server unhealthy
            self.error = f"{type(error).__name__}: {error}"
            logger.exception("the engine worker stopped")
            self._fail(list({id(j): j for j, _ in self._routes.values()}.values()), "the engine worker stopped")
            self._flush()
            raise
        finally:
            self.alive = False

    def _drain(self, block: bool) -> list[tuple[str, Any]]:
        items = [self._commands.get()] if block else []
        while True:
            try:
                items.append(self._commands.get_nowait())
            except queue.Empty:
                return items

    def _add(self, job: EngineJob, samples: list[int] | None = None, prompt: list[int] | None = None,
             params: SamplingParams | None = None) -> None:
        try:
            request_id = self.engine.add_request(prompt or job.prompt, params or job.params)
        except Exception as error:  # noqa: BLE001 - a request the engine refuses fails alone
            self._deliver(job, EngineFailure(f"the engine refused the request: {error}"))
            return
        self._routes[request_id] = (job, samples if samples is not None else list(range(job.params.n)))
        job.request_ids.add(request_id)
        self._new_jobs.add(job)

    def _cancel(self, job: EngineJob) -> None:
        for request_id in list(job.request_ids):
            self.engine.abort(request_id)
            self._routes.pop(request_id, None)
        job.request_ids.clear()
        self._new_jobs.discard(job)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as error:  # noqa: BLE001 - isolate the failure, rebuild, resume the others
            self._recover(error)
            return
        self.steps += 1
        self._new_jobs.clear()
        batches: dict[int, tuple[EngineJob, list]] = {}
        for event in events:
            route = self._routes.get(event.request_id)
            if route is None:
                continue  # cancelled: its last tokens are dropped
            job, samples = route
            sample = samples[event.sample_index]
            job.generated[sample].extend(event.new_token_ids)
            if event.finished:
                job.open_samples.discard(sample)
                if not any(s in job.open_samples for s in samples):
                    del self._routes[event.request_id]
                    job.request_ids.discard(event.request_id)
            batches.setdefault(id(job), (job, []))[1].append(
                (sample, list(event.new_token_ids), event.finished, event.finish_reason))
        for job, items in batches.values():
            self._deliver(job, items)

    def _recover(self, error: Exception) -> None:
        self.failures += 1
        jobs = {id(j): j for j, _ in self._routes.values()}
        suspects = [j for j in jobs.values() if j in self._new_jobs] or list(jobs.values())
        logger.error("engine step failed (%s: %s); failing %d request(s), resuming %d", type(error).__name__,
                     error, len(suspects), len(jobs) - len(suspects))
        self._fail(suspects, f"the engine failed on this request: {type(error).__name__}: {error}")
        survivors = [j for j in jobs.values() if j not in suspects]
        self._routes.clear()
        self._new_jobs.clear()
        self.engine = None  # free the old cache before the new one is allocated
        self.engine = self.engine_factory()
        for job in survivors:
            job.request_ids.clear()
            for sample in sorted(job.open_samples):
                done = job.generated[sample]
                params = dataclasses.replace(job.params, n=1, seed=None,
                                             max_new_tokens=job.params.max_new_tokens - len(done))
                self._add(job, [sample], job.prompt + done, params)
        self._new_jobs.clear()  # resumed jobs are not suspects of the next failure

    def _fail(self, jobs: Sequence[EngineJob], message: str) -> None:
        for job in jobs:
            for request_id in list(job.request_ids):
                self._routes.pop(request_id, None)
            job.request_ids.clear()
            self._deliver(job, EngineFailure(message))

    def _deliver(self, job: EngineJob, payload: Any) -> None:
        if job.outbox is not None:  # handed over at the next _flush, with everything else of this step
            job.outbox.put(job.deliver, payload)
            self._touched[id(job.outbox)] = job.outbox
            return
        try:
            job.deliver(payload)
        except Exception:  # noqa: BLE001 - e.g. the event loop closed during shutdown
            logger.debug("could not deliver to a request", exc_info=True)

    def _flush(self) -> None:
        """Wake each event loop that has deliveries waiting: one wake-up per loop per step."""
        if self._touched:
            outboxes, self._touched = list(self._touched.values()), {}
            for outbox in outboxes:
                outbox.flush()


class _Outbox:
    """Worker thread → one event loop. The worker `put`s deliveries without waking the loop and `flush`es
    once per step; the loop then runs every delivery put since its last run, in order, in one callback. A
    flush while a wake-up is already pending adds nothing, so a loop that falls behind is woken once for
    several steps."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[Callable[[Any], None], Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, callback: Callable[[Any], None], payload: Any) -> None:
        with self._lock:
            self._items.append((callback, payload))

    def flush(self) -> None:
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop closed (shutdown): nobody is left to deliver to
            with self._lock:
                self._items.clear()
                self._scheduled = False
            logger.debug("could not wake a closed event loop")

    def _run(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for callback, payload in items:
            try:
                callback(payload)
            except Exception:  # one broken request must not starve the others
                logger.debug("could not deliver to a request", exc_info=True)


def default_engine_factory(model: Any, max_num_seqs: int, max_model_len: int) -> Callable[[], Engine]:
    return lambda: Engine(model, num_slots=max_num_seqs, max_len=max_model_len)
