"""Reference keys and values for FLUX.2 [klein] KV models: on the first step the reference-image tokens run with
the image tokens, modulated at t = 0 and attending only to themselves, and every block keeps their keys and
values (after RoPE); on later steps only text and image tokens run, attending to the kept references as well.
This is diffusers' Flux2KleinKVPipeline ("extract", then "cached"); the model reaches it through one object
passed to its forward."""

import mlx.core as mx

from ..nn.attention import attention


class LayerKV:
    """One block's reference keys and values, (B, heads, references, head_dim)."""

    def __init__(self, owner: "ReferenceKV"):
        self.owner = owner
        self.keys = self.values = None

    def attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """Attention over [text, references, image] tokens (B, heads, N, head_dim) -> (B, N, heads * head_dim):
        on the first step the references' rows attend among themselves only; later the kept references are
        inserted between text and image."""
        t, r = self.owner.text_tokens, self.owner.count
        if self.keys is None:
            self.keys, self.values = k[:, :, t:t + r], v[:, :, t:t + r]
            others = mx.concatenate([q[:, :, :t], q[:, :, t + r:]], axis=2)
            joint = attention(others, k, v)
            own = attention(q[:, :, t:t + r], self.keys, self.values)
            return mx.concatenate([joint[:, :t], own, joint[:, t:]], axis=1)
        k = mx.concatenate([k[:, :, :t], self.keys, k[:, :, t:]], axis=2)
        v = mx.concatenate([v[:, :, :t], self.values, v[:, :, t:]], axis=2)
        return attention(q, k, v)


class ReferenceKV:
    """The reference keys and values of one generation, block by block. `extracting` until the first forward
    (with the `count` reference tokens placed before the image tokens) has run."""

    def __init__(self, count: int):
        self.count = count
        self.text_tokens = 0
        self.extracting = True
        self.layers: dict[int, LayerKV] = {}

    def layer(self, block) -> LayerKV:
        return self.layers.setdefault(id(block), LayerKV(self))

    def arrays(self) -> list[mx.array]:
        return [a for layer in self.layers.values() for a in (layer.keys, layer.values) if a is not None]

    def modulation(self, mod_img, mod_single, ref_img, ref_single, text_tokens: int, image_tokens: int):
        """On the first step: the references' rows of the image-stream and single-stream modulations take the
        t = 0 ones (`ref_*`); `image_tokens` counts the references, and the single stream runs over [text,
        references, image]."""
        r, n = self.count, image_tokens - self.count
        mod_img = [tuple(_rows((ref, r), (own, n)) for ref, own in zip(ref_set, own_set))
                   for ref_set, own_set in zip(ref_img, mod_img)]
        mod_single = tuple(_rows((own, text_tokens), (ref, r), (own, n)) for ref, own in zip(ref_single, mod_single))
        return mod_img, mod_single


def _rows(*pieces) -> mx.array:
    """(B, 1, dim) modulation rows, each repeated over its count of tokens, one after the other."""
    return mx.concatenate([mx.broadcast_to(a, (a.shape[0], count, a.shape[-1])) for a, count in pieces], axis=1)
