"""`mlximg serve` as users run it: a real uvicorn process on a free loopback port, serving the embedded
z-image-digits model, called with the official `openai` client and with plain `httpx`. The images must be the
ones a direct `pipeline.generate` call gives and read as the prompted digit; bad requests are refused in OpenAI's
error shape before any job is queued; a full queue answers 429, a client that leaves cancels its job, and a
bounded load leaves memory flat and the server answering."""

import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
from PIL import Image

import mlximg
from test_digits_model import classifier, pipeline  # noqa: F401 - the embedded model and the digit classifier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import digits  # noqa: E402

MODEL = "z-image-digits"
KEY = "test-key-123"
SLOW = {"steps": 400, "size": "64x64"}  # a run of several seconds, to leave or to queue behind


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`mlximg serve` in a subprocess, stopped with SIGTERM as a service manager would."""

    def __init__(self, log: Path, *args: str, api_key: str | None = None):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.log = log
        env = {**os.environ, "MLXIMG_API_KEY": api_key or ""}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlximg", "serve", "--port", self.url.rsplit(":", 1)[1], *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not start:\n{log.read_text()}")

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **options)

    def post(self, path: str, headers: dict | None = None, **options) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", headers={**self.headers, **(headers or {})}, timeout=120, **options)

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/server", headers=self.headers, timeout=10).json()

    def wait_idle(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while (status := self.status())["queue"]["running"] is not None or status["queue"]["waiting"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        return status

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it: a clean shutdown (uvicorn re-raises the signal after it)."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        assert self.process.returncode in (0, -signal.SIGTERM), self.log.read_text()
        assert "Application shutdown complete" in self.log.read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    loras = root / "loras"
    loras.mkdir()
    write_lora(loras / "sharp.safetensors")
    running = Server(root / "server.log", "--model", MODEL, "--max-queue", "2", "--max-body-mb", "1",
                     "--lora-dir", str(loras))
    yield running
    running.stop()


def write_lora(path: Path) -> None:
    """A rank-4 LoRA on the first block's attention, in diffusers' file format."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name in ("to_q", "to_k", "to_v"):
        module = f"transformer.layers.0.attention.{name}"
        tensors[f"{module}.lora_A.weight"] = mx.array(rng.standard_normal((4, 128)).astype(np.float32) * 0.3)
        tensors[f"{module}.lora_B.weight"] = mx.array(rng.standard_normal((128, 4)).astype(np.float32) * 0.3)
    mx.save_safetensors(str(path), tensors)


def decoded(b64_json: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64_json)))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- what a client gets ------------------------------------------------------------------------------------------


def test_openai_client_generates_the_prompted_digits(server, pipeline, classifier):
    """client.images.generate: n images as one batch, each the image a direct call gives for its seed (pixel for
    pixel), read as the prompted digit, with its parameters in the PNG."""
    client = server.client()
    images, labels = [], []
    for label in (3, 7, 0):
        prompt = f"a handwritten {digits.WORDS[label]}"
        response = client.images.generate(model=MODEL, prompt=prompt, n=2, size="32x32", extra_body={"seed": 11})
        assert len(response.data) == 2 and response.size == "32x32" and response.created > 0
        served = [decoded(item.b64_json) for item in response.data]
        direct = pipeline.generate(prompt, seed=11, num_images=2)
        for ours, expected in zip(served, direct):
            assert np.array_equal(pixels(ours), pixels(expected))
        parameters = json.loads(served[1].text["parameters"])
        assert parameters["prompt"] == prompt and parameters["seed"] == 12 and parameters["steps"] == 20
        images += [image.convert("RGB") for image in served]
        labels += [label, label]
    predicted = classifier.predict(digits.images_to_features(images))
    assert (predicted == np.array(labels)).sum() >= 5, (predicted.tolist(), labels)


def test_mlximg_fields_formats_and_urls(server, pipeline):
    """steps / guidance / negative_prompt go through; jpeg and webp carry the parameters; `url` answers are served
    from the server; OpenAI fields this engine has no use for are accepted."""
    body = {"prompt": "the digit five", "seed": 4, "steps": 8, "guidance": 3.0, "negative_prompt": "a blur",
            "quality": "high", "background": "auto", "moderation": "low", "style": "vivid", "user": "u1"}
    response = server.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    expected = pipeline.generate("the digit five", seed=4, steps=8, guidance=3.0, negative_prompt="a blur")
    assert np.array_equal(pixels(decoded(response.json()["data"][0]["b64_json"])), pixels(expected))
    for output_format in ("jpeg", "webp"):
        response = server.post("/v1/images/generations", json={**body, "output_format": output_format,
                                                               "output_compression": 80, "response_format": "url"})
        assert response.status_code == 200, response.text
        url = response.json()["data"][0]["url"]
        assert url.startswith(server.url) and url.endswith(f".{output_format}")
        fetched = httpx.get(url, headers=server.headers)
        assert fetched.headers["content-type"] == f"image/{output_format}"
        with Image.open(io.BytesIO(fetched.content)) as image:
            assert image.format == output_format.upper()
            assert json.loads(image.getexif()[0x010E])["steps"] == 8
    missing = httpx.get(f"{server.url}/v1/images/files/nothing-here.png", headers=server.headers)
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_edits_inpaint_and_img2img_with_the_openai_client(server, pipeline, classifier):
    """client.images.edit with OpenAI's mask (transparent = repaint) repaints that half as the engine's white mask
    does; without a mask, Z-Image runs image to image."""
    images, labels = digits.rendered_digits()
    one = Image.fromarray(images[np.flatnonzero(labels == 1)[0]]).convert("RGB")
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 0, 32, 32))  # the right half transparent
    engine_mask = np.zeros((32, 32), np.uint8)
    engine_mask[:, 16:] = 255
    client = server.client()
    served = []
    for seed in range(3):
        response = client.images.edit(model=MODEL, image=("one.png", png(one), "image/png"),
                                      mask=("mask.png", png(mask), "image/png"), prompt="a handwritten four",
                                      extra_body={"seed": seed})
        served.append(decoded(response.data[0].b64_json).convert("RGB"))
        expected = pipeline.generate("a handwritten four", init_image=one, mask=engine_mask, seed=seed)
        assert np.array_equal(pixels(served[-1]), pixels(expected))
    assert (classifier.predict(digits.images_to_features(served)) == 4).sum() >= 2
    response = client.images.edit(model=MODEL, image=[("one.png", png(one), "image/png")],
                                  prompt="a handwritten eight", extra_body={"seed": 1, "strength": 0.8})
    expected = pipeline.generate("a handwritten eight", init_image=one, strength=0.8, seed=1)
    assert np.array_equal(pixels(decoded(response.data[0].b64_json)), pixels(expected))


def test_loras_from_the_server_folder(server, pipeline, tmp_path):
    """A request's LoRA gives the image the pipeline gives with it; the next request without it is back to the
    plain model; names outside the folder are refused."""
    write_lora(tmp_path / "sharp.safetensors")
    with_lora = server.post("/v1/images/generations", json={"prompt": "a handwritten two", "seed": 2,
                                                            "loras": [{"name": "sharp.safetensors", "scale": 0.8}]})
    assert with_lora.status_code == 200, with_lora.text
    expected = pipeline.generate("a handwritten two", seed=2, loras=[(tmp_path / "sharp.safetensors", 0.8)])
    plain = pipeline.generate("a handwritten two", seed=2, loras=[])
    assert np.array_equal(pixels(decoded(with_lora.json()["data"][0]["b64_json"])), pixels(expected))
    assert not np.array_equal(pixels(expected), pixels(plain))
    without = server.post("/v1/images/generations", json={"prompt": "a handwritten two", "seed": 2})
    assert np.array_equal(pixels(decoded(without.json()["data"][0]["b64_json"])), pixels(plain))
    for name in ("../server.log", "/etc/passwd", "missing.safetensors"):
        response = server.post("/v1/images/generations", json={"prompt": "a two", "loras": [{"name": name}]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "loras", (name, response.text)


def test_models_list(server):
    models = {model.id: model for model in server.client().models.list()}
    assert MODEL in models and "z-image-turbo" in models and "flux2-klein-4b" in models
    assert models[MODEL].model_extra["loaded"] is True


def test_streaming_events(server, pipeline):
    """stream: true answers server-sent events: a progress event per step in order, the partial images asked
    for, then the final image (the direct call's)."""
    events = []
    with httpx.stream("POST", f"{server.url}/v1/images/generations", headers=server.headers, timeout=60,
                      json={"prompt": "a handwritten six", "seed": 9, "steps": 6, "stream": True,
                            "partial_images": 2}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [event["type"] for event in events]
    progress = [event["step"] for event in events if event["type"] == "image_generation.progress"]
    assert progress == list(range(1, 7)) and all(e.get("total", 6) == 6 for e in events)
    partials = [event for event in events if event["type"] == "image_generation.partial_image"]
    assert [p["partial_image_index"] for p in partials] == [0, 1] and decoded(partials[0]["b64_json"]).size == (32, 32)
    assert kinds[-1] == "image_generation.completed" and kinds.count("image_generation.completed") == 1
    expected = pipeline.generate("a handwritten six", seed=9, steps=6)
    assert np.array_equal(pixels(decoded(events[-1]["b64_json"])), pixels(expected))


# -- what is refused ---------------------------------------------------------------------------------------------


BAD_GENERATIONS = [
    ({"n": 1}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a one", "n": 0}, "n"),
    ({"prompt": "a one", "n": 11}, "n"),
    ({"prompt": "a one", "size": "big"}, "size"),
    ({"prompt": "a one", "size": "33x32"}, "size"),
    ({"prompt": "a one", "size": "32x99999"}, "size"),
    ({"prompt": "a one", "model": "no-such-model"}, "model"),
    ({"prompt": "a one", "model": "/etc"}, "model"),
    ({"prompt": "a one", "steps": 0}, "steps"),
    ({"prompt": "a one", "steps": 100000}, "steps"),
    ({"prompt": "a one", "seed": -1}, "seed"),
    ({"prompt": "a one", "seed": 2**64}, "seed"),
    ({"prompt": "a one", "response_format": "gif"}, "response_format"),
    ({"prompt": "a one", "output_format": "bmp"}, "output_format"),
    ({"prompt": "a one", "output_compression": 101}, "output_compression"),
    ({"prompt": "a one", "partial_images": 9}, "partial_images"),
    ({"prompt": "a one", "loras": [{"name": "x", "scale": "big"}]}, "loras.0.scale"),
]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def test_bad_requests_are_refused_before_any_work(server):
    before = server.wait_idle()["jobs"]
    for body, param in BAD_GENERATIONS:
        assert_openai_error(server.post("/v1/images/generations", json=body), 400, param)
    for raw in (b"{not json", b'{"prompt": "a one", "guidance": NaN}', b'{"prompt": "a one", "guidance": Infinity}',
                b'["a list"]'):
        assert_openai_error(server.post("/v1/images/generations", content=raw,
                                        headers={"content-type": "application/json"}), 400)
    error = assert_openai_error(server.post("/v1/images/generations", content=b"x" * (2 * 2**20)), 413)
    assert "bytes" in error["message"]

    def chunks():
        for _ in range(40):
            yield b"y" * 65536

    assert_openai_error(server.post("/v1/images/generations", content=chunks()), 413)
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing", headers=server.headers), 404)
    assert server.status()["jobs"] == before, "a bad request reached the queue"


def test_bad_edits(server):
    before = server.wait_idle()["jobs"]
    image = png(Image.new("RGB", (32, 32), "white"))
    opaque = png(Image.new("RGBA", (32, 32), (0, 0, 0, 255)))
    cases = [
        ({"image": ("a.png", b"not an image", "image/png")}, {}, "image"),
        ({"image": ("a.png", image[:40], "image/png")}, {}, "image"),
        ({"image": ("a.png", b"", "image/png")}, {}, "image"),
        ({}, {}, "image"),
        ({"image": ("a.png", image, "image/png"), "mask": ("m.png", png(Image.new("RGBA", (16, 32))), "image/png")},
         {}, "mask"),
        ({"image": ("a.png", image, "image/png"), "mask": ("m.png", png(Image.new("L", (32, 32))), "image/png")},
         {}, "mask"),
        ({"image": ("a.png", image, "image/png"), "mask": ("m.png", opaque, "image/png")}, {}, "mask"),
        ({"image": ("a.png", image, "image/png")}, {"n": "0"}, "n"),
        ({"image": ("a.png", image, "image/png")}, {"strength": "1.5"}, "strength"),
        ({"image": ("a.png", image, "image/png")}, {"size": "31x32"}, "size"),
        ({"image[]": [("a.png", image, "image/png"), ("b.png", image, "image/png")]}, {}, "image"),
    ]
    for files, fields, param in cases:
        multipart = [(key, value) for key, values in files.items()
                     for value in (values if isinstance(values, list) else [values])]
        response = server.post("/v1/images/edits", files=multipart or None,
                               data={"prompt": "a four", **fields} if multipart else None,
                               content=None if multipart else b"")
        assert_openai_error(response, 400, param if multipart else None)
    assert server.status()["jobs"] == before, "a bad edit reached the queue"


def test_a_full_queue_answers_429_with_retry_after(server):
    """One job runs and two wait (--max-queue 2): a fourth and fifth request at that moment get 429."""
    server.wait_idle()
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        futures = []
        for _ in range(5):
            futures.append(pool.submit(server.post, "/v1/images/generations",
                                       json={"prompt": "a one", **SLOW, "steps": 60}))
            time.sleep(0.3)
        responses = [future.result() for future in futures]
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 200, 200, 429, 429], statuses
    for response in responses:
        if response.status_code == 429:
            assert_openai_error(response, 429)
            assert int(response.headers["Retry-After"]) >= 1


def test_a_client_that_leaves_cancels_its_job(server):
    """A streaming client gone after the first step, and a plain one that gives up waiting: each job stops within
    a few steps, and the next request is served."""
    start = server.wait_idle()["jobs"]["cancelled"]
    with httpx.stream("POST", f"{server.url}/v1/images/generations", headers=server.headers, timeout=60,
                      json={"prompt": "a one", **SLOW, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["step"] >= 1:
                break
    status = server.wait_idle(timeout=30)
    assert status["jobs"]["cancelled"] == start + 1, status
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", headers=server.headers, timeout=1.5,
                   json={"prompt": "a one", **SLOW})
    status = server.wait_idle(timeout=30)
    assert status["jobs"]["cancelled"] == start + 2, status
    response = server.post("/v1/images/generations", json={"prompt": "a handwritten one", "seed": 1})
    assert response.status_code == 200


def test_bounded_load_leaves_memory_flat(server):
    """60 requests from 6 clients at once: each answered 200 or 429, never 5xx; MLX's active memory is what the
    loaded model holds before and after; the process's RSS grows by less than a few images' worth of buffers;
    the server still answers."""
    server.wait_idle()
    for _ in range(3):  # the allocator's working set for this size settles
        server.post("/v1/images/generations", json={"prompt": "a handwritten nine", "size": "64x64", "n": 2,
                                                    "steps": 8})
    before = server.wait_idle()["memory"]

    def client(index: int) -> list[int]:
        """Ten requests, each retried after a 429 (sooner than Retry-After says, to keep the queue full)."""
        codes = []
        with httpx.Client(headers=server.headers, timeout=120) as http:
            for request in range(10):
                for _ in range(100):
                    response = http.post(f"{server.url}/v1/images/generations",
                                         json={"prompt": f"a handwritten {digits.WORDS[request]}", "size": "64x64",
                                               "n": 2, "steps": 8, "seed": index * 10 + request})
                    codes.append(response.status_code)
                    if response.status_code != 429:
                        break
                    time.sleep(min(float(response.headers["Retry-After"]) / 4, 1.0))
        return codes

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = [code for codes in pool.map(client, range(6)) for code in codes]
    seconds = time.monotonic() - started
    assert set(codes) <= {200, 429} and codes.count(200) == 60, codes
    after = server.wait_idle()["memory"]
    assert after["mlx_active"] == before["mlx_active"], (before, after)
    if before["rss"] is not None:
        assert after["rss"] - before["rss"] < 64 * 2**20, (before, after, seconds)
    assert httpx.get(f"{server.url}/health").status_code == 200


# -- a second server: auth, time limits, engine failures and the memory budget ------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """An API key, a 3 s time limit, and a budget of about one digits model with two served: the second
    loaded at start closes the first. The second is a copy of the model with a NaN weight."""
    root = tmp_path_factory.mktemp("guarded")
    broken = root / "broken-digits"
    import shutil

    shutil.copytree(mlximg.manifests.resolve(MODEL).path, broken)
    weights_file = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = mx.load(str(weights_file))
    weights["layers.0.attention.to_q.weight"] = mx.full(weights["layers.0.attention.to_q.weight"].shape, mx.nan,
                                                        mx.bfloat16)
    mx.save_safetensors(str(weights_file), weights)
    running = Server(root / "server.log", "--model", MODEL, "--model", str(broken), "--timeout", "3",
                     "--memory-budget", "0.012", api_key=KEY)
    running.broken = str(broken)
    yield running
    running.stop()


def test_api_key(guarded):
    body = {"prompt": "a handwritten one", "steps": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        response = httpx.post(f"{guarded.url}/v1/images/generations", json=body, headers=headers)
        assert_openai_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    assert_openai_error(httpx.get(f"{guarded.url}/v1/models"), 401)
    assert_openai_error(httpx.post(f"{guarded.url}/v1/images/generations", content=b"{bad"), 401)
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    response = guarded.client().images.generate(model=MODEL, prompt="a handwritten one", extra_body={"steps": 4})
    assert decoded(response.data[0].b64_json).size == (32, 32)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="a one")


def test_memory_budget_closes_the_least_recently_used_model(guarded):
    status = guarded.wait_idle()
    assert status["memory_budget"] < 2 * max(status["models"].values() or [1])
    guarded.post("/v1/images/generations", json={"prompt": "a one", "model": MODEL, "steps": 2})
    closed = guarded.status()["models_closed"]
    assert list(guarded.status()["models"]) == [MODEL]
    error = assert_openai_error(guarded.post("/v1/images/generations",
                                             json={"prompt": "a one", "model": guarded.broken, "steps": 2}), 500)
    assert "NaN" in error["message"] and "layers.0.attention.to_q.weight" in error["message"]
    status = guarded.status()
    assert list(status["models"]) == [guarded.broken] and status["models_closed"] == closed + 1
    response = guarded.post("/v1/images/generations", json={"prompt": "a one", "model": MODEL, "steps": 2})
    assert response.status_code == 200, "an engine failure must not stop the server"


def test_request_time_limit(guarded):
    started = time.monotonic()
    response = guarded.post("/v1/images/generations", json={"prompt": "a one", "model": MODEL, **SLOW})
    assert_openai_error(response, 504)
    assert time.monotonic() - started < 10
    assert guarded.wait_idle(timeout=30)["jobs"]["timed_out"] == 1
