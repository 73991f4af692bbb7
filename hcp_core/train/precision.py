"""``model.mixed_precision``: what a run computes in, chosen for the hardware when ``"auto"``.

``auto`` (the default) picks bf16 on CUDA GPUs that support it, fp16 (with accelerate's gradient
scaler) on older GPUs, and fp32 on CPUs: bf16 autocast on CPU is fast on some processors and
several times slower on others (docs/training.md, Performance), so it is used there only when
asked for. fp16 on a CPU is refused: PyTorch's CPU autocast would not use it.

``model.vae_dtype`` (:func:`choose_vae_dtype`) picks the VAE's weights: bf16 under bf16 mixed
precision on CUDA for VAEs known to be safe in it, fp32 otherwise (SDXL's VAE overflows in fp16).
``model.allow_tf32`` (:func:`apply_tf32`) lets fp32 work run on TF32 tensor cores.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from ..errors import ConfigError


def choose_precision(requested: str, *, cuda: bool, bf16_supported: bool) -> Tuple[str, str]:
    """(accelerate's mixed_precision value, why) for ``requested`` on this machine."""
    if requested == "auto":
        if not cuda:
            return "no", "auto: fp32 on CPU (bf16 autocast is much slower on some CPUs; set \"bf16\" to try it)"
        if bf16_supported:
            return "bf16", "auto: bf16 on a CUDA GPU that supports it"
        return "fp16", "auto: fp16 with a gradient scaler on a CUDA GPU without bf16"
    if requested == "fp16" and not cuda:
        raise ConfigError("model.mixed_precision = \"fp16\" needs a CUDA GPU; on a CPU use \"auto\" (fp32) or \"bf16\"")
    if requested == "bf16" and cuda and not bf16_supported:
        raise ConfigError("model.mixed_precision = \"bf16\": this GPU does not support bf16; use \"auto\" or \"fp16\"")
    return requested, f"as configured ({requested})"


def machine_precision(requested: str) -> Tuple[str, str]:
    """:func:`choose_precision` for this process's hardware."""
    import torch

    cuda = torch.cuda.is_available()
    return choose_precision(requested, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def choose_vae_dtype(requested: str, vae_fp32: Optional[bool], precision: str, *, bf16_safe: bool,
                     cuda: bool) -> Tuple[str, str]:
    """("fp32" | "bf16" | "fp16", why) for the VAE's weights.

    ``requested`` is ``model.vae_dtype``, ``vae_fp32`` the older ``model.vae_fp32`` (None: not
    set), ``precision`` accelerate's mixed precision ("no", "fp16", "bf16"). ``bf16_safe``: the
    model family says its VAE encodes well in bf16 (its optional ``vae_safe_in_bf16(models)``: SD
    1.x/2.x, SD3, FLUX; SDXL's VAE overflows in half precision, and an unknown VAE stays fp32).
    """
    if vae_fp32 is not None:  # the older switch: true kept fp32, false followed the mixed precision on CUDA
        chosen = precision if not vae_fp32 and cuda and precision in ("fp16", "bf16") else "fp32"
        return chosen, f"model.vae_fp32 = {str(vae_fp32).lower()} (deprecated: write model.vae_dtype = \"{chosen}\")"
    if requested == "fp16" and not cuda:
        raise ConfigError("model.vae_dtype = \"fp16\" needs a CUDA GPU; on a CPU use \"auto\" (fp32) or \"bf16\"")
    if requested != "auto":
        return requested, f"as configured ({requested})"
    if precision == "bf16" and cuda and bf16_safe:
        return "bf16", "auto: bf16 under bf16 mixed precision (the family's VAE is safe in bf16)"
    if not cuda:
        return "fp32", "auto: fp32 on a CPU"
    if precision != "no":
        return "fp32", f"auto: fp32 (this VAE is not known to be safe in {precision})"
    return "fp32", "auto: fp32 (no mixed precision)"


def torch_dtype(name: str) -> Any:
    """The torch dtype of "fp32" | "bf16" | "fp16"."""
    import torch

    return getattr(torch, _DTYPES[name])


def check_machine(model_cfg: Any) -> None:
    """What ``hcp check`` verifies of ``[model]`` on this machine (a :class:`~hcp_core.errors.UserError`
    otherwise): the mixed precision, the VAE dtype and the compile backend are usable here."""
    import torch

    from ..config.schema import compile_options
    from .compile import check_backend

    precision, _ = machine_precision(model_cfg.mixed_precision)
    cuda = torch.cuda.is_available()
    choose_vae_dtype(model_cfg.vae_dtype, model_cfg.vae_fp32, precision, bf16_safe=False, cuda=cuda)
    options = compile_options(model_cfg.compile)
    if options is not None:
        check_backend(options, torch.device("cuda" if cuda else "cpu"))


def apply_tf32(enabled: bool, *, cuda: bool) -> Optional[str]:
    """``model.allow_tf32``: turn TF32 on for this process's fp32 matrix products and convolutions
    (torch's global switches; false leaves them as they are). Returns the log line, or None."""
    if not enabled:
        return None
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if not cuda:
        return "model.allow_tf32: no effect on a CPU (TF32 is a CUDA tensor-core format)"
    return "TF32: on for fp32 matrix products and convolutions (model.allow_tf32)"
