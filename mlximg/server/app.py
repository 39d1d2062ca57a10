"""The HTTP API: OpenAI's image endpoints (generations, edits, models), health, files answered as `url`, and a
status page; every request checked before it is queued, and answered as OpenAI answers."""

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from ..api import check_arguments
from . import errors
from .errors import APIError, bad_request
from .files import FileStore
from .guard import Guard
from .images import MEDIA_TYPES, b64, engine_mask, read_upload
from .jobs import Job, Worker
from .pool import ModelPool
from .schemas import ImageRequest, edit_request
from .status import memory

MAX_UPLOADS = 8  # images per edit; the FLUX.2 models take at most 6 references


@dataclass
class ServerSettings:
    models: list[str] = field(default_factory=list)  # loaded at start; the first is the default
    api_key: str | None = None
    max_queue: int = 16  # jobs waiting (besides the one running)
    memory_budget: int = 16 * 2**30  # bytes of model weights kept loaded
    timeout: float | None = 900.0  # seconds from a request's arrival to its images
    max_body: int = 64 * 2**20
    url_ttl: float = 3600.0  # seconds an image answered as `url` stays
    lora_dir: Path | None = None  # LoRA files requests may name
    load_options: dict = field(default_factory=dict)  # mlximg.load's: quantize, fp8, ...


def create_app(settings: ServerSettings) -> FastAPI:
    pool = ModelPool(settings.models, settings.memory_budget, settings.load_options)
    worker = Worker(pool, settings.max_queue)
    store = FileStore(settings.url_ttl)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        await asyncio.to_thread(worker.call, lambda: [warm(pool.get(model)) for model in pool.served])
        yield
        if worker.running is not None:
            worker.running.cancel()
        await asyncio.to_thread(worker.stop)
        pool.close()
        store.close()

    app = FastAPI(title="mlximg", lifespan=lifespan)
    errors.install(app)
    app.add_middleware(Guard, api_key=settings.api_key, max_body=settings.max_body)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        loaded = set(pool.resident())
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "mlximg",
                                            "loaded": model in loaded} for model in pool.model_ids()]}

    @app.get("/v1/server")
    async def status():
        running = worker.running
        return {"queue": {"waiting": worker.waiting, "max": worker.max_queue,
                          "seconds_per_job": round(worker.seconds_per_job, 4),
                          "running": None if running is None else {"model": running.model,
                                                                   "step": running.steps_run}},
                "jobs": dict(worker.counts), "models": pool.resident(), "models_closed": pool.closed,
                "memory_budget": pool.budget, "memory": memory()}

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str):
        path = store.path(name)
        if path is None:
            raise APIError(404, f"no image {name!r} (unknown, or older than {settings.url_ttl:.0f} s)")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix[1:]])

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request):
        model = pool.resolve(body.model)
        return await answer(request, body, model, generate_settings(body, model, settings))

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        form = await request.form(max_files=MAX_UPLOADS + 1, max_fields=64)
        images = [await read_file(value, "image") for key in ("image", "image[]") for value in form.getlist(key)]
        mask = form.get("mask")
        fields = {key: value for key, value in form.multi_items() if key not in ("image", "image[]", "mask")}
        if isinstance(fields.get("loras"), str):
            fields["loras"] = _json_field(fields["loras"], "loras")
        body = edit_request(fields)
        if not images:
            raise bad_request("image: at least one image is required", "image", "missing_image")
        mask = engine_mask(await read_file(mask, "mask"), images[0].size) if mask is not None else None
        model = pool.resolve(body.model)
        run = generate_settings(body, model, settings)
        run.update(edit_settings(family_of_model(model), images, mask, body.strength))
        return await answer(request, body, model, run)

    async def answer(request: Request, body: ImageRequest, model: str, run: dict):
        """Queue the job; stream its events, or wait for its images while watching for the client leaving."""
        deadline = time.monotonic() + settings.timeout if settings.timeout else None
        job = Job(model, body, run, deadline, asyncio.get_running_loop(), streaming=body.stream)
        worker.submit(job)
        if body.stream:
            return StreamingResponse(stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        files, parameters = await wait(job, request)
        data = [{"b64_json": b64(f)} if body.response_format == "b64_json"
                else {"url": f"{request.base_url}v1/images/files/{store.put(f, body.output_format)}"} for f in files]
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": body.output_format,
                             "size": f"{parameters[0]['width']}x{parameters[0]['height']}"})

    async def wait(job: Job, request: Request):
        while True:
            done, _ = await asyncio.wait({job.done}, timeout=0.25)
            if done:
                return job.done.result()
            if await request.is_disconnected():
                job.cancel()
                return await job.done  # the worker ends it at the next step (a 499 no one reads)
            if job.expired():
                job.cancel()
                raise APIError(504, f"no image within the server's {settings.timeout:.0f} s limit")

    async def stream(job: Job):
        """Server-sent events as OpenAI streams images: progress per step, partial images, then each image."""
        created = int(time.time())
        try:
            while (event := await job.events.get()) is not None:
                if "image" in event:  # a partial image, encoded by the worker
                    image = event.pop("image")
                    event = {**event, "b64_json": b64(image), "created_at": created,
                             "output_format": job.request.output_format}
                yield sse(event)
            try:
                files, parameters = job.done.result()
            except APIError as error:
                yield sse({"type": "error", **error.body()})
                return
            for index, (data, params) in enumerate(zip(files, parameters)):
                yield sse({"type": "image_generation.completed", "index": index, "b64_json": b64(data),
                           "created_at": created, "size": f"{params['width']}x{params['height']}",
                           "output_format": job.request.output_format})
        finally:
            job.cancel()  # the client is gone (or the stream ended): a running job stops at its next step

    return app


def warm(pipeline) -> None:
    """Load a model's weights now rather than on its first request (the text encoder loads per run)."""
    pipeline.component("transformer")
    pipeline.component("vae")


def sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def _json_field(text: str, param: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise bad_request(f"{param}: not valid JSON", param, "invalid_value") from None


async def read_file(value, param: str):
    if isinstance(value, str) or not hasattr(value, "read"):
        raise bad_request(f"{param}: expected an uploaded file", param, "invalid_image")
    return read_upload(await value.read(), param)


def generate_settings(body: ImageRequest, model: str, settings: ServerSettings) -> dict:
    """Pipeline.generate's arguments for a request, checked against the model's limits now (before queueing)."""
    width, height = body.dimensions()
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    for param, checked in (("size", dict(width=width, height=height)), ("steps", dict(steps=body.steps)),
                           ("guidance", dict(guidance=body.guidance)), ("n", dict(num_images=body.n))):
        try:
            check_arguments(model, **checked)
        except ValueError as error:
            raise bad_request(str(error), param, "invalid_value") from None
    return dict(width=width, height=height, steps=body.steps, guidance=body.guidance,
                negative_prompt=body.negative_prompt, seed=seed, num_images=body.n, teacache=body.teacache,
                stepcache=body.stepcache, loras=lora_files(body, settings.lora_dir))


def lora_files(body: ImageRequest, lora_dir: Path | None) -> list[tuple[str, float]]:
    """The LoRA files a request names, inside the server's LoRA folder only. Always a list: adapters a
    pipeline applied for an earlier request come off."""
    if not body.loras:
        return []
    if lora_dir is None:
        raise bad_request("loras: this server has no LoRA folder (mlximg serve --lora-dir)", "loras")
    root = lora_dir.resolve()
    files = []
    for lora in body.loras:
        path = (root / lora.name).resolve()
        if root not in path.parents or not path.exists():
            raise bad_request(f"loras: no LoRA {lora.name!r} in the server's LoRA folder", "loras", "lora_not_found")
        files.append((str(path), lora.scale))
    return files


def family_of_model(model: str) -> str:
    from ..manifests import family_of, resolve

    manifest = resolve(model)
    return manifest.family or family_of(manifest.path)


def edit_settings(family: str, images: list, mask, strength: float | None) -> dict:
    """Edits per family: FLUX.2 edits from its references (with a mask: repaints the first image, the rest as
    references); Z-Image repaints under the mask, or without one runs image to image from the picture."""
    if family == "flux2":
        if mask is None:
            if strength is not None:
                raise bad_request("strength: FLUX.2 edits without a mask follow the references; strength applies "
                                  "to masked edits", "strength")
            return {"image": images}
        return {"init_image": images[0], "mask": mask, "strength": strength, "image": images[1:] or None}
    if len(images) > 1:
        raise bad_request(f"image: this {family} model edits one image, not {len(images)}", "image")
    return {"init_image": images[0], "mask": mask, "strength": strength}
