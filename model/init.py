"""Initial weights as a function of the run seed and each parameter's name, not of the layout.

Every parameter draws its full initial value from its own generator, seeded from (seed, fully
qualified name), so a pipeline stage, a tensor-parallel shard or an FSDP shard holds exactly the
slice of what the one-process model holds, and two layers never share numbers. The value is drawn on
the device the parameter lives on (CPU for a model built on the host; the rank's GPU after a meta-
device build): the same for every layout on the same kind of device. The caller decides how the
full value reaches the parameter (`place`): a plain copy here, the local shard of a DTensor in
parallel/ (see `parallel.parallelize.place_shard`).

The rules reproduce the previous initialisation: N(0, init_std) for embeddings and transformer
linears, init_std / sqrt(2 n_layers) for the residual projections (GPT-2), PyTorch's default
(uniform +-1/sqrt(fan_in)) for the patch codecs' linears and convolutions, ones and zeros for norms.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
import torch.nn as nn

from config import ModelConfig

Rule = Callable[[torch.Tensor, torch.Generator], None]  # fills a full-shaped tensor in place
Place = Callable[[nn.Parameter, torch.Tensor], None]  # writes a full value into a (possibly sharded) parameter

NORMS = (nn.RMSNorm, nn.GroupNorm, nn.LayerNorm)
RESIDUAL_PROJECTIONS = ("attention.wo", "feed_forward.w2")


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed for parameter `name` of a run seeded `seed` (stable across processes and
    versions, unlike Python's hash). The CPU generator keeps its low 32 bits."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _normal(std: float) -> Rule:
    return lambda t, g: t.normal_(0.0, std, generator=g)


def _fan_in_uniform(fan_in: int) -> Rule:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return lambda t, g: t.uniform_(-bound, bound, generator=g)


def _constant(value: float) -> Rule:
    return lambda t, g: t.fill_(value)


def init_rule(cfg: ModelConfig, module_name: str, module: nn.Module, param_name: str) -> Rule:
    """How parameter `param_name` of `module` (at `module_name`) starts; a ValueError names a
    parameter no rule covers, so a new module cannot start from uninitialised memory."""
    if isinstance(module, NORMS):
        return _constant(1.0 if param_name == "weight" else 0.0)
    if isinstance(module, nn.Embedding):
        return _normal(cfg.init_std)
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if module_name.startswith("patch_"):  # PyTorch's default for the codecs (fan-in of the weight)
            return _fan_in_uniform(math.prod(module.weight.shape[1:]))
        if param_name == "weight":
            residual = module_name.endswith(RESIDUAL_PROJECTIONS)
            return _normal(cfg.init_std / math.sqrt(2 * cfg.n_layers) if residual else cfg.init_std)
    raise ValueError(f"no initialisation rule for parameter '{module_name}.{param_name}' of a {type(module).__name__}")


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """What this process holds of `param`: a DTensor's local shard, any other tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def copy_full(param: nn.Parameter, value: torch.Tensor) -> None:
    param.copy_(value)


@torch.no_grad()
def init_parameters(model: nn.Module, cfg: ModelConfig, seed: int, place: Place = copy_full) -> None:
    """Draw every parameter of `model` from its (seed, name) generator at its full shape on its
    device and `place` it. Parameters on the meta device are left as they are (nothing to draw)."""
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.is_meta:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            rule = init_rule(cfg, module_name, module, param_name)
            local = local_tensor(param)
            full = torch.empty(param.shape, dtype=param.dtype, device=local.device)  # DTensor: the global shape
            generator = torch.Generator(device=local.device).manual_seed(parameter_seed(seed, name))
            rule(full, generator)
            place(param, full)
            del full  # one full parameter alive at a time
