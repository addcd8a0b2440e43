"""Training entry point: `[torchrun --nproc-per-node N -m] python -m trainer.train --config configs/tiny.yaml [k=v ...]`.

One step = grad_accum micro-batches of packed rows -> L_LM + lambda * L_DDPM -> clip -> AdamW ->
LR schedule, run by the configured engine (parallel/engine.py). The loop below only sequences the
pieces: the engine owns the step, CheckpointManager owns saving and resuming the registered state,
Evaluator the held-out evaluation, MetricsLogger the log lines (docs/architecture.md §6).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time

if __name__ == "__main__":  # before the slow imports: a stop signal sent during start-up is kept (slurm/)
    from trainer import signal_record

    signal_record.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from config import Config, ConfigError, load_config  # noqa: E402
from model import PackedBatch, TransfusionModel  # noqa: E402
from model.flops import step_model_flops  # noqa: E402
from parallel.dims import DistEnv, ParallelDims, init_distributed, resolve_device  # noqa: E402
from parallel.engine import NonFiniteUpdate, StepResult, TrainingEngine  # noqa: E402
from parallel.engines import build_engine  # noqa: E402
from parallel.parallelize import wraps_fsdp  # noqa: E402

from .checkpoint import CheckpointManager, UnsafeToSave  # noqa: E402
from .data import build_loader  # noqa: E402
from .evaluation import Evaluator  # noqa: E402
from .hardware import gpu_for_device_name  # noqa: E402
from .init_weights import init_from  # noqa: E402
from .metrics import MetricsLogger  # noqa: E402
from .optim import AdamWCosine  # noqa: E402
from .prefetch import StepPrefetcher, to_device  # noqa: E402
from .preemption import REQUEUE_EXIT_CODE, STOP_EXIT_CODE, Preempted, PreemptionWatcher, TrainingDiverged  # noqa: E402
from .redact import redact  # noqa: E402
from .train_state import ScheduleState, TrainState  # noqa: E402

log = logging.getLogger("trainer")


def make_engine(cfg: Config, env: DistEnv | None = None) -> TrainingEngine:
    """The configured engine over a freshly initialised model (one process when `env` is None)."""
    env = env or process_env(cfg)
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta") if cfg.parallel.meta_init else contextlib.nullcontext():
        model = TransfusionModel(cfg.model, cfg.train.seed)
    return build_engine(model, cfg, env, AdamWCosine(cfg.optim, cfg.train.steps))


def process_env(cfg: Config) -> DistEnv:
    """This process's share of the layout: device, process group and mesh. One process gets a
    one-rank group only where the torch engine wraps it in FSDP2 (bf16)."""
    dims = ParallelDims.from_config(cfg.parallel.resolved(int(os.environ.get("WORLD_SIZE", "1"))))
    one_rank_mesh = cfg.parallel.engine == "torch" and wraps_fsdp(dims, cfg.train.dtype)
    return init_distributed(dims, cfg.train.device, one_rank_mesh=one_rank_mesh)


def train(cfg: Config) -> list[dict[str, float]]:
    """Run the configured training on this process's share of the layout; returns the per-step metrics
    of the latest steps (at most trainer.metrics.HISTORY_ROWS).

    Resumes per `checkpoint.resume`, saves per `checkpoint.interval`, and on SIGUSR1 (a preemption)
    or SIGTERM (a cancel) finishes the step, saves and raises Preempted (trainer/preemption.py).
    """
    cfg.parallel = cfg.parallel.resolved(int(os.environ.get("WORLD_SIZE", "1")))
    env = process_env(cfg)
    engine = make_engine(cfg, env)
    loader = build_loader(cfg, env.dp_rank, env.dims.dp)
    # Steps of micro-batches built ahead in a thread; it stands for the loader in checkpoints (consumed position).
    steps = StepPrefetcher(loader, cfg.train.grad_accum, cfg.data.prefetch, pin_memory=env.device.type == "cuda")
    evaluator = Evaluator(cfg, env) if cfg.eval.enabled else None
    state, config, out = TrainState(), redact(cfg.to_dict()), cfg.output_dir  # config: no secrets
    ckpt = CheckpointManager(cfg.checkpoint, out / "checkpoints", engine, config, state,
                             {"scheduler": ScheduleState(engine.scheduler)}, {"loader": steps},
                             dp=(env.dp_rank, env.dims.dp), total_steps=cfg.train.steps)
    ckpt.load()
    if cfg.checkpoint.init_from:  # a fine-tune: weights only, unless the run has a checkpoint of its own
        line = (f"checkpoint.init_from ignored: resuming this run's own {ckpt.resumed_from}" if ckpt.resumed_from
                else init_from(engine, cfg))
        if env.is_main:
            print(line)
    logger = MetricsLogger(cfg.logging, out, config, enabled=env.is_main, resume_id=state.wandb_id,
                           peak_flops=_peak_flops(env))
    state.wandb_id = logger.run_id
    _announce(engine, env, state, ckpt, cfg)
    if evaluator is not None:
        logger.event(evaluator.describe())
    preemption, stop = PreemptionWatcher(), None
    if preemption.received is not None:
        logger.event(f"{preemption.received.name} arrived during start-up: acting on it after the first step")
    try:
        while state.step < cfg.train.steps:
            t0 = time.perf_counter()
            batches = next(steps)
            try:
                result = engine.train_step([to_device(b, env.device) for b in batches], state.step)
            except NonFiniteUpdate as e:
                raise TrainingDiverged(str(e)) from None
            if result.skipped:
                _count_bad_step(result, state, ckpt, logger, cfg.checkpoint.max_bad_steps)
            else:
                state.step, state.bad_steps = state.step + 1, 0
                state.tokens_seen += result.tokens * env.dims.dp
                last = state.step == cfg.train.steps
                logger.record(state.step, _row(result, batches, time.perf_counter() - t0, state, cfg, env), last=last)
                if evaluator is not None and evaluator.due(state.step, last):
                    logger.log(state.step, evaluator.run(engine))
            stop = preemption.requested()
            ckpt.maybe_save(state.step, stop is not None, clean=state.bad_steps == 0)
            if stop is not None:
                requeue = stop == signal.SIGUSR1  # SIGTERM: scancel, the time limit, the cluster's preemption
                logger.event(f"{'preemption' if requeue else 'stop'} signal ({stop.name}): saved step {state.step} "
                             f"to {ckpt.last_saved}; exiting {'for' if requeue else 'without'} requeue")
                if requeue and env.is_main:  # tells slurm/pretrain_7b.sh to requeue (torchrun hides exit codes)
                    (out / "REQUEUE").write_text(f"{state.step}\n")
                break
        ckpt.wait()
    finally:
        steps.close()
        run_dir = logger.run_dir
        logger.close()
        preemption.restore()
    if env.is_main:
        print(f"done: {state.step} steps; outputs in {out}" + "".join(
            f"\n{what}: {where}" for what, where in (("checkpoint", ckpt.last_saved), ("wandb run", run_dir)) if where))
    if stop is not None:
        raise Preempted(REQUEUE_EXIT_CODE if stop == signal.SIGUSR1 else STOP_EXIT_CODE)
    return list(logger.history)


def _peak_flops(env: DistEnv) -> float | None:
    """All GPUs' dense bf16 peak (for the MFU), when the device is a GPU we know."""
    gpu = gpu_for_device_name(torch.cuda.get_device_name(env.device)) if env.device.type == "cuda" else None
    return gpu.bf16_flops * env.dims.world_size if gpu is not None else None


def _announce(engine: TrainingEngine, env: DistEnv, state: TrainState, ckpt: CheckpointManager, cfg: Config) -> None:
    if env.is_main:
        n = f"{engine.num_params() / 1e6:.2f}M parameters " if env.dims.world_size == 1 else ""
        start = f"resuming at step {state.step} from {ckpt.resumed_from}" if ckpt.resumed_from else "starting"
        print(f"model: {n}on {env.device} x {env.dims.world_size} ({env.dims}); {start}; {cfg.train.steps} steps")


def _row(result: StepResult, batches: list[PackedBatch], dt: float, state: TrainState, cfg: Config,
         env: DistEnv) -> dict[str, float]:
    """One step's metrics (global over data-parallel ranks)."""
    return {
        "loss": result.loss, "lm_loss": result.lm_loss, "diffusion_loss": result.diffusion_loss,
        "grad_norm": result.grad_norm, "lr": result.lr,
        "tokens_per_s": result.tokens * env.dims.dp / dt, "tokens_seen": state.tokens_seen, "step_s": dt,
        "model_flops": step_model_flops(cfg.model, batches) * env.dims.dp,
    }


def _count_bad_step(result: StepResult, state: TrainState, ckpt: CheckpointManager, logger: MetricsLogger,
                    max_bad_steps: int) -> None:
    """A skipped (non-finite) step; after `max_bad_steps` in a row, save what is safe and stop."""
    state.bad_steps += 1
    logger.event(f"step {state.step + 1}: non-finite loss {result.loss} or grad norm {result.grad_norm}; "
                 f"update skipped ({state.bad_steps} in a row)")
    if state.bad_steps < max_bad_steps:
        return
    prefix = f"{state.bad_steps} consecutive non-finite steps at step {state.step}; "
    try:
        saved = f"saved {ckpt.save(state.step, clean=False)}" if ckpt.cfg.enabled else "checkpoints are disabled"
    except UnsafeToSave as e:
        raise TrainingDiverged(f"{prefix}{e}") from None
    raise TrainingDiverged(f"{prefix}{saved}. Lower optim.lr, check the data, or resume from an earlier checkpoint.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config under configs/")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3")
    parser.add_argument("--check", action="store_true", help="only load and validate the config, the parallel "
                        "layout for --world-size processes and the device (slurm/ runs this once before launching); "
                        "exit 0, or 2 with one 'config error:' line")
    parser.add_argument("--world-size", type=int, default=None, help="with --check: trainer processes "
                        "(default: $WORLD_SIZE, else 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:  # pre-flight: no model, no process group
            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            cfg.parallel.resolved(world)
            resolve_device(cfg.train.device, {**os.environ, "WORLD_SIZE": str(world)})
            print(f"config ok: {args.config} for {world} process(es)")
            return 0
        train(cfg)
    except ConfigError as e:
        # one write per line: ranks share stderr, and print() sends the newline in a second write
        sys.stderr.write(f"config error: {e}\n")
        return 2
    except Preempted as e:
        return e.exit_code
    except TrainingDiverged as e:
        sys.stderr.write(f"training stopped: {e}\n")
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
