"""``model.compile``: ``torch.compile`` of the denoiser (UNet or transformer), off by default.

The module's call is compiled in place (``nn.Module.compile``): the module keeps its class, its
parameter names and its state-dict keys (no ``_orig_mod.`` prefix), so exports, checkpoints and
resume see the same names as an uncompiled run. Forward hooks inside it (hcp's LoRA branches)
and gradient checkpointing are traced with it. Only calls with gradients enabled (training) use
the compiled graphs; ``[sample]`` previews and validation (``torch.no_grad``) run eagerly, so they
add no graphs and no compile time.

Bucket sizes: ``dynamic = "auto"`` (the default, torch's own ``dynamic=None``) compiles the first
bucket size specialised and, when a size differs, a graph with the changed sides symbolic (at
most three graphs however many buckets follow); ``dynamic = true`` compiles symbolic sizes from
the start (dynamo still specialises sizes 0 and 1 and may guard on a few divisibility checks, so
a handful of graphs can appear); ``dynamic = false`` compiles one graph per bucket size, each
faster. Symbolic graphs take much longer to compile (an SD 1.5 UNet with LoRA on an H200: 113 s
specialised, over 300 s symbolic), so a one-bucket run is best served by "auto" or false. Either
way at most ``recompile_limit`` graphs are kept (``torch._dynamo.config.recompile_limit``,
``cache_size_limit`` before torch 2.6, set to 16 by default instead of torch's 8); shapes beyond
it run eagerly and
torch warns. Compiling costs minutes on a large model (the first step) and pays off on long runs; the
log reports the first step's time, the compile time and the time of the following steps.
"""
from __future__ import annotations

import logging
import time
from typing import Any, List, Optional

import torch

from ..config.schema import CompileConfig
from ..errors import UserError

log = logging.getLogger("hcp")

#: Steps after the first whose mean time the log compares with the first's.
STEADY_STEPS = 5


def check_backend(options: CompileConfig, device: torch.device) -> None:
    """Refuse clearly, before the model loads, a backend that cannot work on this machine:
    inductor needs a C++ compiler on CPU and triton on CUDA."""
    if options.backend != "inductor":
        return
    other = 'or set model.compile = { backend = "aot_eager" } to only check tracing, or model.compile = false'
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError(f"model.compile: inductor on a CUDA GPU needs triton (pip install triton), {other}")
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - whatever inductor's probe raises, the fix is the same
        raise UserError(f"model.compile: inductor on a CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX "
                        f"set; e.g. apt install g++): {exc}; {other}") from None


def limit_setting() -> str:
    """The name of dynamo's graphs-per-function limit: ``recompile_limit`` (torch >= 2.6; the old
    ``cache_size_limit`` is only an alias there), else ``cache_size_limit``."""
    import torch._dynamo

    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def compile_denoiser(module: torch.nn.Module, options: CompileConfig) -> None:
    """Compile ``module``'s call in place with ``options`` (names and hooks stay as they are)."""
    import torch._dynamo

    # Process-wide: it bounds the graphs of every compiled function (torch's default is 8).
    setattr(torch._dynamo.config, limit_setting(), options.recompile_limit)
    kwargs: dict = {"backend": options.backend, "dynamic": None if options.dynamic == "auto" else options.dynamic}
    if options.backend == "inductor":
        kwargs["mode"] = options.mode
    module.compile(**kwargs)  # sets module._compiled_call_impl, which nn.Module.__call__ uses
    compiled, eager = module._compiled_call_impl, module._call_impl

    def training_calls_only(*args: Any, **kw: Any) -> Any:
        # Previews and validation run without gradients, in eval mode and at other batch sizes:
        # each would compile graphs of its own (minutes each with inductor), so they run eagerly.
        return compiled(*args, **kw) if torch.is_grad_enabled() else eager(*args, **kw)

    module._compiled_call_impl = training_calls_only
    from .sharding import original_class  # FSDP named the class "FSDP<class>"

    own_class = original_class(type(module))
    log.info("torch.compile: %s compiled with backend=%s mode=%s dynamic=%s (at most %d graphs); the first step "
             "compiles it", own_class.__name__, options.backend, options.mode, options.dynamic,
             options.recompile_limit)
    if own_class is not type(module):  # sharded by FSDP (fully_shard)
        log.info("torch.compile with FSDP: each FSDP unit's gather and reshard run eagerly between compiled graphs "
                 "(graph breaks at the unit boundaries)")


class CompileWatch:
    """Logs what compiling costs: the first optimizer step's time and the compile time in it,
    then the mean of the next :data:`STEADY_STEPS` steps; later recompiles (a new bucket size)
    get a line each. Timing comes from an optimizer step hook and torch's compile callbacks, both
    outside the compiled code."""

    def __init__(self, optimizer: Any, cuda_graphs: bool = False) -> None:
        from torch._dynamo.callback import callback_handler

        #: Whether the compiled graphs replay as CUDA graphs (see :meth:`micro_step_begins`).
        self.cuda_graphs = cuda_graphs
        self.compile_seconds = 0.0
        self.graphs = 0
        self.steps: List[float] = []
        self._compile_start: Optional[float] = None
        self._last = time.perf_counter()
        self._start_cb = callback_handler.register_start_callback(self._on_start)
        self._end_cb = callback_handler.register_end_callback(self._on_end)
        base = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
        self._hook = base.register_step_post_hook(self._on_step)

    def _on_start(self, args: Any) -> None:
        self._compile_start = time.perf_counter()

    def _on_end(self, args: Any) -> None:
        if self._compile_start is None:
            return
        seconds = time.perf_counter() - self._compile_start
        self._compile_start = None
        self.compile_seconds += seconds
        if getattr(args.callback_trigger, "name", "") == "DYNAMO":
            self.graphs += 1
            if self.steps:
                log.info("torch.compile: compiled another graph (a new input shape, e.g. a bucket) in %.1f s; "
                         "%d graphs so far", seconds, self.graphs)

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        now = time.perf_counter()
        self.steps.append(now - self._last)
        self._last = now
        if len(self.steps) == 1:
            log.info("torch.compile: the run's first step took %.1f s, %.1f s of it compiling (%d graphs)",
                     self.steps[0], self.compile_seconds, self.graphs)
        elif len(self.steps) == 1 + STEADY_STEPS:
            steady = sum(self.steps[1:]) / STEADY_STEPS
            log.info("torch.compile: the next %d steps took %.3f s each (the first: %.1fx that)", STEADY_STEPS, steady,
                     self.steps[0] / steady if steady > 0 else float("inf"))

    def micro_step_begins(self) -> None:
        """Called before each micro-step's first forward. With CUDA graphs, tells torch where an
        iteration starts, so the graphs may reuse the memory of the last one's outputs (all read by
        now). Without it torch guesses: a compiled call with no backward pending starts one."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def close(self) -> None:
        """Stop watching (the callbacks are process-wide)."""
        from torch._dynamo.callback import callback_handler

        callback_handler.remove_start_callback(self._start_cb)
        callback_handler.remove_end_callback(self._end_cb)
        self._hook.remove()


def setup_compile(models: Any, options: Optional[CompileConfig], optimizer: Any) -> Optional[CompileWatch]:
    """Compile ``models.denoiser`` when ``options`` is set; returns the watch that logs the cost.
    The backend was checked (:func:`check_backend`) before the model loaded."""
    if options is None:
        return None
    compile_denoiser(models.denoiser, options)
    return CompileWatch(optimizer, cuda_graphs=options.cuda_graphs)
