"""``compile.*``: torch.compile per repeated block (parallel/compile.py), checked before anything is built.

    enabled    false        true: each repeated block's forward runs through torch.compile
    backend    inductor     inductor (generated Triton / C++ kernels), aot_eager (AOTAutograd graphs run by
                            eager kernels: the semantics of compilation without code generation, CPU tests),
                            eager (Dynamo capture only)
    mode       null         inductor's mode: null/default, or max-autotune-no-cudagraphs; the CUDA-graph modes
                            (reduce-overhead, max-autotune) are refused: one graph serves every block, and
                            replayed static buffers across blocks and steps are not checked here
    fullgraph  false        true: a graph break inside a block is an error (torch's fullgraph=True)

What combines with it (checked equal to eager, tests/test_compile.py): dp with ZeRO 0, 1 and 2, fp32 and
bf16, ZeRO-2 with the optimizer offloaded to CPU, pp (1F1B, interleaved and zero-bubble schedules: each
stage copy's blocks), activation
checkpointing full / every / offload (the checkpoint's frame stays outside the compiled
forward, whose saved tensors it drops or moves and whose recompute calls the compiled forward again).
What is refused, and why: everything that puts hooks or collectives inside a block, which the graph would
have to trace (tp, cp, ZeRO-3, sync BatchNorm, ep), a per-step Python decision inside a block (pld),
and selective checkpointing (its op policy cannot see inside generated kernels). Parameter offload needs
ZeRO-3, refused above.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from parallel.config.errors import ConfigError

if TYPE_CHECKING:
    from parallel.config.schema import Config

__all__ = ["BACKENDS", "MODES", "check_compile"]

BACKENDS = ("inductor", "aot_eager", "eager")
MODES = (None, "default", "max-autotune-no-cudagraphs")


def _refusals(c: Config) -> list:
    """(what is set, why it cannot be compiled, the fix) for each combination compile refuses."""
    p, z, a = c.parallel, c.zero, c.activation_checkpointing
    out = []
    if p.tp > 1:
        out.append((f"parallel.tp={p.tp}", "tensor parallelism's hooks and collectives (f/g regions, sequence-"
                    "parallel gathers) sit inside the blocks, where the graph would have to trace them",
                    "set parallel.tp=1"))
    if p.cp > 1:
        out.append((f"parallel.cp={p.cp}", "context parallel's ring / Ulysses attention communicates inside "
                    "each block's attention", "set parallel.cp=1"))
    if p.ep > 1:
        out.append((f"parallel.ep={p.ep}", "expert parallelism's all-to-all and data-dependent routing run "
                    "inside the blocks", "set parallel.ep=1"))
    if p.sync_batchnorm:
        out.append(("parallel.sync_batchnorm=true", "sync BatchNorm all-reduces inside the blocks",
                    "set parallel.sync_batchnorm=false"))
    if z.stage == 3:
        out.append(("zero.stage=3", "its per-module forward hooks gather and free parameters inside the "
                    "blocks (and swap their storage between forward and backward)", "use zero.stage 0, 1 or 2"))
    if a.policy == "selective":
        out.append(("activation_checkpointing.policy=selective", "its policy sees the aten ops a block runs "
                    "through a dispatch mode, and inductor's generated kernels do not pass through it",
                    "use policy none, full, every or offload"))
    if c.pld.enabled:
        out.append(("pld.enabled=true", "progressive layer dropping decides per step in Python inside the "
                    "block's forward (a recompile or graph break per decision)", "set pld.enabled=false"))
    return out


def check_compile(c: Config) -> None:
    """Raise :class:`ConfigError` naming the key, the reason and the fix when ``compile`` cannot be applied."""
    k = c.compile
    if k.backend not in BACKENDS:
        raise ConfigError(f"compile.backend={k.backend!r} is not one of {list(BACKENDS)} (inductor generates "
                          f"kernels; aot_eager checks the compiled semantics without code generation)")
    if k.mode not in MODES:
        raise ConfigError(f"compile.mode={k.mode!r} is not one of {list(MODES)}: the CUDA-graph modes "
                          f"(reduce-overhead, max-autotune) are not supported with per-block compile")
    if k.mode is not None and k.backend != "inductor":
        raise ConfigError(f"compile.mode={k.mode!r} is inductor's option, but compile.backend={k.backend!r}: "
                          f"remove compile.mode or use backend: inductor")
    if not k.enabled:
        return
    bad = _refusals(c)
    if bad:
        what, why, fix = bad[0]
        more = f" (also refused: {', '.join(b[0] for b in bad[1:])})" if len(bad) > 1 else ""
        raise ConfigError(f"compile.enabled=true with {what}: {why}. Fix: {fix}, or set compile.enabled=false"
                          f"{more}")
