"""What `mlximg serve` costs and saves, in one run on this machine: the server's overhead per image against a
direct `pipeline.generate` call (same model, size, steps and seeds; the server in its own process, called with
the official openai client, its calls interleaved with the direct ones so that both see the same machine: run
to run, this 2-core VM's times vary by 30%), the throughput of a warm server against the CLI loading the model for every image,
and the server's memory across 50 requests.

    python scripts/serve_bench.py [--model z-image-digits] [--size 32] [--steps 20] [--repeats 20] [--cli-runs 5]
"""

import argparse
import base64
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    url = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "mlximg", "serve", "--model", model, "--port",
                                url.rsplit(":", 1)[1], "--log-level", "warning"],
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        if process.poll() is not None:
            sys.exit(log.read_text())
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    sys.exit("the server did not start")


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="z-image-digits")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cli-runs", type=int, default=5)
    args = parser.parse_args()
    import httpx
    import openai

    import mlximg

    prompt, settings = "a handwritten seven", dict(width=args.size, height=args.size, steps=args.steps)
    pipeline = mlximg.load(args.model)
    pipeline.generate(prompt, seed=0, **settings)  # loaded and warm, as the server is after its first request

    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    process, url = start_server(args.model, folder / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def served(i: int) -> None:
            response = client.images.generate(model=args.model, prompt=prompt, size=f"{args.size}x{args.size}",
                                              extra_body={"seed": i, "steps": args.steps})
            base64.b64decode(response.data[0].b64_json)

        served(0)
        pairs = [(seconds(lambda: pipeline.generate(prompt, seed=i, **settings)), seconds(lambda: served(i)))
                 for i in range(args.repeats)]
        direct, server = (statistics.median(times) for times in zip(*pairs))
        overhead = statistics.median(b - a for a, b in pairs)
        before = httpx.get(f"{url}/v1/server").json()["memory"]
        for i in range(50):
            served(i)
        after = httpx.get(f"{url}/v1/server").json()["memory"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)

    def cli(i: int) -> None:
        subprocess.run([sys.executable, "-m", "mlximg", "generate", prompt, "--model", args.model, "--seed", str(i),
                        "--width", str(args.size), "--height", str(args.size), "--steps", str(args.steps),
                        "-o", str(folder / f"cli-{i}.png")], check=True, capture_output=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})

    per_cli_image = statistics.median(seconds(lambda: cli(i)) for i in range(args.cli_runs))
    print(f"{args.model}, {args.size}x{args.size}, {args.steps} steps, one image per call; medians of "
          f"{args.repeats} calls (CLI: {args.cli_runs} runs)")
    print(f"direct pipeline.generate  {direct * 1000:8.1f} ms")
    print(f"server (openai client)    {server * 1000:8.1f} ms   overhead {1000 * overhead:+.1f} ms per image "
          f"(median of the pairs' differences; {server / direct:.2f}x)")
    print(f"CLI, loading every time   {per_cli_image * 1000:8.1f} ms   ({per_cli_image / server:.1f}x the warm "
          f"server's time: {60 / server:.0f} vs {60 / per_cli_image:.0f} images a minute)")
    print(f"50 requests: RSS {before['rss'] / 2**20:.1f} -> {after['rss'] / 2**20:.1f} MiB, MLX active "
          f"{before['mlx_active'] / 2**20:.2f} -> {after['mlx_active'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
