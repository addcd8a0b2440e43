"""EMA weights (`train.ema_decay`, parallel/ema.py): the hand-computed average over 3 steps, kept as
the parameters are sharded (FSDP2, TP on gloo ranks: no rank holds a full tensor), evaluated by
exchange without disturbing the weights, resumed bitwise from a checkpoint, exported by convert --ema."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from model.init import local_tensor
from tests.checkpoint_worker import train_with_checkpoints
from tests.parallel_worker import global_batches, layout_config, rank_steps, spawn_jobs
from trainer.evaluation import Evaluator
from trainer.train import make_engine, process_env

DECAY = 0.8
EMA = [f"train.ema_decay={DECAY}"]


def hand_ema(snapshots: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """ema_0 = the initial weights, ema_k = DECAY * ema_{k-1} + (1 - DECAY) * weights after step k."""
    ema = {n: t.double() for n, t in snapshots[0].items()}
    for weights in snapshots[1:]:
        ema = {n: DECAY * ema[n] + (1 - DECAY) * weights[n].double() for n in ema}
    return ema


def ema_run(cfg, env) -> dict:
    """3 steps; the EMA's error against the hand-computed one (from gathered test-side snapshots), per
    tensor whether it is held as its parameter is (DTensor or not, placements) and its local size;
    then an evaluation of raw and EMA weights and one more step, which must train the raw weights."""
    engine = make_engine(cfg, env)
    snapshots = [engine.full_state_dict()]
    rank_steps(engine, cfg, env, lambda step: snapshots.append(engine.full_state_dict()))
    params = dict(engine.parts[0].named_parameters())
    ema = engine.ema.state_dict()
    layout = {n: (isinstance(t, DTensor) == isinstance(params[n], DTensor),
                  not isinstance(t, DTensor) or tuple(t.placements) == tuple(params[n].placements),
                  local_tensor(t).numel(), params[n].numel()) for n, t in ema.items()}
    full = {n: t.full_tensor() if isinstance(t, DTensor) else t.clone() for n, t in ema.items()}
    err = max(float((full[n].double() - want).abs().max()) for n, want in hand_ema(snapshots).items())
    evals = {k: v for k, v in Evaluator(cfg, env).run(engine).items() if k != "eval/seconds"}
    per_rank, dp_rank = cfg.train.grad_accum, env.dp_rank
    batches = global_batches(cfg, env.dims.dp)[0][dp_rank * per_rank:(dp_rank + 1) * per_rank]
    after = engine.train_step(batches, cfg.train.steps).loss
    return {"layout": layout, "max_err": err, "dtypes": sorted({str(t.dtype) for t in ema.values()}),
            "evals": evals, "after": after}


def test_ema_is_the_hand_computed_average_and_evaluates_without_touching_the_weights():
    cfg = layout_config(EMA + ["eval.weights=both"])
    env = process_env(cfg)
    res = ema_run(cfg, env)
    assert res["max_err"] < 1e-6 and res["dtypes"] == ["torch.float32"]
    engine = make_engine(cfg, env)
    rank_steps(engine, cfg, env)
    before = {n: p.detach().clone() for n, p in engine.parts[0].named_parameters()}
    metrics = Evaluator(cfg, env).run(engine)
    assert all(torch.equal(p, before[n]) for n, p in engine.parts[0].named_parameters())  # exchanged back
    raw, ema = metrics["eval/diffusion_loss"], metrics["eval/ema/diffusion_loss"]
    assert raw > 0 and ema > 0 and raw != ema  # two weight sets scored on the same rows and noise


def test_ema_stays_sharded_like_its_parameters_and_evaluates_like_one_process(tmp_path):
    both = EMA + ["eval.weights=both"]
    jobs = [("fsdp2", both + ["parallel.dp_shard=2"]), ("tp2", both + ["parallel.tp=2"]),
            # gathered parameters outlive a forward here: after the EMA evaluation they must not be reused
            ("zero2_fsdp2", both + ["parallel.dp_shard=2", "parallel.reshard_after_forward=false"])]
    results = spawn_jobs(2, ema_run, jobs, str(tmp_path))
    ref_cfg = layout_config(both)
    ref_cfg.train.grad_accum *= 2
    ref = ema_run(ref_cfg, process_env(ref_cfg))
    tp_ref = ema_run(layout_config(both), process_env(layout_config(both)))  # tp2 has dp 1
    for name, ranks in results.items():
        want = tp_ref if name == "tp2" else ref
        for r, res in enumerate(ranks):
            assert "error" not in res, f"{name} rank {r}:\n{res['error']}"
            assert res["max_err"] < 1e-6, f"{name} rank {r}"
            for n, (same_type, same_placements, local, full) in res["layout"].items():
                assert same_type and same_placements, f"{name}: {n} is not sharded like its parameter"
            sharded = [n for n, (*_, local, full) in res["layout"].items() if local < full]
            assert len(sharded) > len(res["layout"]) // 2, f"{name}: most EMA tensors must be split across ranks"
            assert res["evals"] == pytest.approx(want["evals"], rel=1e-5), f"{name} rank {r} evaluation"
            assert res["after"] == pytest.approx(want["after"], rel=1e-5), f"{name} rank {r} step after it"


def test_ema_resumes_bitwise_and_converts(tmp_path):
    cfg = layout_config(EMA + ["train.steps=4"])
    whole = train_with_checkpoints(cfg, None, str(tmp_path / "a"), save_at=2, resume=None)
    resumed = train_with_checkpoints(cfg, None, str(tmp_path / "b"), save_at=4,
                                     resume=str(tmp_path / "a" / "step_00000002"))
    assert resumed["losses"] == whole["losses"][2:]
    assert all(torch.equal(resumed["ema"][n], t) for n, t in whole["ema"].items())

    from safetensors.torch import load_file

    from inference.convert import convert_checkpoint
    from inference.loading import InferenceFolderError

    def exported(out, **kw) -> dict[str, torch.Tensor]:
        convert_checkpoint(tmp_path / "b" / "step_00000004", tmp_path / out, **kw)
        return {k: v for f in sorted((tmp_path / out).glob("model*.safetensors")) for k, v in load_file(f).items()}

    ema, raw = exported("ema", ema=True), exported("raw")
    assert ema.keys() == whole["ema"].keys() and all(torch.equal(ema[n], t) for n, t in whole["ema"].items())
    assert any(not torch.equal(raw[n], ema[n]) for n in ema)
    plain = layout_config(["train.steps=1"])
    train_with_checkpoints(plain, None, str(tmp_path / "c"), save_at=1, resume=None)
    with pytest.raises(InferenceFolderError, match="holds no 'ema' tensors \\(it was trained with train.ema_decay=0\\)"):
        convert_checkpoint(tmp_path / "c" / "step_00000001", tmp_path / "c_out", ema=True)


def test_deepspeed_refuses_ema_in_one_line():
    pytest.importorskip("deepspeed")
    from config import ConfigError
    from parallel.deepspeed_engine import _check_layout

    with pytest.raises(ConfigError, match="does not support train.ema_decay"):
        _check_layout(layout_config(EMA + ["parallel.engine=deepspeed"]))
