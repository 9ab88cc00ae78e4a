"""Options and statistics of the Jacobi sampler, which inverts a flow block by parallel fixed-point
iterations instead of one token per transformer pass (FlowBlock.reverse_jacobi; docs/DESIGN.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Jacobi:
    """Options of the Jacobi sampler (docs/DESIGN.md section 6; FlowBlock.reverse_jacobi inverts one block).

    Defaults measured with benchmarks/bench_sample.py (README, "Benchmarks"). On the default job's model they
    make 3.3x fewer sequential passes than the sequential sampler, keep the images within 1e-3 of its images and
    leave the embedded FID unchanged (seed-to-seed spread: 2.1). They pay for this with 14.5x the FLOPs, so they
    win where a pass costs its latency rather than its FLOPs: small batches, GPUs. On a compute-bound CPU,
    sequential_blocks=1 and chunks of 8-16 tokens do fewer FLOPs.
    """

    tol: float = 1e-3  # a chunk stops when max |dx| < tol (0: only at max_iters or its length, i.e. exact)
    chunk: int | None = None  # input positions per chunk (None: all N - 1 of a block at once)
    max_iters: int | None = None  # iterations per chunk at most (None: the chunk's length, where it is exact)
    sequential_blocks: int = 0  # the first this many generated blocks (T, T - 1, ...) run the sequential sampler
    # Under bf16 autocast: after a block's bf16 iterations, float32 iterations start from their result and run until
    # tol holds in float32 (a mixed-precision fixed point: the cheap passes do most of the way, the result is the
    # float32 solution's). Their passes are counted in SampleStats too. No effect in float32.
    refine: bool = True
    # The bf16 iterations stop at max(tol, coarse_tol). bfloat16's rounding (8 significant bits) keeps its iterates
    # from settling much below a few 1e-2 (iterates of |x| ~ 4), so a finer coarse_tol spends bf16 passes on noise
    # that the float32 iterations then undo. Measured (benchmarks/bench_precision.py --coarse-tols, two trained
    # fmnist flows, 100 samples, tol 1e-3): total passes over the 4 blocks at coarse_tol 0.01 / 0.03 / 0.1 were
    # 123 / 61 / 54 and 185 / 89 / 62, against 48 and 54 in float32 alone. The answer does not depend on it: the
    # float32 iterations run to tol (images 0.0003-0.0005 from the float32 sequential sampler's, latents; 0.0022,
    # pixels, as float32 Jacobi's 0.0019).
    coarse_tol: float = 0.1

    def __post_init__(self) -> None:
        if not self.tol >= 0:
            raise ValueError(f"Jacobi tol must be >= 0 (0 = exact), got {self.tol}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"Jacobi chunk must be >= 1 token (or None for the whole block), got {self.chunk}")
        if self.max_iters is not None and self.max_iters < 1:
            raise ValueError(f"Jacobi max_iters must be >= 1 (or None for the chunk's length), got {self.max_iters}")
        if not self.coarse_tol >= 0:
            raise ValueError(f"Jacobi coarse_tol must be >= 0, got {self.coarse_tol}")
        if self.sequential_blocks < 0:
            raise ValueError(f"Jacobi sequential_blocks must be >= 0, got {self.sequential_blocks}")


def as_sampler(sampler: str | Jacobi) -> Jacobi | None:
    """"sequential" -> None, "jacobi" -> Jacobi() (the defaults), a Jacobi -> itself."""
    if isinstance(sampler, Jacobi):
        return sampler
    if sampler == "sequential":
        return None
    if sampler == "jacobi":
        return Jacobi()
    raise ValueError(f"unknown sampler {sampler!r}; expected 'sequential', 'jacobi' or a Jacobi(...)")


@dataclass
class SampleStats:
    """Sequential transformer passes of a reverse, per block in generation order (block T first).

    iters[b] lists the iterations of every chunk of block blocks[b] (1-indexed), over all `batches` merged in.
    A block inverted sequentially counts N - 1 chunks of one iteration: one pass per token.
    """

    blocks: list[int]
    sequential: list[bool]
    iters: list[list[int]]
    batches: int = 1

    def mean(self) -> list[float]:
        """Mean iterations per chunk, per block."""
        return [sum(it) / len(it) for it in self.iters]

    def max(self) -> list[int]:
        """Most iterations of a chunk, per block."""
        return [max(it) for it in self.iters]

    def passes(self) -> list[float]:
        """Sequential transformer passes per block and batch (the sequential sampler: N - 1)."""
        return [sum(it) / self.batches for it in self.iters]

    def merge(self, other: SampleStats) -> SampleStats:
        """The statistics of both runs' batches (same model and sampler)."""
        if other.blocks != self.blocks:
            raise ValueError(f"cannot merge statistics of blocks {other.blocks} into {self.blocks}")
        return SampleStats(self.blocks, self.sequential, [a + b for a, b in zip(self.iters, other.iters)],
                           self.batches + other.batches)

    def summary(self) -> str:
        """One line per block."""
        lines = []
        for t, seq, mean, most, passes, it in zip(self.blocks, self.sequential, self.mean(), self.max(),
                                                  self.passes(), self.iters):
            if seq:
                lines.append(f"block {t}: sequential, {passes:.0f} passes")
            else:
                chunks = len(it) // self.batches
                lines.append(f"block {t}: jacobi, {chunks} chunk{'s' * (chunks != 1)}, iterations per chunk mean "
                             f"{mean:.2f} max {most}, {passes:.1f} passes")
        return "\n".join(lines)
