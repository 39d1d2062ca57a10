"""How a transformer runs its blocks: the one small protocol through which the caches and the parity capture reach
a model, so that model forwards hold no cache branches.

A forward calls `runner.body(x, signal, run)` once around its block body (`x`: the embedded image tokens;
`signal()`: what TeaCache's modulated mode watches, computed only if it runs; `run(x)`: the body, returning the
image tokens after it) and `runner.stack(name, blocks, h, call)` for each list of blocks (`call(block, h)` runs
one block; `h` an array, or a pair of arrays for dual-stream blocks, image first). The plain runner runs
everything.
"""

from .stepcache import StepCache, run_blocks
from .teacache import IN_MODEL, TeaCache


class _Reuse(Exception):
    """Raised after the first block when the first-block cache reuses the rest: carries the body's output."""

    def __init__(self, out):
        super().__init__("first-block cache hit")
        self.out = out


class _FirstBlock:
    """The body's input while the first block has not yet run, then that block's image output (None where the
    first stack's output is not the image tokens alone, e.g. a model with no image-only first block)."""

    def __init__(self, x):
        self.x, self.image, self.pending = x, None, True


class BlockRunner:
    """TeaCache (modulated and first_block modes) may replace the body by its cached residual; StepCache may
    replace the middle of a stack; `capture`, a list, receives (block name, output) after every block that
    runs."""

    def __init__(self, teacache: TeaCache | None = None, stepcache: StepCache | None = None,
                 capture: list | None = None):
        self.teacache = teacache if teacache is not None and teacache.config.mode in IN_MODEL else None
        self.stepcache = stepcache
        self.capture = capture
        self.first_block = None

    def body(self, x, signal, run):
        if self.teacache is None:
            return run(x)
        if self.teacache.config.mode == "first_block":
            return self._first_block_body(x, run)
        residual = self.teacache.reuse(signal())
        if residual is not None:
            return x + residual
        out = run(x)
        self.teacache.store(out - x)
        return out

    def _first_block_body(self, x, run):
        self.first_block = probe = _FirstBlock(x)
        try:
            out = run(x)
        except _Reuse as reuse:
            return reuse.out
        finally:
            self.first_block = None
        if probe.image is not None:
            self.teacache.store(out - probe.image)
        return out

    def _after_first_block(self, h) -> None:
        """Decide from the first block's residual; raise _Reuse with the body's output when the cache is used."""
        probe = self.first_block
        probe.pending = False
        image = h[0] if isinstance(h, tuple) else h
        if image.shape != probe.x.shape:  # no residual to compare: every step computes
            self.teacache.reuse(None)
            return
        probe.image = image
        cached = self.teacache.reuse(image - probe.x)
        if cached is not None:
            raise _Reuse(image + cached)

    def stack(self, name: str, blocks: list, h, call, *, reusable: bool = True, record=None):
        """Run `blocks` over `h`. `reusable`: whether StepCache may reuse this stack's middle; `record(h)`: what
        the capture keeps of a block's output (default: all of it)."""
        hooks = []
        if self.capture is not None:
            hooks.append(lambda i, out: self.capture.append((f"{name}.{i}", out if record is None else record(out))))
        if self.first_block is not None and self.first_block.pending:
            hooks.append(lambda i, out: self._after_first_block(out) if i == 0 else None)

        def on_block(i, out):
            for hook in hooks:
                hook(i, out)

        return run_blocks(blocks, h, call, on_block if hooks else None, self.stepcache if reusable else None, name)


PLAIN = BlockRunner()
