"""DeepSpeed ZeRO as the alternative data-parallel engine (`parallel.engine: deepspeed`).

Pure data parallelism: ZeRO stage 1, 2 or 3 over all ranks, optional optimizer offload to CPU.
The DeepSpeed config is generated from our YAML (no JSON needed); `parallel.deepspeed.config_json`
is deep-merged on top of it.

Mapping (ours -> DeepSpeed):
    train.batch_size               -> train_micro_batch_size_per_gpu
    train.grad_accum               -> gradient_accumulation_steps
    optim.grad_clip (0 = off)      -> gradient_clipping (0 = off)
    parallel.deepspeed.zero_stage  -> zero_optimization.stage
    parallel.deepspeed.offload_optimizer -> zero_optimization.offload_optimizer.device = cpu
    train.dtype == bf16            -> bf16.enabled (fp32 master weights in the ZeRO optimizer)
    optim.* (AdamW, LR schedule)   -> our own torch AdamW and LambdaLR (the trainer's OptimizerFactory),
                                      handed to deepspeed.initialize.

Why the client optimizer rather than DeepSpeed's `"optimizer": {"type": "AdamW"}`: with ours the
update is the very same torch AdamW code as the single-process and FSDP runs (applied to ZeRO's
flat fp32 partitions, which is the same element-wise arithmetic), with the same two param groups
(weight decay on matrices only; DeepSpeed's configured optimizer applies one weight_decay, default 0,
to whatever it is given, and on CPU is its own compiled Adam kernel) and the same warmup+cosine LambdaLR, which DeepSpeed steps once per optimizer step
exactly where our trainer does. DeepSpeed's gradient clipping multiplies by
max_norm / (norm + 1e-6) when that is < 1, the same rule as parallel.grad_clip. engine.backward
divides the loss by gradient_accumulation_steps and the ZeRO reduction averages over the dp ranks,
which together are the single process's 1 / (dp * grad_accum).

A user JSON that sets its own "optimizer" section switches to DeepSpeed's optimizer (our two param
groups are still passed, our LR schedule still multiplies its lr); that path is not bit-for-bit
the reference any more.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from torch.utils.checkpoint import checkpoint

from config import Config, ConfigError
from model import LossNorm, ModelOutput, PackedBatch
from model.losses import ce_sum, lm_loss_sum

from .activation import apply_activation_checkpointing, apply_compile
from .dims import DistEnv
from .engine import DEEPSPEED, NO_HOOKS, OptimizerFactory, StepHooks, TrainingEngine


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in: nested dicts merge key by key, the rest replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(cfg) -> dict[str, Any]:
    """The DeepSpeed config for a trainer Config (see the module docstring for the mapping)."""
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    ds = p.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(o.grad_clip),
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.device != "cpu" and torch.cuda.is_available()}
        # Our torch AdamW then steps the CPU partitions (exact, slower than DeepSpeedCPUAdam).
        config["zero_force_ds_cpu_optimizer"] = False
    if ds.config_json:
        path = Path(ds.config_json)
        if not path.is_file():
            raise ConfigError(f"parallel.deepspeed.config_json '{path}' does not exist")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"parallel.deepspeed.config_json '{path}' is not valid JSON: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"parallel.deepspeed.config_json '{path}' must hold a JSON object")
        config = deep_merge(config, user)
    return config


def _check_layout(cfg) -> None:
    """Options of the torch engine that have no meaning under DeepSpeed fail here, not silently."""
    p = cfg.parallel
    bad = {
        "parallel.dp_replicate > 1 (DeepSpeed ZeRO partitions over all data-parallel ranks; "
        "use parallel.dp_shard)": p.dp_replicate > 1,
        "parallel.cpu_offload (FSDP's; use parallel.deepspeed.offload_optimizer)": p.cpu_offload,
        "parallel.meta_init (DeepSpeed needs a materialised model; set parallel.meta_init=false)": p.meta_init,
        "train.ema_decay (an EMA of ZeRO's partitions is not implemented; use parallel.engine=torch, whose "
        "FSDP2 keeps the EMA sharded)": cfg.train.ema_decay > 0,
    }
    for what, hit in bad.items():
        if hit:
            raise ConfigError(f"parallel.engine=deepspeed does not support {what}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed_distributed(device: torch.device) -> None:
    """deepspeed.init_distributed on the launcher's env (torchrun), gloo on CPU, NCCL on GPU.

    If the trainer already created the default process group DeepSpeed adopts it. A plain
    single-process run gets a one-rank group (DeepSpeed always needs one).
    """
    import deepspeed

    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def _initialize(model: nn.Module, cfg: Config, optimizers: OptimizerFactory):
    """deepspeed.initialize over the plain model with our optimizer and LR schedule; (engine, scheduler)."""
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            f"parallel.engine=deepspeed needs the deepspeed package ({e}); "
            "install the extra: pip install '.[deepspeed]'"
        ) from None
    ds_config = build_ds_config(cfg)
    optimizer = optimizers.optimizer(list(model.parameters()))
    if "optimizer" in ds_config:
        # DeepSpeed builds its own optimizer over our param groups; our schedule scales its lr.
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, lr_scheduler=optimizers.scheduler, config=ds_config,
        )
    else:
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=optimizers.scheduler(optimizer), config=ds_config,
        )
    return engine, scheduler


def zero3_lm_loss_sum(out: ModelOutput, text_targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """The LM sum under ZeRO-3, whose partitioned head weight is gathered only when its module is
    called (DeepSpeed's module hooks): the head runs as a module over every position, then the
    cross-entropy in checkpointed chunks of rows."""
    logits = out.head(out.hidden).flatten(0, 1)  # [B*S, V]
    flat_t = text_targets.flatten()
    return torch.stack([checkpoint(ce_sum, logits[i:i + chunk], flat_t[i:i + chunk], use_reentrant=False)
                        for i in range(0, flat_t.numel(), chunk)]).sum()


class DeepSpeedEngine(TrainingEngine):
    """ZeRO data parallelism through a DeepSpeedEngine; its own partition files as checkpoints.

    DeepSpeed scales each micro-batch loss by 1/grad_accum (undone here), averages gradients over dp,
    clips, and runs our AdamW + LR schedule at the accumulation boundary. It applies every update
    (it skips only fp16 overflows), so a non-finite step stops the run (`can_skip_update`).
    """

    format = DEEPSPEED
    can_skip_update = False

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv, optimizers: OptimizerFactory) -> None:
        super().__init__(cfg, env, zero3_lm_loss_sum if cfg.parallel.deepspeed.zero_stage == 3 else lm_loss_sum)
        _check_layout(cfg)
        p = cfg.parallel
        apply_activation_checkpointing(model, p.activation_checkpoint, p.activation_checkpoint_every)
        if p.compile:
            apply_compile(model)
        init_deepspeed_distributed(env.device)
        self.ds, self.scheduler = _initialize(model, cfg, optimizers)
        self.parts = [self.ds.module]
        self.optimizer = self.ds.optimizer

    def forward_backward(self, batches: list[PackedBatch], step: int, norm: LossNorm,
                         hooks: StepHooks = NO_HOOKS) -> torch.Tensor:
        n = self.ds.gradient_accumulation_steps()
        if len(batches) != n:
            raise ValueError(f"DeepSpeed expects {n} micro-batches per step, got {len(batches)}")
        self.ds.train()
        # engine.backward divides by gradient_accumulation_steps: undone here.
        backward = lambda loss: self.ds.backward(loss * n)  # noqa: E731
        totals = torch.zeros(3, device=self.device)
        for micro, batch in enumerate(batches):
            totals += self.micro_batch(self.forward_model, batch, step, micro, n, norm, hooks, backward)
            if micro < n - 1:
                self.ds.step()  # accumulation bookkeeping only; the boundary step is optimizer_step's
        return totals

    @property
    def forward_model(self) -> nn.Module:
        """The DeepSpeedEngine: its forward runs ZeRO's parameter gathering hooks."""
        return self.ds

    def optimizer_step(self, finite_loss: bool, hooks: StepHooks = NO_HOOKS) -> tuple[float, bool]:
        hooks.phase("optimizer")
        self.ds.step()  # the accumulation boundary: clip, our AdamW, our LR schedule
        return grad_norm(self.ds), True

    def save(self, folder: Path, async_save: bool = False) -> Future | None:
        if async_save:
            raise ConfigError("checkpoint.async_save is not supported with parallel.engine=deepspeed")
        save_engine_checkpoint(self.ds, folder)
        return None

    def load(self, folder: Path) -> None:
        load_engine_checkpoint(self.ds, folder)

    def local_tensors(self) -> list[torch.Tensor]:
        # ZeRO-3 keeps this rank's partition in ds_tensor.
        return [getattr(p, "ds_tensor", p.data) for p in self.ds.module.parameters()]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.ds)


def grad_norm(engine) -> float:
    """The global gradient norm (before clipping) of the engine's last optimizer step."""
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank (ZeRO-3 partitions gathered), on CPU."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# A DeepSpeed checkpoint is a step_N folder (see trainer/checkpoint.py) whose model and optimizer
# state are the engine's own files under DS_TAG: each rank writes its ZeRO partition, nothing is
# gathered. Resuming with another number of data-parallel ranks goes through DeepSpeed's universal
# checkpoint: converted once (ds_to_universal) into UNIVERSAL_TAG next to it, then loaded with
# `load_universal`, which re-partitions the full per-parameter tensors onto the new ranks.
DS_TAG = DEEPSPEED
UNIVERSAL_TAG = "deepspeed_universal"


def save_engine_checkpoint(engine, folder: Path) -> None:
    """Collective: every rank writes its partition of model + optimizer into folder/deepspeed."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    # ds_to_universal requires this marker (Megatron-DeepSpeed writes it; a plain model has no extra info).
    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(folder), tag=DS_TAG, client_state=info, save_latest=False)


def saved_dp_size(folder: Path) -> int:
    """Data-parallel ranks that wrote a DeepSpeed checkpoint (one optimizer partition file each)."""
    return len(list((folder / DS_TAG).glob("*zero_pp_rank_*_optim_states.pt")))


def _to_universal(folder: Path) -> None:
    """Rank 0 converts folder/deepspeed into folder/deepspeed_universal (once; atomic rename)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    final = folder / UNIVERSAL_TAG
    if final.is_dir():
        return
    tmp = folder / f".tmp_{UNIVERSAL_TAG}"
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal.main(Namespace(
        input_folder=str(folder / DS_TAG), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=False,
    ))
    tmp.rename(final)


def load_engine_checkpoint(engine, folder: Path) -> None:
    """Collective: restore model + optimizer partitions written by save_engine_checkpoint, through a
    universal checkpoint when the number of data-parallel ranks changed.

    The LR schedule is not taken from DeepSpeed's copy: the trainer restores it from train_state.pt,
    as for the torch engine.
    """
    saved, now = saved_dp_size(folder), engine.dp_world_size
    tag = DS_TAG
    if saved != now:
        if dist.get_rank() == 0:
            _to_universal(folder)
        dist.barrier()
        tag = UNIVERSAL_TAG
    # load_universal is read from the engine's config at load time; set it for this load only.
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = tag == UNIVERSAL_TAG
    try:
        path, _ = engine.load_checkpoint(
            str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False,
            load_module_strict=True,
        )
    finally:
        engine._config.load_universal_checkpoint = previous
    if path is None:
        raise ConfigError(f"checkpoint {folder} has no readable DeepSpeed state under '{tag}/'")
