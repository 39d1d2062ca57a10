"""One generation at a time: request handlers queue jobs (a bounded queue; full means 429 with Retry-After) and a
single worker thread runs them, so a device never runs two generations at once. A job reports its steps to the
handler's event loop, and stops between steps when its client has gone or its time is up."""

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from ..pipelines.base import NonFiniteError
from .errors import APIError
from .images import encode
from .schemas import ImageRequest

log = logging.getLogger("mlximg.serve")


class Stopped(Exception):
    """Raised from a step callback: the job's client is gone, or its time is up."""


@dataclass
class Job:
    model: str
    request: ImageRequest
    settings: dict  # Pipeline.generate's keyword arguments
    deadline: float | None  # time.monotonic() by which it must be done
    loop: asyncio.AbstractEventLoop
    streaming: bool = False
    done: asyncio.Future = field(init=False)
    events: asyncio.Queue = field(init=False, default_factory=asyncio.Queue)  # streaming: events, then None
    cancelled: threading.Event = field(init=False, default_factory=threading.Event)
    steps_run: int = field(init=False, default=0)

    def __post_init__(self):
        self.done = self.loop.create_future()

    def cancel(self) -> None:
        self.cancelled.set()

    def publish(self, event) -> None:
        """From the worker thread: an event for a streaming client."""
        if self.streaming:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def finish(self, result=None, error: APIError | None = None) -> None:
        def resolve():
            if not self.done.done():
                self.done.set_exception(error) if error is not None else self.done.set_result(result)
            self.events.put_nowait(None)

        self.loop.call_soon_threadsafe(resolve)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def preview_steps(steps: int, previews: int) -> list[int]:
    """The steps after which a streaming client gets a partial image: `previews` spread evenly, before the last."""
    return sorted({max(1, round(steps * (i + 1) / (previews + 1))) for i in range(previews)} - {steps})


class Worker:
    def __init__(self, pool, max_queue: int):
        self.pool = pool
        self.max_queue = max_queue
        self.waiting = 0
        self.running: Job | None = None
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0, "rejected": 0}
        self.seconds_per_job = 10.0  # a running mean of finished jobs, for Retry-After
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="mlximg-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def call(self, function):
        """Run `function` on the worker thread, after what is queued, and wait for it (start-up loads)."""
        done, outcome = threading.Event(), {}

        def task():
            try:
                outcome["value"] = function()
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = error
            done.set()

        self._queue.put(task)
        done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.waiting >= self.max_queue:
                self.counts["rejected"] += 1
                retry = max(1, math.ceil((self.waiting + 1) * self.seconds_per_job))
                raise APIError(429, f"the queue is full ({self.max_queue} waiting); retry in about {retry} s",
                               code="queue_full", headers={"Retry-After": str(retry)})
            self.waiting += 1
        self._queue.put(job)

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            if callable(item):
                item()
                continue
            with self._lock:
                self.waiting -= 1
                self.running = item
            try:
                self._run(item)
            finally:
                with self._lock:
                    self.running = None

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return self._end(job, "cancelled", APIError(499, "cancelled: the client went away"))
        if job.expired():
            return self._end(job, "timed_out", APIError(504, "timed out in the queue"))
        start = time.monotonic()
        try:
            pipeline = self.pool.get(job.model)
            images = pipeline.generate(job.request.prompt, callback=self._callback(job, pipeline), **job.settings)
            files = [encode(image, job.request.output_format, job.request.output_compression) for image in images]
        except Stopped:
            if job.expired():
                return self._end(job, "timed_out", APIError(504, f"timed out after step {job.steps_run}"))
            return self._end(job, "cancelled", APIError(499, f"cancelled after step {job.steps_run}"))
        except APIError as error:
            return self._end(job, "failed", error)
        except NonFiniteError as error:  # the engine's fault (a broken checkpoint), not the request's
            return self._end(job, "failed", APIError(500, str(error), code="non_finite"))
        except (ValueError, FileNotFoundError) as error:  # settings the pipeline refused before any work
            return self._end(job, "failed", APIError(400, str(error), code="invalid_value"))
        except Exception as error:  # noqa: BLE001 - the server goes on
            log.exception("generation failed")
            return self._end(job, "failed", APIError(500, f"generation failed: {type(error).__name__}: {error}"))
        self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.monotonic() - start)
        self._end(job, "completed", result=(files, [image.info["parameters"] for image in images]))

    def _end(self, job: Job, outcome: str, error: APIError | None = None, result=None) -> None:
        with self._lock:
            self.counts[outcome] += 1
        job.finish(result, error)

    def _callback(self, job: Job, pipeline):
        def after_step(step: int, steps: int, latents) -> None:
            job.steps_run = step
            if job.cancelled.is_set() or job.expired():
                raise Stopped
            job.publish({"type": "image_generation.progress", "step": step, "total": steps})
            previews = preview_steps(steps, job.request.partial_images) if job.streaming else []
            if step in previews:
                for index in range(latents.shape[0]):
                    image = pipeline.decode(latents[index:index + 1], phase="preview")
                    job.publish({"type": "image_generation.partial_image", "index": index,
                                 "partial_image_index": previews.index(step),
                                 "image": encode(image, job.request.output_format, job.request.output_compression)})

        return after_step
