"""How a transformer runs its blocks: the one small protocol through which the caches and the parity capture reach
a model, so that model forwards hold no cache branches.

A forward calls `runner.body(x, signal, run)` once around its block body (`x`: the embedded image tokens;
`signal()`: what TeaCache's modulated mode watches, computed only if it runs; `run(x)`: the body, returning the
image tokens after it) and `runner.stack(name, blocks, h, call)` for each list of blocks (`call(block, h)` runs
one block; `h` an array, or a pair of arrays for dual-stream blocks). The plain runner runs everything.
"""

from .stepcache import StepCache, run_blocks
from .teacache import TeaCache


class BlockRunner:
    """TeaCache (modulated mode) may replace the body by its cached residual; StepCache may replace the middle of a
    stack; `capture`, a list, receives (block name, output) after every block that runs."""

    def __init__(self, teacache: TeaCache | None = None, stepcache: StepCache | None = None,
                 capture: list | None = None):
        self.teacache = teacache if teacache is not None and teacache.config.mode == "modulated" else None
        self.stepcache = stepcache
        self.capture = capture

    def body(self, x, signal, run):
        if self.teacache is None:
            return run(x)
        residual = self.teacache.reuse(signal())
        if residual is not None:
            return x + residual
        out = run(x)
        self.teacache.store(out - x)
        return out

    def stack(self, name: str, blocks: list, h, call, *, reusable: bool = True, record=None):
        """Run `blocks` over `h`. `reusable`: whether StepCache may reuse this stack's middle; `record(h)`: what
        the capture keeps of a block's output (default: all of it)."""
        on_block = None
        if self.capture is not None:
            def on_block(i, out):
                self.capture.append((f"{name}.{i}", out if record is None else record(out)))
        return run_blocks(blocks, h, call, on_block, self.stepcache if reusable else None, name)


PLAIN = BlockRunner()
