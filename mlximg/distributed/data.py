"""Data parallelism: each rank generates a contiguous share of a call's images (its own batch, with a whole model),
and every rank ends with all of them in order, exchanged as PNG files (lossless, parameters included)."""

import io
import json

import mlx.core as mx
import numpy as np


def share(count: int, rank: int, size: int) -> range:
    """The images rank `rank` of `size` makes: contiguous, the first `count % size` ranks one more."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_bytes(blobs: list[bytes], per_rank: int, group: mx.distributed.Group) -> list[bytes]:
    """Every rank's `blobs` (at most `per_rank` each), on every rank, in rank order."""
    lengths = np.zeros(per_rank, np.int32)
    lengths[:len(blobs)] = [len(blob) for blob in blobs]
    all_lengths = np.array(mx.distributed.all_gather(mx.array(lengths), group=group)).tolist()
    buffer = np.zeros((per_rank, max(all_lengths, default=0) or 1), np.uint8)
    for i, blob in enumerate(blobs):
        buffer[i, :len(blob)] = np.frombuffer(blob, np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(buffer), group=group))
    return [rows[i, :length].tobytes() for i, length in enumerate(all_lengths) if length]


def generate_shared(pipeline, prompt, seeds: list[int], group: mx.distributed.Group, **settings) -> list:
    """The images of `prompt` (one, or one per seed) for `seeds`, made across the group's ranks; each image is
    what a single process gives for its share's batch, bit for bit."""
    from PIL import Image

    from ..output import image_bytes

    size, rank = group.size(), group.rank()
    mine = share(len(seeds), rank, size)
    prompts = prompt if isinstance(prompt, list) else [prompt] * len(seeds)
    images = pipeline.generate([prompts[i] for i in mine], seed=[seeds[i] for i in mine],
                               **settings) if len(mine) else []
    gathered = []
    for blob in gather_bytes([image_bytes(image) for image in images], -(-len(seeds) // size), group):
        image = Image.open(io.BytesIO(blob))
        image.load()
        image.info["parameters"] = json.loads(image.text["parameters"])
        gathered.append(image)
    return gathered
