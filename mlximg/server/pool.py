"""The models a server keeps loaded, within a memory budget: a model loads on its first request (or at start), and
when another must load and the budget would overflow, the least recently used ones are closed first. What a
loaded model holds is measured (its tracker's bytes); what a model about to load will hold is the planner's count
of its weights from the safetensors headers (exact for weights, tests/test_planner.py)."""

import logging
import threading
from collections import OrderedDict

from ..manifests import known_manifests
from .errors import bad_request

log = logging.getLogger("mlximg.serve")


class ModelPool:
    def __init__(self, models: list[str], budget_bytes: int, load_options: dict | None = None):
        """`models`: the models named at start (manifest names, folders or repo ids), the first the default;
        every manifest name is served too."""
        self.served = list(dict.fromkeys(models))
        self.default = self.served[0] if self.served else None
        self.budget = budget_bytes
        self.load_options = load_options or {}
        self.pipelines: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self.closed = 0
        self._lock = threading.Lock()  # the worker loads and closes; request handlers read

    def model_ids(self) -> list[str]:
        return list(dict.fromkeys([*self.served, *known_manifests()]))

    def resolve(self, model: str | None) -> str:
        """The model a request names, or the default; unknown ones are refused (a server loads no arbitrary
        paths or repos on a client's say)."""
        model = model or self.default
        if model is None:
            from ..manifests import DEFAULT_MODEL

            model = DEFAULT_MODEL
        if model not in self.model_ids():
            raise bad_request(f"model {model!r} is not served here; GET /v1/models lists the models", "model",
                              "model_not_found")
        return model

    def get(self, model: str):
        """The pipeline of `model`, loading it (and closing others to stay in budget) if needed. Worker only."""
        with self._lock:
            if model in self.pipelines:
                self.pipelines.move_to_end(model)
                return self.pipelines[model]
        from .. import load

        pipeline = load(model, **self.load_options)
        self._make_room(planned_weights(pipeline, self.load_options))
        with self._lock:
            self.pipelines[model] = pipeline
        return pipeline

    def _make_room(self, needed: int) -> None:
        while self.pipelines and sum(self.resident().values()) + needed > self.budget:
            with self._lock:
                model, pipeline = self.pipelines.popitem(last=False)
            released = pipeline.close()
            self.closed += 1
            log.info("closed %s (%.0f MiB) to load another model within the memory budget", model, released / 2**20)

    def resident(self) -> dict[str, int]:
        """Bytes each loaded model keeps now, measured."""
        with self._lock:
            return {model: pipeline.tracker.nbytes() for model, pipeline in self.pipelines.items()}

    def close(self) -> None:
        with self._lock:
            while self.pipelines:
                self.pipelines.popitem()[1].close()


def planned_weights(pipeline, load_options: dict) -> int:
    """The most weight bytes `pipeline` holds at once: its text encoder while encoding, or the transformer and
    VAE afterwards."""
    from ..planner import plan

    phases = plan(pipeline.model_dir, pipeline.family, width=256, height=256, compute_bytes=pipeline.dtype.size,
                  quantize=load_options.get("quantize"),
                  text_encoder_quantize=load_options.get("text_encoder_quantize"),
                  text_encoder_dir=pipeline.text_encoder_dir)
    return max(phase.weights for phase in phases)
