"""The table of recipes over calibration seeds (ptq4dm.experiment.over_seeds) and the sweep summary's copy of it."""

import csv
import json
import math
import statistics

import pytest

from ptq4dm.experiment.over_seeds import job, over_seeds, recipe_and_seeds
from ptq4dm.experiment.summary import write_summary


def record(fid_over_fp, *overrides, seeds=None, fid_vs_fp=1.0):
    r = {"status": "ok", "overrides": ["bits=w8a8", "recon=qdrop", *overrides],
         "quantized": {"fid_over_fp": fid_over_fp, "fid_vs_fp": fid_vs_fp, "psnr_vs_fp": None}}
    if seeds is not None:
        r["calibration_seeds"] = dict(zip(("calib.seed", "recon.method.seed"), seeds))
    return r


def test_recipe_sets_aside_seeds_and_keys_that_change_no_score_in_one_spelling():
    recipe, seeds = recipe_and_seeds(["bits=w8a8", "experiment=main_10k", "recon=qdrop", "calib.seed=7",
                                      "recon.method.seed=7", "logger=csv", "progress=False",
                                      "metrics.inception_path=/x/default_1.pt", "data.root=/x/data",
                                      "metrics.fid_bootstrap=0", "ops.shortcut_split=true"])
    assert recipe == ("bits=w8a8", "experiment=main_10k", "ops.shortcut_split=true", "recon=qdrop")
    assert seeds == ("calib.seed=7", "recon.method.seed=7")
    # the same recipe spelt otherwise: True for true, a quoted string, an appended key, another order
    assert recipe_and_seeds(["+ops.shortcut_split=True", "bits='w8a8'", "recon=qdrop", "experiment=main_10k"])[0] \
        == recipe
    assert recipe_and_seeds(["ops.exclude=[a,b]"])[0] == ('ops.exclude=["a", "b"]',)
    assert recipe_and_seeds(["experiment=other", "bits=w8a8"])[0] != recipe_and_seeds(["bits=w8a8"])[0]


def test_one_row_per_recipe_with_the_statistics_over_its_seeds():
    jobs = [job(record(0.5)), job(record(0.4, "calib.seed=7", "recon.method.seed=7")),
            job(record(0.1, "calib.seed=99", "recon.method.seed=99")),
            job(record(0.9, "eval.precision=fp32")),  # another recipe, one seed: no row
            job(record(0.3, "calib.seed=7"))]  # the calibration seed alone: another seed setting than both at 7
    (row,) = over_seeds(jobs)
    values = [0.5, 0.4, 0.1, 0.3]
    assert row["recipe"] == "bits=w8a8 recon=qdrop" and row["n"] == 4
    assert row["seeds"] == "default, calib.seed=7, 7, 99"
    assert row["fid_over_fp_mean"] == pytest.approx(statistics.fmean(values))
    assert row["fid_over_fp_sd"] == pytest.approx(statistics.stdev(values))
    assert row["fid_over_fp_se"] == pytest.approx(statistics.stdev(values) / math.sqrt(4))
    assert (row["fid_over_fp_min"], row["fid_over_fp_max"]) == (0.1, 0.5)
    assert row["fid_vs_fp_sd"] == 0.0
    assert "psnr_vs_fp_mean" not in row  # not measured: no number made up


def test_seeds_are_the_ones_the_jobs_ran_with_and_repeats_count_once():
    """results.json's calibration_seeds (resolved: an interpolation such as recon.method.seed=${calib.seed}, or
    the defaults) name the seeds; the same seeds run twice are one seed setting at the mean of the two; a score
    that is not finite is left out rather than poisoning the mean."""
    jobs = [job(record(0.5, seeds=(1234, 0))), job(record(0.7, "calib.seed=1234", seeds=(1234, 0))),
            job(record(0.2, "calib.seed=7", "recon.method.seed=${calib.seed}", seeds=(7, 7))),
            job(record(float("nan"), "calib.seed=9", seeds=(9, 9)))]
    (row,) = over_seeds(jobs)
    assert row["n"] == 3 and row["seeds"] == "7, 9, calib.seed=1234 recon.method.seed=0 (x2)"
    assert row["fid_over_fp_mean"] == pytest.approx(statistics.fmean([0.6, 0.2]))  # (0.5 + 0.7) / 2 and 0.2
    assert over_seeds(jobs[:2]) == []  # one seed setting, run twice: no spread to report


def test_the_sweep_summary_writes_the_seed_table_and_drops_a_stale_one(tmp_path):
    """Job folders as ptq4dm.run leaves them (results.json with overrides and scores); jobs older than the
    fid_over_fp key count by their two FIDs; a failed job is left out."""
    def write(name, overrides, q_fid, status="ok"):
        folder = tmp_path / name
        folder.mkdir()
        r = {"status": status, "axes": {"bits": "w8a8"}, "overrides": overrides, "fp": {"fid": 18.0},
             "quantized": {"fid": q_fid, "fid_vs_fp": 1.0, "psnr_vs_fp": 34.0}}
        (folder / "results.json").write_text(json.dumps(r))

    write("bits=w8a8", ["bits=w8a8"], 18.5)
    write("bits=w8a8,calib.seed=7", ["bits=w8a8", "calib.seed=7"], 18.3)
    write("bits=w8a8,calib.seed=8", ["bits=w8a8", "calib.seed=8"], 30.0, status="failed")
    table = write_summary(tmp_path, every_folder=True)
    assert "Over calibration seeds" in table
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert float(rows["bits=w8a8,calib.seed=7"]["fid_over_fp"]) == pytest.approx(0.3)  # in the job table too
    lines = (tmp_path / "summary_seeds.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("bits=w8a8,2,\"default, calib.seed=7\",0.4")
    for name in ("bits=w8a8,calib.seed=7", "bits=w8a8,calib.seed=8"):
        (tmp_path / name / "results.json").unlink()
    assert "Over calibration seeds" not in write_summary(tmp_path, every_folder=True)
    assert not (tmp_path / "summary_seeds.csv").exists() and not (tmp_path / "summary_seeds.md").exists()
    write_summary(tmp_path, every_folder=True)
    (tmp_path / "summary_seeds.md").write_text("stale")
    (tmp_path / "bits=w8a8" / "results.json").unlink()
    assert write_summary(tmp_path, every_folder=True) is None and not (tmp_path / "summary_seeds.md").exists()
