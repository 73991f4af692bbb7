"""``model.compile``: the denoiser compiled in place keeps its names, its LoRA hooks and gradient
checkpointing, serves several bucket sizes without a graph per size, and logs its cost; a backend
that cannot work on the machine is refused before the model loads; the config is validated.

Compiling the demo UNet takes minutes on a loaded 2-core machine, so the compiled module here is
a small convolutional denoiser with the same ingredients (LoRA forward hooks on a Conv2d and a
Linear, a non-reentrant checkpointed block, spatial sizes that change), traced by dynamo with
the ``eager`` backend. Inductor itself (C++ code on CPU, triton on CUDA) is not run by the tests.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hcp_core import cli
from hcp_core.config.schema import CompileConfig
from hcp_core.errors import UserError
from hcp_core.train.compile import CompileWatch, check_backend, compile_denoiser, limit_setting
from plugins.adapters.lora.layer import LoraBranch, attach_branch
from train_support import pipeline_toml, write_pipeline


class TinyDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.block = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.proj = nn.Linear(8, 8)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        h = h + checkpoint(self.block, h, use_reentrant=False)  # what gradient checkpointing does
        h = self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_out(h)


#: dynamo only: the hooks and the checkpoint are traced as inductor would see them, without
#: AOTAutograd's and inductor's code generation (tens of seconds more on a loaded 2-core machine).
BACKEND = "eager"


def _with_lora() -> nn.Module:
    torch.manual_seed(0)
    model = TinyDenoiser()
    model.requires_grad_(False)
    for name in ("conv_in", "proj"):
        branch = LoraBranch(getattr(model, name), rank=2, alpha=2.0)
        nn.init.normal_(branch.up.weight)  # a non-zero update, so the hook's output shows
        attach_branch(getattr(model, name), branch)
    return model


def _step(model: nn.Module, shape: tuple) -> tuple:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    out = model(x)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("dynamic", [True, "auto"])
def test_compiled_denoiser_keeps_names_hooks_and_checkpointing_across_bucket_sizes(caplog, request, dynamic) -> None:
    import torch._dynamo

    # Restored by hand: torch's config module refuses pytest's monkeypatch undo of this setting.
    limit = limit_setting()
    request.addfinalizer(lambda before=getattr(torch._dynamo.config, limit): setattr(torch._dynamo.config, limit, before))
    torch._dynamo.reset()  # dynamo remembers which sizes changed per code object, across tests
    eager, compiled = _with_lora(), _with_lora()
    names = list(eager.state_dict())
    trained = [p for p in compiled.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.0)  # lr 0: the weights stay equal to the eager copy's
    caplog.set_level(logging.INFO, logger="hcp")
    compile_denoiser(compiled, CompileConfig(backend=BACKEND, dynamic=dynamic, recompile_limit=4))
    watch = CompileWatch(optimizer)
    try:
        for shape in [(2, 4, 8, 8), (2, 4, 8, 12), (2, 4, 16, 8)]:  # three buckets
            want, want_grads = _step(eager, shape)
            got, got_grads = _step(compiled, shape)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            eager.zero_grad(set_to_none=True)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), shape
            assert sorted(got_grads) == sorted(want_grads) and len(got_grads) == 4  # both LoRA branches train
            for key in want_grads:
                assert torch.allclose(got_grads[key], want_grads[key], atol=1e-5, rtol=1e-5), key
        graphs = watch.graphs
        with torch.no_grad():  # a preview: another batch size, no gradients -> eager, no new graph
            assert torch.allclose(compiled(torch.ones(3, 4, 16, 16)), eager(torch.ones(3, 4, 16, 16)), atol=1e-5)
        assert watch.graphs == graphs
        assert getattr(torch._dynamo.config, limit) == 4  # recompile_limit
    finally:
        watch.close()
    # In place: the same class, the same state-dict keys (exports and checkpoints match an eager run).
    assert type(compiled) is TinyDenoiser and list(compiled.state_dict()) == names
    assert not any("_orig_mod" in n for n, _ in compiled.named_parameters())
    # Symbolic sizes (dynamic = true): three buckets, at most two graphs (one, or two where dynamo
    # guards on a size). "auto": the first size specialised, then a graph with the width symbolic,
    # then one with both sides symbolic, which serves every further size.
    if dynamic is True:
        assert 1 <= watch.graphs <= 2
    else:
        assert watch.graphs == 3
        got, _ = _step(compiled, (2, 4, 12, 16))  # a fourth bucket: no new graph
        assert watch.graphs == 3
    assert watch.compile_seconds > 0
    log = caplog.text
    assert f"torch.compile: TinyDenoiser compiled with backend={BACKEND}" in log
    assert "torch.compile: the run's first step took" in log and "s of it compiling" in log


def test_a_compiled_run_exports_the_same_names_and_values_and_resumes(tmp_path, demo_model_dir, demo_data_dir) -> None:
    """The demo UNet compiled (dynamo, one fixed bucket): its LoRA export has the uncompiled run's
    keys and values, and resuming it (a new UNet compiled in the same process) continues exactly."""
    import hcp_core
    from safetensors.torch import load_file

    bucket = '{ type = "fixed", target_size = [64, 64] }'

    def cfg(name: str, steps: int) -> object:
        return write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / name, max_steps=steps,
                                                      bucket=bucket), f"{name}.toml")

    compiled = [f'model.compile={{ backend = "{BACKEND}", dynamic = false }}']
    hcp_core.run(hcp_core.load_config(cfg("plain", 2)))
    hcp_core.run(hcp_core.load_config(cfg("compiled", 1), compiled))
    hcp_core.run(hcp_core.load_config(cfg("compiled", 2), compiled), resume="latest")  # max_steps may grow on resume
    plain, comp = (load_file(str(tmp_path / n / "lora.safetensors")) for n in ("plain", "compiled"))
    assert sorted(comp) == sorted(plain) and not any("_orig_mod" in k for k in comp)
    for key in plain:
        assert torch.allclose(comp[key], plain[key], atol=1e-6, rtol=0), key
    log = (tmp_path / "compiled" / "train.log").read_text()
    assert "resumed from" in log and log.count("torch.compile: the run's first step took") == 2


def test_a_compiler_that_cannot_work_is_refused_before_training(tmp_path, demo_model_dir, demo_data_dir, monkeypatch,
                                                                capsys) -> None:
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(UserError, match="inductor on a CPU needs a C\\+\\+ compiler"):
        check_backend(CompileConfig(), torch.device("cpu"))
    check_backend(CompileConfig(backend="aot_eager"), torch.device("cpu"))  # tracing only: no compiler needed
    exp = tmp_path / "exp"
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, max_steps=1))
    assert cli.main(["run", str(cfg), "model.compile=true"]) == 2
    err = capsys.readouterr().err
    assert "model.compile: inductor on a CPU needs a C++ compiler" in err and 'backend = "aot_eager"' in err
    assert not (exp / "checkpoints").exists()


def test_compile_config_forms_and_errors(tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    from hcp_core.config import load_config
    from hcp_core.config.schema import compile_options

    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=1))
    assert compile_options(load_config(cfg).model.compile) is None  # off by default
    assert compile_options(load_config(cfg, ["model.compile=true"]).model.compile) == CompileConfig()
    assert CompileConfig().dynamic == "auto"
    table = load_config(cfg, ['model.compile={ mode = "max-autotune-no-cudagraphs", dynamic = false }']).model.compile
    assert compile_options(table) == CompileConfig(mode="max-autotune-no-cudagraphs", dynamic=False)
    for bad, message in [
        ('{ mod = "default" }', "model.compile: unknown key 'mod'; the keys are mode, dynamic, backend, recompile_limit"),
        ('{ mode = "fast" }', "model.compile: mode: must be one of 'default'"),
        ('{ mode = "max-autotune", backend = "eager" }', "mode 'max-autotune' needs backend = \"inductor\""),
        ("{ recompile_limit = 0 }", "recompile_limit: must be between 1 and 1024, got 0"),
        ('{ dynamic = "sometimes" }', "model.compile: dynamic must be true, false or \"auto\", got 'sometimes'"),
        ("3", "model.compile: expected true, false or a table"),
    ]:
        assert cli.main(["check", str(cfg), f"model.compile={bad}"]) == 2, bad
        assert message in capsys.readouterr().err, bad
    # CUDA graphs reuse one micro-step's gradient memory in the next: no gradient accumulation with them.
    for mode in ("reduce-overhead", "max-autotune"):
        assert cli.main(["check", str(cfg), f'model.compile={{ mode = "{mode}" }}', "train.gradient_accumulation=2"]) == 2
        assert (f"train: gradient_accumulation = 2 cannot run with model.compile mode '{mode}': its CUDA graphs reuse"
                in capsys.readouterr().err)
    load_config(cfg, ['model.compile={ mode = "max-autotune-no-cudagraphs" }', "train.gradient_accumulation=2"])
    load_config(cfg, ['model.compile={ mode = "reduce-overhead" }'])


def test_cuda_graph_modes_mark_each_micro_step(tmp_path, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    """With a CUDA-graph mode (inductor "reduce-overhead" / "max-autotune") the loop tells torch where
    each micro-step's iteration starts (torch.compiler.cudagraph_mark_step_begin), once per micro-step
    and before its forward; other modes and backends never call it."""
    import hcp_core
    from hcp_core.config.schema import CompileConfig
    from hcp_core.train import compile as compile_mod

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append("mark"))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for options, graphs in ((CompileConfig(backend="inductor", mode="reduce-overhead"), True),
                            (CompileConfig(backend="inductor", mode="max-autotune"), True),
                            (CompileConfig(backend="inductor"), False),
                            (CompileConfig(backend=BACKEND, mode="reduce-overhead"), False)):  # mode: inductor's
        watch = compile_mod.setup_compile(SimpleNamespace(denoiser=torch.nn.Linear(1, 1)), options, optimizer)
        watch.micro_step_begins()
        watch.close()
        assert watch.cuda_graphs is graphs and marks == ["mark"] * graphs, options
        marks.clear()

    # A run: the demo UNet traced by dynamo, its watch switched to CUDA graphs; each mark precedes a forward.
    real_setup = compile_mod.setup_compile

    def graphs_on(models, options, opt):
        watch = real_setup(models, options, opt)
        watch.cuda_graphs = True
        models.denoiser.register_forward_pre_hook(lambda *_: marks.append("forward"))
        return watch

    monkeypatch.setattr("hcp_core.train.setup.setup_compile", graphs_on)
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=2,
                                                 bucket='{ type = "fixed", target_size = [64, 64] }'))
    hcp_core.run(hcp_core.load_config(cfg, [f'model.compile={{ backend = "{BACKEND}" }}',
                                            "train.gradient_accumulation=2"]))
    assert marks == ["mark", "forward"] * 4
