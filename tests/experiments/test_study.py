"""The adaptive isoFLOP study: bracketing on synthetic curves, the fit, the seed noise, seeds that
change init and data order, and a whole study (training replaced by a synthetic loss) down to
its report and claims.json."""

import json
import math
from pathlib import Path

import pytest
import torch

from modlm.experiments import sweep
from modlm.experiments.claims import NOT_BRACKETED
from modlm.experiments.curves import UNSTABLE_TAG, curve_optima, fit_bracket, instability, seed_noise
from modlm.experiments.isoflop import Shape, SweepSettings, parse_shapes, plan_run
from modlm.experiments.report import CLAIMS_FILE, REPORT_FILE, tagged_records, write_report
from modlm.experiments.scales import Scale
from modlm.experiments.study import STUDY_FILE, StudyDesign, decide_curve, first_window, run_study


def _can(_i):
    return None


def test_an_optimum_at_the_edge_triggers_an_extension_until_bracketed():
    # A loss curve over 6 rungs with its minimum at rung 1; the study starts at rungs 2-4.
    curve = [3.05, 3.00, 3.02, 3.06, 3.12, 3.20]
    measured = {i: [curve[i]] for i in (2, 3, 4)}
    d = decide_curve(measured, _can, len(curve), extensions_left=4)
    assert (d.state, d.best, d.add) == ("extend", 2, 1)  # best at the small end: one rung smaller
    measured[1] = [curve[1]]
    d = decide_curve(measured, _can, len(curve), extensions_left=3)
    assert (d.state, d.best, d.add) == ("extend", 1, 0)
    measured[0] = [curve[0]]
    assert decide_curve(measured, _can, len(curve), extensions_left=2).state == "bracketed"
    # at the large end it grows the other way; seeds are averaged before the best is chosen
    d = decide_curve({0: [3.2], 1: [3.1, 3.3], 2: [3.15]}, _can, 6, extensions_left=1)
    assert (d.state, d.best, d.add) == ("extend", 2, 3)


def test_an_unbracketable_optimum_is_flagged_with_the_limit_it_hit():
    names = ["d16L2", "d32L2", "d32L3", "d48L3"].__getitem__
    d = decide_curve({0: [3.0], 1: [3.1], 2: [3.2]}, _can, 4, extensions_left=4, names=names)
    assert d.state == "unbracketable" and d.best == 0 and "ladder's smallest" in d.why
    d = decide_curve({0: [3.3], 1: [3.2], 2: [3.1]}, lambda i: "12 steps, outside [60, 3000]", 4, 4, names)
    assert d.state == "unbracketable" and "cannot be trained: 12 steps" in d.why
    d = decide_curve({0: [3.3], 1: [3.2], 2: [3.1]}, _can, 4, extensions_left=0, names=names)
    assert d.state == "unbracketable" and "limit of extensions" in d.why and "d48L3" in d.why


def test_fit_recovers_the_vertex_of_a_parabola_in_log_params():
    def loss(p):
        return 2.0 + 0.3 * (math.log(p) - math.log(7000.0)) ** 2

    params, best = fit_bracket([(p, loss(p)) for p in (3000.0, 6000.0, 15000.0)])
    assert params == pytest.approx(7000.0, rel=1e-9) and best == pytest.approx(2.0, abs=1e-12)
    assert fit_bracket([(1.0, 1.0), (2.0, 1.0), (4.0, 1.0)]) == (2.0, 1.0)  # flat: the middle point


def test_seed_noise_is_the_pooled_standard_deviation_over_repeated_runs():
    sigma, n = seed_noise([[1.0, 2.0, 3.0], [5.0, 5.0], [9.0]])  # a single run carries no noise
    assert sigma == pytest.approx(math.sqrt((1 + 0 + 1 + 0 + 0) / (2 + 1))) and n == 2
    assert seed_noise([[1.0]]) == (None, 0)


def test_seed_repeats_change_init_and_data_order_but_not_the_split(tmp_path, make_corpus):
    from modlm.training.batching import get_batch
    from modlm.training.distributed import DistInfo
    from modlm.training.trainer import Trainer

    settings = SweepSettings(
        seq_len=16,
        batch_size=2,
        head_dim=8,
        predictor_hidden=4,
        data=make_corpus(seed=0, paragraphs=200, words=40),
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
        seed=0,
        split_seed=0,
    )
    runs = [plan_run(2.5e8, "mod", Shape(16, 2), settings, seed=s, lr=3e-3) for s in (0, 1)]
    assert runs[0].run_id != runs[1].run_id and runs[1].run_id.endswith("-s1")
    trainers = []
    for run in runs:
        t = Trainer(run.train_config(settings, tmp_path / run.run_id), DistInfo(), torch.device("cpu"))
        t.setup()
        trainers.append(t)
    a, b = trainers
    pa, pb = list(a.model.parameters()), list(b.model.parameters())
    assert all(not torch.equal(x, y) for x, y in zip(pa, pb) if x.dim() == 2)  # init: every weight matrix
    xa, _ = get_batch(a.corpus.train, 2, 16, a.data_gen)
    xb, _ = get_batch(b.corpus.train, 2, 16, b.data_gen)
    assert not torch.equal(xa, xb)  # data order
    assert a.corpus.path == b.corpus.path  # same split, so the same validation set
    assert a.cfg.split_seed == b.cfg.split_seed == 0 and (a.cfg.seed, b.cfg.seed) == (0, 1)


# ---------------------------------------------------------------------------------------------
# A whole study, training replaced by a synthetic loss
# ---------------------------------------------------------------------------------------------

WOBBLE = 0.02
LADDER = parse_shapes("8x2,16x2,16x3,16x4,24x4,32x4,32x6")
SETTINGS = SweepSettings(
    seq_len=16, batch_size=2, head_dim=8, predictor_hidden=4, min_steps=50, max_steps=5000, device="cpu"
)


def _synthetic(optimum: dict[float, float], best_lr: dict[str, float]):
    """A train_run that 'trains' instantly: loss = parabola in log params around the budget's
    optimum + a family offset (MoD 0.05 better) + an lr penalty + a small seed-dependent wobble."""
    calls = []

    def train_run(run, settings, run_dir):
        calls.append(run.run_id)
        fam = "mod" if run.family == "mod" else "dense"
        lr = run.lr if run.lr is not None else settings.lr
        loss = (
            3.0
            + 0.2 * (math.log(run.params / optimum[run.budget])) ** 2
            + (-0.05 if fam == "mod" else 0.0)
            + 0.1 * (math.log(lr / best_lr[fam])) ** 2
            + WOBBLE * math.sin(7.0 * run.seed + 1.0)
        )
        return {
            "step": run.steps,
            "stop_reason": "done",
            "val_loss": loss,
            "val_bpb": loss / math.log(2),
            "elapsed_s": 0.0,
        }

    return train_run, calls


def test_a_study_extends_brackets_repeats_seeds_and_reports_it(tmp_path, monkeypatch):
    b_ok, b_edge = 1e9, 2e9
    # b_ok: the optimum two rungs above the first window's top (so the curve must grow twice);
    # b_edge: below the ladder's smallest shape (it can never be bracketed).
    window = first_window(StudyDesign((b_ok,), LADDER), b_ok, "dense", SETTINGS)
    top = window[-1]
    p_top2 = plan_run(b_ok, "dense", LADDER[top + 2], SETTINGS).params
    optimum = {b_ok: p_top2, b_edge: 1000.0}
    fake, calls = _synthetic(optimum, {"dense": 4e-3, "mod": 2e-3})
    monkeypatch.setattr(sweep, "train_run", fake)
    design = StudyDesign(
        budgets=(b_ok, b_edge), ladder=LADDER, seeds=(0, 1, 2), lrs=(1e-3, 2e-3, 4e-3), lr_budget=b_ok, max_extensions=4
    )
    res = run_study(design, tmp_path / "res", SETTINGS, progress=False, log=lambda _m: None)
    assert res.complete
    assert res.lrs == {"dense": 4e-3, "mod": 2e-3}
    tried = {(r.family, r.lr) for r in res.runs if "lr" in r.tags}
    assert ("dense", 8e-3) in tried and ("mod", 8e-3) not in tried  # dense's 4e-3 was an end: one beyond
    states = {(c["budget"], c["family"]): c for c in json.loads((tmp_path / "res" / STUDY_FILE).read_text())["curves"]}
    ok = states[(b_ok, "dense")]
    assert ok["state"] == "bracketed" and ok["best"] == LADDER[top + 2].name  # two extensions found it
    assert states[(b_edge, "dense")]["state"] == "unbracketable" and states[(b_edge, "dense")]["why"]
    # the best shape and its two neighbours, at every seed, and at the family's lr
    by_id = {r["run_id"]: r for r in res.records}
    for fam in ("dense", "mod"):
        lr = res.lrs[fam]
        for rung in (top + 1, top + 2, top + 3):
            for seed in (0, 1, 2):
                rid = plan_run(b_ok, fam, LADDER[rung], SETTINGS, seed=seed, lr=lr).run_id
                assert rid in by_id and by_id[rid]["train"]["lr"] == lr and by_id[rid]["seed"] == seed
    # resumable: the same call replays its decisions from runs.jsonl and trains nothing
    n = len(calls)
    again = run_study(design, tmp_path / "res", SETTINGS, progress=False, log=lambda _m: None)
    assert again.complete and len(calls) == n and {r.run_id for r in again.runs} == {r.run_id for r in res.runs}

    # The report and claims.json, from the results folder alone.
    scale = Scale(
        name="t",
        description="synthetic",
        budgets=design.budgets,
        shapes=LADDER,
        variant_budget=b_ok,
        variant_shape=LADDER[1],
        settings=SETTINGS,
        seeds=design.seeds,
        lrs=design.lrs,
    )
    write_report(tmp_path / "res", tmp_path / "rep", scale, command="modlm reproduce --scale t", settings=SETTINGS)
    doc = json.loads((tmp_path / "rep" / CLAIMS_FILE).read_text())
    assert doc["budgets"] == [b_ok, b_edge]
    assert doc["noise"]["method"] == "seeds" and doc["noise"]["n_seeds"] == 3
    wobble = [WOBBLE * math.sin(7.0 * s + 1.0) for s in (0, 1, 2)]
    assert doc["noise"]["sigma"] == pytest.approx(seed_noise([wobble])[0])  # the same spread at every shape
    claims = {c["id"]: c for c in doc["claims"]}
    good, edge = claims["isoflop@1e9"], claims["isoflop@2e9"]
    for c in (good, edge):
        assert {"budget", "dense_optimum", "mod_optimum", "difference_sigma", "holds"} <= set(c)
        assert set(c["dense_optimum"]) >= {"shape", "params", "loss", "bracketed"}
    assert good["budget"] == b_ok and good["dense_optimum"]["bracketed"] and good["mod_optimum"]["bracketed"]
    assert good["dense_optimum"]["params"] == pytest.approx(p_top2, rel=0.05)  # the fit finds the true optimum
    assert good["difference_sigma"] == pytest.approx(0.05 / doc["noise"]["sigma"], rel=0.05)  # MoD 0.05 better
    assert good["holds"] == "yes"  # >> 2 sigma
    assert not edge["dense_optimum"]["bracketed"] and edge["holds"] == NOT_BRACKETED
    md = (tmp_path / "rep" / REPORT_FILE).read_text()
    assert "Not bracketed: the dense optimum at 2e9" in md and "Learning-rate sweep" in md
    assert f"sigma = {doc['noise']['sigma']:.4f}" in md and "**optimum**" in md


def test_instability_is_a_loss_above_a_uniform_guess_after_warmup():
    bound = math.log(256)
    ok = {"val_loss": 2.0, "train_curve": [[5, 9.0], [50, 2.5]], "aux_curve": [[5, 30.0], [50, 0.1]]}
    assert instability(ok, 256, warmup_steps=10) is None  # spikes during warmup do not count
    lm = dict(ok, train_curve=[[50, bound + 0.1]])
    assert "training loss" in instability(lm, 256, 10) and "at step 50" in instability(lm, 256, 10)
    aux = dict(ok, aux_curve=[[60, 442.5]])  # the LM loss bounded, a runaway router's predictor BCE not
    assert "auxiliary loss 442" in instability(aux, 256, 10)
    assert instability(dict(ok, aux_curve=[[60, float("nan")]]), 256, 10) is not None
    assert "validation loss" in instability(dict(ok, val_loss=float("nan")), 256, 10)
    assert instability(dict(ok, val_loss=None), 256, 10) is not None


def test_a_run_that_blows_up_is_retrained_at_half_its_lr_and_only_the_retrain_counts(tmp_path, monkeypatch):
    b = 1e9
    design = StudyDesign(budgets=(b,), ladder=LADDER, seeds=(0, 1, 2), max_extensions=4)
    window = first_window(design, b, "mod", SETTINGS)
    bad_shape = LADDER[window[1]]
    fake, calls = _synthetic({b: plan_run(b, "dense", bad_shape, SETTINGS).params}, {"dense": 2e-3, "mod": 2e-3})

    def train_run(run, settings, run_dir):
        summary = fake(run, settings, run_dir)
        lr = run.lr if run.lr is not None else settings.lr
        # MoD at this shape and seed 1 blows up at lr >= 2e-3 (the settings' lr): its aux loss runs away
        blows = run.family == "mod" and run.shape == bad_shape and run.seed == 1 and lr >= 2e-3
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run_dir) / "metrics.jsonl", "w") as f:
            for step in (10, run.steps // 2, run.steps):
                f.write(
                    json.dumps({"event": "train", "step": step, "lm_loss": 3.0, "aux_loss": 500.0 if blows else 0.1})
                )
                f.write("\n")
        return summary

    monkeypatch.setattr(sweep, "train_run", train_run)
    res = run_study(design, tmp_path / "res", SETTINGS, progress=False, log=lambda _m: None)
    assert res.complete
    bad = plan_run(b, "mod", bad_shape, SETTINGS, seed=1)
    redo = plan_run(b, "mod", bad_shape, SETTINGS, seed=1, lr=SETTINGS.lr / 2)
    tags = {r.run_id: r.tags for r in res.runs}
    assert tags[bad.run_id] == (UNSTABLE_TAG,)  # read by no curve, seed group or variant
    assert "isoflop" in tags[redo.run_id] and "seed" in tags[redo.run_id]
    study = json.loads((tmp_path / "res" / STUDY_FILE).read_text())
    assert [(d["run_id"], d["retrain"]) for d in study["retrained"]] == [(bad.run_id, redo.run_id)]
    assert "auxiliary loss 500" in study["retrained"][0]["why"]
    # the curve point of that shape averages three seeds, the retrain in place of the blow-up
    (opt,) = [o for (bb, fam), o in curve_optima(tagged_records(tmp_path / "res")).items() if fam == "mod"]
    point = next(p for p in opt.points if p.shape == bad_shape.name)
    assert sorted(r["run_id"] for r in point.records) == sorted(
        [
            plan_run(b, "mod", bad_shape, SETTINGS).run_id,
            redo.run_id,
            plan_run(b, "mod", bad_shape, SETTINGS, seed=2).run_id,
        ]
    )
    # resumable: replaying the study retrains nothing and makes the same decisions
    n = len(calls)
    again = run_study(design, tmp_path / "res", SETTINGS, progress=False, log=lambda _m: None)
    assert again.complete and len(calls) == n and {r.run_id: r.tags for r in again.runs} == tags
