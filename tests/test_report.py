"""The study report: Pareto frontier, ROI headline, scaling-law fits, and the written page.

Pure and fast: synthetic trial records, no Ray, no training.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from hilomoe.report.pareto import dominates, fronts_by_variant, pareto_front, roi, usable
from hilomoe.report.writer import write_report
from hilomoe.report.scaling import fit_axis, fit_power_law, heldout_check, identification

PNG = b"\x89PNG\r\n\x1a\n"


def rec(trial_id, flops, auc, variant="hilomoe", status="completed", **extra) -> dict:
    return {"trial_id": trial_id, "status": status, "variant": variant, "flops": flops,
            "valid_auc": auc, **extra}


def ids(records) -> list:
    return [r["trial_id"] for r in records]


# -- Pareto ---------------------------------------------------------------------------------

HAND = [rec("a", 100, 0.70), rec("b", 200, 0.75), rec("c", 200, 0.74), rec("d", 300, 0.75),
        rec("e", 400, 0.80), rec("f", 50, 0.60), rec("g", 400, 0.80), rec("h", 500, 0.79),
        rec("p", 10, 0.99, status="pruned"), rec("n", math.nan, 0.99), rec("m", 5, None)]


def test_pareto_front_of_a_hand_example():
    # c loses to b on AUC at equal FLOPs, d to b on FLOPs at equal AUC, h to e on both;
    # e and g are identical so neither dominates the other; p is pruned, n and m unusable.
    assert ids(pareto_front(HAND)) == ["f", "a", "b", "e", "g"]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_does_not_depend_on_input_order(seed):
    shuffled = HAND[:]
    random.Random(seed).shuffle(shuffled)
    assert ids(pareto_front(shuffled)) == ids(pareto_front(HAND))


@pytest.mark.parametrize("seed", range(5))
def test_front_members_are_undominated_and_everyone_else_is_dominated(seed):
    rng = np.random.default_rng(seed)
    records = [rec(str(i), float(rng.integers(1, 30)), float(rng.integers(60, 80)) / 100)
               for i in range(60)]
    front = pareto_front(records)
    members = {id(r) for r in front}
    assert front and [r["flops"] for r in front] == sorted(r["flops"] for r in front)
    for p in records:
        beaten = any(dominates(q, p) for q in records)
        assert beaten == (id(p) not in members), p


def test_fronts_by_variant_are_each_variants_own_front():
    records = HAND + [rec("x", 1000, 0.81, variant="flat"), rec("y", 10, 0.5, variant="flat"),
                      rec("z", 2000, 0.80, variant="flat")]
    fronts = fronts_by_variant(records)
    assert set(fronts) == {"flat", "hilomoe"}
    assert ids(fronts["flat"]) == ["y", "x"]
    assert ids(fronts["hilomoe"]) == ids(pareto_front(HAND))


def test_empty_and_junk_inputs_give_empty_fronts():
    assert pareto_front([]) == []
    assert pareto_front([{}, {"status": "completed"}, rec("t", True, 0.7)]) == []


# -- ROI ------------------------------------------------------------------------------------

def test_roi_on_a_hand_example():
    records = [rec("base", 1000, 0.80, variant="dense"), rec("weak", 500, 0.70, variant="dense"),
               rec("h1", 800, 0.801), rec("h2", 600, 0.799), rec("h3", 1000, 0.803),
               rec("h4", 3000, 0.9), rec("f1", 100, 0.9, variant="flat")]
    out = roi(records)
    assert (out.baseline_trial, out.baseline_auc, out.baseline_flops) == ("base", 0.80, 1000)
    assert out.flops_at_auc_trial == "h1" and out.flops_saved == pytest.approx(0.20)
    assert out.auc_at_flops_trial == "h3" and out.auc_gain == pytest.approx(0.003)
    assert out.auc_gain_pct == pytest.approx(0.375)
    assert "20.0% fewer FLOPs" in out.headline() and "-18.5% FLOPs" in out.headline()
    json.dumps(out.as_dict(), allow_nan=False)


def test_roi_when_the_model_costs_more_or_never_catches_up():
    costly = roi([rec("b", 1000, 0.80, variant="dense"), rec("h", 1500, 0.81)])
    assert costly.flops_saved == pytest.approx(-0.5) and costly.auc_gain is None
    assert "50.0% more FLOPs" in costly.headline()
    behind = roi([rec("b", 1000, 0.80, variant="dense"), rec("h", 900, 0.79)])
    assert behind.flops_saved is None and behind.auc_gain == pytest.approx(-0.01)
    assert "No hilomoe trial reaches" in behind.headline()


@pytest.mark.parametrize("records, missing", [
    ([rec("h", 10, 0.7)], "no completed dense trial"),
    ([rec("b", 10, 0.7, variant="dense")], "no completed hilomoe trial"),
    ([rec("b", 10, 0.7, variant="dense", status="failed")], "no completed dense trial and"),
])
def test_roi_explains_itself_without_a_baseline_or_a_model(records, missing):
    out = roi(records)
    assert isinstance(out, str) and missing in out


# -- scaling fits ---------------------------------------------------------------------------

A, B, C = 2.0, 0.35, 0.19
X = np.geomspace(1e3, 1e7, 20)


def truth(x):
    return A * np.asarray(x) ** (-B) + C


def test_exact_power_law_is_recovered():
    law = fit_power_law(X, 1 - truth(X))
    assert (law.a, law.b, law.c) == pytest.approx((A, B, C), rel=1e-6)
    assert law.rmse < 1e-9
    assert np.allclose(law.auc(X), 1 - truth(X), atol=1e-9)


def test_noisy_power_law_lies_in_its_intervals_and_extrapolates():
    sigma, covered = 0.002, 0
    spread = float(np.ptp(truth(X)))
    for seed in range(10):
        auc = 1 - truth(X) - np.random.default_rng(seed).normal(0, sigma, X.size)
        law = fit_power_law(X, auc)
        covered += all(lo <= true <= hi for true, (lo, hi)
                       in zip((A, B, C), (law.ci["a"], law.ci["b"], law.ci["c"])))
        low, high = law.band(X)
        assert np.all(low <= law.auc(X)) and np.all(law.auc(X) <= high)
        check = heldout_check(X, auc)
        assert (check.n_fit, check.n_test) == (10, 10)
        assert check.mae < 0.15 * spread and check.max_abs >= check.mae
    assert covered >= 8


@pytest.mark.parametrize("x, auc, fragment", [
    ([1e3, 1e4], [0.7, 0.75], "needs 3 distinct values, got 2"),
    ([5.0] * 8, [0.7] * 8, "needs 3 distinct values, got 1"),
    ([1, 2, 4], [0.7, 0.72, 0.73], "needs 4 points"),
    ([1, 2, math.nan, 8], [0.7, 0.72, 0.73, 0.74], "needs 4 points for a degree of freedom, got 3"
     " (1 non-finite or non-positive dropped)"),
    ([1, 2, 4, 8], [0.7, math.nan, None, 0.74], "needs 3 distinct values, got 2"),
    ([], [], "needs 3 distinct values, got 0"),
])
def test_degenerate_fits_are_explained_skips(x, auc, fragment):
    out = fit_power_law(x, auc)
    assert isinstance(out, str) and fragment in out
    assert isinstance(heldout_check(x, auc), str)


def test_flat_or_rising_data_never_raises():
    for auc in ([0.7] * 6, [0.8, 0.79, 0.78, 0.77, 0.76, 0.75]):
        out = fit_power_law([1, 2, 4, 8, 16, 32], auc)
        assert isinstance(out, str) or all(math.isfinite(v) for v in (out.b, out.c))
        json.dumps(fit_axis([rec(str(i), 2 ** i, a, experts=2 ** i)
                             for i, a in enumerate(auc)], "experts").as_dict(), allow_nan=False)


def test_a_law_drawn_from_a_known_law_is_identified():
    auc = 1 - truth(X) - np.random.default_rng(0).normal(0, 0.002, X.size)
    fit = fit_axis([rec(str(i), x, a, experts=x) for i, (x, a) in enumerate(zip(X, auc))],
                   "flops")
    assert fit.identified and identification(fit.law) is None and fit.propose == []


@pytest.mark.parametrize("auc, fragment", [
    # falls once, then flat: the best fit puts the exponent on its bound
    ([0.70, 0.75, 0.75, 0.75, 0.75, 0.75], "sits at its bound (b = 5)"),
    # flat with noise: no trend the exponent could carry
    ([0.750, 0.751, 0.749, 0.750, 0.752, 0.749], ""),
])
def test_a_law_at_its_bound_or_spanning_zero_is_not_identified(auc, fragment, tmp_path):
    xs = [4, 8, 16, 32, 64, 128]
    records = [rec(str(i), 10 * x, a, experts=x) for i, (x, a) in enumerate(zip(xs, auc))]
    fit = fit_axis(records, "experts")
    assert fit.law is not None and not fit.identified
    assert fragment in fit.unidentified
    assert fit.propose == [1.0, 2.0, 256.0, 512.0]  # the range widened at both ends
    d = fit.as_dict()
    assert d["identified"] is False and d["unidentified_reason"] == fit.unidentified
    report = write_report(records, tmp_path / "out", "flat")
    text = report.markdown.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| experts K"))
    assert "not identified" in row and "try 1, 2, 256, 512" in row
    assert "| experts K | 0." not in text  # no coefficients printed as if they meant something


def test_identification_reads_the_exponent_and_its_interval():
    law = fit_power_law(X, 1 - truth(X) - np.random.default_rng(1).normal(0, 0.002, X.size))
    assert identification(law) is None
    for b, ci, fragment in ((5.0, (4.0, 6.0), "bound"), (0.0, (0.0, 0.1), "sits at 0"),
                            (0.5, (-0.2, 1.2), "reaches 0"), (0.5, None, "no interval")):
        law.b = b
        law.ci = None if ci is None else {**law.ci, "b": ci}
        assert fragment in identification(law)


def test_architecture_axes_keep_the_best_trial_per_value():
    records = [rec("k2a", 10, 0.70, experts=2), rec("k2b", 11, 0.72, experts=2),
               rec("k4", 12, 0.74, experts=4), rec("k8", 13, 0.75, experts=8),
               rec("flat", 14, 0.9, variant="flat", experts=16)]
    fit = fit_axis(records, "experts")
    assert (fit.x, fit.trials) == ([2.0, 4.0, 8.0], ["k2b", "k4", "k8"])
    assert "needs 4 points" in fit.reason and "6 distinct" in fit.heldout_reason
    assert fit_axis(records, "flops").x == [10.0, 11.0, 12.0, 13.0]


def test_heldout_check_needs_six_distinct_values():
    assert "needs 6 distinct values, got 5" in heldout_check(X[:5], 1 - truth(X[:5]))
    check = heldout_check(X[:7], 1 - truth(X[:7]))
    assert (check.n_fit, check.n_test) == (4, 3) and check.mae < 1e-6


# -- the written report ---------------------------------------------------------------------

def study() -> list[dict]:
    """12 trials: a dense baseline, HiLoMoE over K and L, a flat and a sequential, pruned, failed."""
    out = [rec("dense0", 4000.0, 0.790, variant="dense", params_active=30000,
               params_total=30000, stage1_reused=False, stage1_seconds=2.0)]
    for i, k in enumerate((2, 4, 8, 16)):
        out.append(rec(f"k{k}", 1000.0 + 150 * k, 0.80 - 0.02 * k ** -0.5, experts=k, levels=2,
                       rank=1, top_k=2, params_active=20000 + 800 * k,
                       params_total=20000 + 3000 * k, params={"model.moe.experts": k,
                                                              "stages.joint.lr": 3e-3},
                       stage1_reused=i > 0, stage1_seconds=3.0))
    for lv in (1, 2, 3):
        out.append(rec(f"l{lv}", 900.0 + 500 * lv, 0.785 + 0.003 * lv, experts=4, levels=lv,
                       rank=1, top_k=2, params_active=19000 + 2000 * lv,
                       params_total=21000 + 5000 * lv, stage1_reused=True, stage1_seconds=1.5))
    out.append(rec("flat0", 2500.0, 0.793, variant="flat", experts=8, params_active=24000))
    out.append(rec("seq0", 3500.0, 0.796, variant="sequential", experts=8, params_active=26000))
    out.append(rec("pruned0", 1500.0, 0.70, status="pruned", experts=4))
    out.append(rec("failed0", None, None, status="failed"))
    return out


def test_write_report_on_a_small_study(tmp_path):
    records = study()
    assert len(records) == 12
    report = write_report(records, tmp_path / "out", "expert scaling", meta={"dataset": "toy"})
    text = report.markdown.read_text()
    assert text.startswith("# expert scaling") and "**dataset**: toy" in text
    front = pareto_front(records)
    assert [p["trial_id"] for p in report.pareto] == ids(front)
    for r in front:
        assert any(line.startswith("| ") and f"`{r['trial_id']}`" in line
                   for line in text.splitlines())
    assert "`pruned0`" not in text and "-18.5% FLOPs" in text
    assert "| 10 | 1 | 1 | 0 |" in text                      # completed, pruned, failed, other
    assert "6 trial(s) reused a cached stage 1, saving 13.5 s" in text

    names = {p.name for p in report.plots}
    assert {"pareto.png", "scaling_flops.png", "scaling_params_active.png",
            "scaling_experts.png"} <= names and "scaling_levels.png" not in names
    for plot in report.plots:
        assert plot.read_bytes()[:8] == PNG and plot.stat().st_size > 5000
        assert f"]({plot.name})" in text
    assert report.fits["levels"]["reason"] and "skipped" in text
    assert report.roi["available"] and report.roi["flops_saved"] > 0
    json.dumps(report.as_dict(), allow_nan=False)
    # Nothing is left half-written or staged beside the report.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted(names | {"report.md", "report.html"})


def test_the_html_report_holds_its_plots_and_links_its_trials(tmp_path):
    """MLflow renders HTML artifacts in a frame that cannot fetch sibling files: every plot is
    inlined, every table renders, and trial ids link to their runs."""
    import base64
    import html.parser

    records = study()
    links = {"k4": "/#/experiments/1/runs/abc", "dense0": "/#/experiments/1/runs/def"}
    report = write_report(records, tmp_path / "out", "expert scaling", links=links)
    page = (tmp_path / "out" / "report.html").read_text()

    class Parse(html.parser.HTMLParser):
        images, anchors, cells = [], [], 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images.append(attrs["src"])
            elif tag == "a":
                self.anchors.append((attrs["href"], attrs.get("target")))
            elif tag == "td":
                self.cells += 1

    parsed = Parse()
    parsed.feed(page)
    assert len(parsed.images) == len(report.plots) >= 3
    for src, plot in zip(parsed.images, report.plots):  # each image is its plot, inlined
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == plot.read_bytes()
    assert ("/#/experiments/1/runs/abc", "_top") in parsed.anchors
    assert ("/#/experiments/1/runs/def", "_top") in parsed.anchors
    assert parsed.cells > 20 and "|" not in page.split("<body>")[1].split("<table>")[0][-3:]


def test_write_report_with_nothing_completed(tmp_path):
    records = [rec("p", 10, 0.7, status="pruned"), rec("f", None, None, status="failed"),
               rec("c", math.nan, 0.7)]
    report = write_report(records, tmp_path, "empty")
    text = report.markdown.read_text()
    assert "Nothing to report" in text and report.plots == [] and report.pareto == []
    assert "| 1 | 1 | 1 | 0 |" in text and "1 completed trial(s) lack" in text
    assert not list(tmp_path.glob("*.png"))
    json.dumps(report.as_dict(), allow_nan=False)
    assert write_report([], tmp_path / "none", "none").markdown.exists()


def test_write_report_with_one_record_and_no_baseline(tmp_path):
    report = write_report([rec("solo", 100.0, 0.7, experts=4)], tmp_path, "solo")
    text = report.markdown.read_text()
    assert [p.name for p in report.plots] == ["pareto.png"]
    assert report.roi == {"available": False, "reason": report.roi["reason"]}
    assert "no completed dense trial" in text and "`solo`" in text
    assert all(fit["law"] is None for fit in report.fits.values())
    json.dumps(report.as_dict(), allow_nan=False)


def test_usable_is_what_takes_part():
    assert ids(usable(HAND)) == ["a", "b", "c", "d", "e", "f", "g", "h"]


# -- the joint law in parameters and data ------------------------------------------------------

JOINT = {"E": 0.08, "A": 0.05, "alpha": 0.6, "B": 0.04, "beta": 0.4}


def joint_truth(n, d):
    return (JOINT["E"] + JOINT["A"] * (np.asarray(n) / 1e4) ** -JOINT["alpha"]
            + JOINT["B"] * (np.asarray(d) / 1e5) ** -JOINT["beta"])


def crossed_design():
    """Two one-factor grids crossing at (N, D) = (1e4, 1e5): as a law design runs them."""
    n = [1e4 * f for f in (0.25, 0.5, 1, 2, 4, 8)] + [1e4] * 5
    d = [1e5] * 6 + [1e5 * f for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)]
    return np.array(n), np.array(d)


def test_the_joint_law_lands_inside_its_intervals_and_predicts_the_held_out_corner():
    from hilomoe.report.joint_law import fit_joint, joint_identification

    n, d = crossed_design()
    covered = 0
    for seed in range(10):
        auc = 1 - joint_truth(n, d) - np.random.default_rng(seed).normal(0, 0.0005, n.size)
        records = [rec(str(i), 1, a, params_active=ni, train_rows=di)
                   for i, (ni, di, a) in enumerate(zip(n, d, auc))]
        fit = fit_joint(records)
        law = fit.law
        assert law is not None and fit.unidentified is None, fit.reason or fit.unidentified
        assert joint_identification(law) is None
        # scale-free parameters directly; A and B through the rescaling N / scale_n
        truth = {"E": JOINT["E"], "alpha": JOINT["alpha"], "beta": JOINT["beta"],
                 "A": JOINT["A"] * (law.scale_n / 1e4) ** -JOINT["alpha"],
                 "B": JOINT["B"] * (law.scale_d / 1e5) ** -JOINT["beta"]}
        covered += all(law.ci[k][0] <= v <= law.ci[k][1] for k, v in truth.items())
        assert fit.heldout_mae is not None and fit.heldout_mae < 0.01
        json.dumps(fit.as_dict(), allow_nan=False)
    assert covered >= 8


def test_a_joint_law_without_a_data_axis_is_explained():
    from hilomoe.report.joint_law import fit_joint

    records = [rec(str(i), 1, 0.8 + 0.01 * i, params_active=1000 * 2 ** i, train_rows=1e5)
               for i in range(8)]
    fit = fit_joint(records)
    assert fit.law is None and "1 D" in fit.reason


def test_study_report_imports_neither_torch_nor_ray(tmp_path):
    """`hilomoe study report DIR` reads JSON: run in a fresh process on a study directory of
    trial records, it writes the report without importing torch or Ray (not even through the
    record loader)."""
    import subprocess
    import sys

    from hilomoe.tracking.records import save_record

    for record in study():
        save_record(tmp_path, record)
    probe = ("import json, sys\n"
             "from hilomoe.cli import main\n"
             "code = main(['study', 'report', sys.argv[1], '--json'])\n"
             "print(json.dumps({'code': code, 'heavy': sorted(m for m in ('torch', 'ray')\n"
             "                                               if m in sys.modules)}))\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report, probed = (json.loads(line) for line in proc.stdout.splitlines() if line.strip())
    assert probed == {"code": 0, "heavy": []}
    assert report["trials"] == 12 and (tmp_path / "report" / "report.md").is_file()
