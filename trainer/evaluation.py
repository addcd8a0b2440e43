"""Held-out evaluation during training (config `eval:`, docs/architecture.md §6.5).

The held-out set is built once at start-up, identically on every rank: documents from
`eval.streams` (or the synthetic source's held-out documents), read in order, caption before image
and no caption dropout (the direction generation is scored in), latents at their posterior mean,
packed into `eval.rows` rows of train.seq_len, mixed by positions like training until a stream has
been read once, then from the others; no document is read twice. Row j of the set always gets the
same place in the same held-out micro-batch of some rank, images their fixed noise and timesteps (model/heldout.py), so every evaluation of the
same weights gives the same numbers on any layout. Rows are dealt out as training deals
micro-batches (dp x grad_accum per evaluation step, empty rows padding the last), and each step is
one `engine.evaluate`, the layout's forward without backward.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterator

import numpy as np

from config import Config, ConfigError
from model.heldout import (CONDITION_T, TARGET_KINDS, HeldoutBatch, HeldoutStats, bucket_range, fixed_draws,
                           target_kinds)
from parallel.dims import DistEnv
from parallel.engine import TrainingEngine

from .data import document_builder
from .documents import Document
from .packing import Row, SequencePacker, collate


def heldout_config(cfg: Config) -> Config:
    """The run's config with the held-out streams as its data and the evaluation's document recipe."""
    streams = [dataclasses.replace(s, recipe=dataclasses.replace(s.recipe, drop_context=0.0, drop_condition=0.0,
                                                                 drop_both=0.0)) for s in cfg.eval.streams]
    data = dataclasses.replace(cfg.data, streams=streams, shuffle=False, sample_latents=False,
                               image_first_prob=0.0, caption_dropout=0.0)
    return dataclasses.replace(cfg, data=data)


def heldout_documents(cfg: Config) -> Iterator[Document]:
    """The held-out documents in their fixed order: one pass over the streams (the synthetic source never ends)."""
    held = heldout_config(cfg)
    builder = document_builder(held)
    if held.data.source == "synthetic":
        from .synthetic import SyntheticSource

        yield from SyntheticSource(held.data, held.model, builder, held.train.seed, heldout=True)
        return
    from .streaming import StreamingSource

    source = StreamingSource(held, builder)
    done: set[int] = set()
    while len(done) < len(source.streams):
        doc = next(source)
        came_round = {i for i, cursor in enumerate(source.cursors) if cursor.epoch > 0} - done
        if not came_round:
            yield doc
            continue
        done |= came_round  # that stream's document is a repeat: drop it and mix the others only
        for i in came_round:
            source.positions[i] = math.inf


def heldout_rows(cfg: Config) -> list[Row]:
    """At most `eval.rows` packed rows of held-out documents (fewer when the streams run out)."""
    m = cfg.model
    packer = SequencePacker(cfg.train.seq_len, m.patches_per_image, m.tokens, cfg.data.max_waiting_images,
                            m.image_attention)
    docs = heldout_documents(cfg)
    while len(packer.ready) < cfg.eval.rows:
        doc = next(docs, None)
        if doc is None:
            packer.flush()
            break
        packer.add(doc)
    return packer.pop_rows(min(cfg.eval.rows, len(packer.ready))) or []


class Evaluator:
    """This rank's share of the held-out set and the evaluation that runs over it."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        e, m, t = cfg.eval, cfg.model, cfg.train
        self.cfg = e
        self.stats = HeldoutStats(cfg.diffusion.num_timesteps, e.timestep_buckets, e.lm, e.diffusion)
        rows = heldout_rows(cfg)
        if not rows:
            raise ConfigError("the held-out set is empty: eval.streams hold no documents")
        latent_shape = (m.latent_channels, m.latent_size, m.latent_size)
        dp, per_micro, micros = env.dims.dp, t.batch_size, t.grad_accum
        per_step = dp * micros * per_micro
        self.rows, n_steps = len(rows), math.ceil(len(rows) / per_step)
        rows += [Row.empty(t.seq_len, m.tokens.pad) for _ in range(n_steps * per_step - len(rows))]
        first_image = np.concatenate([[0], np.cumsum([len(r.images) for r in rows])])
        offset = m.image_token_offset if m.image_representation == "tokens" else None
        self.steps: list[list[HeldoutBatch]] = []
        for step in range(n_steps):
            micro_batches = []
            for micro in range(micros):
                start = ((step * dp + env.dp_rank) * micros + micro) * per_micro
                batch = collate(rows[start:start + per_micro], latent_shape)
                timesteps, noise = fixed_draws(latent_shape, int(first_image[start]), batch.num_images, e.seed,
                                               self.stats.num_timesteps, e.timestep_buckets)
                timesteps[~batch.generated] = CONDITION_T
                micro_batches.append(HeldoutBatch(batch, target_kinds(batch, m.tokens.boi, offset), timesteps, noise))
            self.steps.append(micro_batches)
        self.images = int(first_image[-1])

    def due(self, step: int, last: bool) -> bool:
        """Whether to evaluate after training step `step` (every `eval.every` steps and at the last)."""
        return self.cfg.enabled and (step % self.cfg.every == 0 or last)

    def run(self, engine: TrainingEngine) -> dict[str, float]:
        """Collective: evaluate the engine's weights (`eval.weights`: the raw ones under `eval/`, the
        EMA's under `eval/ema/`); the metrics with the seconds it took."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        if self.cfg.weights in ("raw", "both"):
            out.update(self._metrics(engine, "eval/"))
        if self.cfg.weights in ("ema", "both"):
            with engine.ema.swapped():
                out.update(self._metrics(engine, "eval/ema/"))
        return {**out, "eval/seconds": time.perf_counter() - t0}

    def _metrics(self, engine: TrainingEngine, prefix: str) -> dict[str, float]:
        sums = sum(engine.evaluate(batches, self.stats) for batches in self.steps)
        return heldout_metrics(self.stats, sums.cpu(), prefix)

    def describe(self) -> str:
        """One line for the log: what an evaluation covers."""
        return (f"eval every {self.cfg.every} steps on {self.rows} held-out rows ({self.images} images, "
                f"{self.cfg.timestep_buckets} timestep buckets), {len(self.steps)} forward step(s) each, "
                f"weights: {self.cfg.weights}")


def heldout_metrics(stats: HeldoutStats, sums, prefix: str = "eval/") -> dict[str, float]:  # noqa: ANN001
    """Summed held-out statistics (a tensor [stats.size]) as metrics named `prefix`...: LM loss (and
    perplexity) per kind of text, the diffusion loss per timestep bucket and the mean of the buckets'."""
    kinds, buckets = stats.split(sums)
    out: dict[str, float] = {}
    if stats.lm:
        ce, n = sum(c for c, _ in kinds), sum(k for _, k in kinds)
        if n:
            out[f"{prefix}lm_loss"] = ce / n
        for name, (c, k) in zip(TARGET_KINDS, kinds):
            if k:
                out[f"{prefix}{name}_lm_loss"] = c / k
                out[f"{prefix}{name}_ppl"] = math.exp(min(c / k, 700.0))
    if stats.diffusion:
        means = {}
        for b, (mse, k) in enumerate(buckets):
            if k:
                lo, hi = bucket_range(b, stats.n_buckets, stats.num_timesteps)
                means[f"{prefix}diffusion_loss_t{lo}-{hi - 1}"] = mse / k
        if means:
            out[f"{prefix}diffusion_loss"] = sum(means.values()) / len(means)
            out.update(means)
    return out
