"""``lora-lightning compare``: the grid it builds, the files and rows it writes, skipping finished runs, a failed
run recorded without stopping the others, identical data order across methods, and the child-process mode."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import yaml

from lora_lightning import compare
from lora_lightning.cli import main as cli_main

PNG = b"\x89PNG\r\n\x1a\n"


def _teacher_config(tmp_path) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 6, "val_check_interval": 3, "check_val_every_n_epoch": None,
                    "logger": False, "enable_checkpointing": False, "num_sanity_val_steps": 0},
        "model": {
            "backbone": {"class_path": "lora_lightning.data.synthetic.TeacherBackbone",
                         "init_args": {"d_in": 8, "d_out": 8, "seed": 0}},
            "task": "regression", "num_classes": 8, "lr": 0.05, "warmup": 0, "scheduler": "constant",
            "adapter": {"r": 2, "alpha": 2, "target_modules": ["linear"], "modules_to_save": []},
        },
        "data": {"class_path": "lora_lightning.data.synthetic.TeacherDataModule",
                 "init_args": {"d_in": 8, "d_out": 8, "rank": 2, "n_train": 32, "n_val": 16, "seed": 0,
                               "batch_size": 8}},
    }
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _records(out) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json") if not p.stem.endswith(".spec")}


def test_compare_two_methods_writes_runs_summary_and_plots_then_skips(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--config", _teacher_config(tmp_path), "--methods", "lora,dora", "--seeds", "0,1",
            "--variant", "broken=--model.adapter.r=100", "--target", "val_mse=1e9", "--out", str(out),
            "--in-process", "--trainer.max_steps=6"]
    assert cli_main(args) == 1  # through the real CLI entry point; 1 = some run failed

    records = _records(out)
    assert set(records) == {f"{m}-s{s}" for m in ("lora", "dora", "broken") for s in (0, 1)}
    for run_id in ("lora-s0", "lora-s1", "dora-s0", "dora-s1"):
        r = records[run_id]
        assert r["status"] == "ok" and r["global_step"] == 6
        assert [t[0] for t in r["train"]] == [1, 2, 3, 4, 5, 6]  # train loss at every optimiser step
        assert [v["step"] for v in r["val"]] == [3, 6]  # every validation of the schedule
        assert r["final_val_mse"] == r["val"][-1]["val_mse"]
        assert r["best_val_mse"] == min(v["val_mse"] for v in r["val"])
        assert r["steps_to_target"] == 3  # the first validation meets the (loose) target
        assert r["peak_mem_mb"] > 0 and r["wall_s"] > 0 and r["step_ms"] > 0
        (spectrum,) = r["spectra"].values()  # one adapted layer, r = 2 singular values
        assert len(spectrum["sigma"]) == 2
        assert spectrum["fro_norm"] == pytest.approx(sum(s * s for s in spectrum["sigma"]) ** 0.5, rel=1e-5)
    # identical data order at equal seed across methods; the seed changes it
    assert records["lora-s0"]["data_order"] == records["dora-s0"]["data_order"]
    assert records["lora-s1"]["data_order"] == records["dora-s1"]["data_order"]
    assert records["lora-s0"]["data_order"] != records["lora-s1"]["data_order"]
    # ... and the same initial adapter: LoRA and DoRA differ only in the method, so step 1 losses agree
    assert records["lora-s0"]["train"][0][1] == pytest.approx(records["dora-s0"]["train"][0][1], rel=1e-6)
    # the failed runs are recorded with the reason, and did not stop the others
    assert records["broken-s0"]["status"] == "error"
    assert "r=100 exceeds min(in, out)=8" in records["broken-s0"]["error"]

    with open(out / "summary.csv") as f:
        rows = {row["group"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"lora", "dora", "broken"}
    assert (rows["lora"]["ok"], rows["lora"]["runs"], rows["broken"]["ok"]) == ("2", "2", "0")
    mean = (records["lora-s0"]["final_val_mse"] + records["lora-s1"]["final_val_mse"]) / 2
    assert float(rows["lora"]["final_val_mse_mean"]) == pytest.approx(mean)
    assert rows["lora"]["target_reached"] == "2/2"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "val_mse" and summary["same_data_order_per_seed"] == {"0": True, "1": True}
    for name in ("loss.png", "val_mse.png", "spectra.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    printed = capsys.readouterr().out
    assert "| lora | 2/2 |" in printed and "4 run(s) done, 0 skipped" in printed

    # a second invocation skips the finished runs (their files are untouched) and retries the failed ones
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("lora-s*.json")}
    assert cli_main(args) == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("lora-s*.json")} == mtimes
    assert "0 run(s) done, 4 skipped (already done), 2 failed" in capsys.readouterr().out


def test_grid_sweeps_only_the_axes_a_method_uses(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {}\n")
    ns = compare.parser().parse_args(["--config", str(config), "--methods", "lora,lora_alpha,allora", "--r", "4,16",
                                      "--alpha", "8,32", "--C", "256", "--lr", "1e-3", "--seeds", "0,1"])
    runs = compare.build_runs(ns, ["--trainer.max_steps=9"], tmp_path)
    groups = {r.group for r in runs}
    assert groups == {
        "lora-r4-alpha8-lr0.001", "lora-r4-alpha32-lr0.001", "lora-r16-alpha8-lr0.001", "lora-r16-alpha32-lr0.001",
        "lora_alpha-r4-C256-lr0.001", "lora_alpha-r16-C256-lr0.001",  # α unused: s = C/√r
        "allora-r4-lr0.001", "allora-r16-lr0.001",  # neither α nor C: s = 1
    }
    assert len(runs) == 2 * len(groups) and [r.seed for r in runs[:8]] == [0] * 8  # seeds outermost
    run = next(r for r in runs if r.run_id == "lora_alpha-r16-C256-lr0.001-s1")
    for arg in ("--model.adapter.method=lora_alpha", "--seed_everything=1", "--model.adapter.r=16",
                "--model.adapter.C=256.0", "--model.lr=0.001", "--trainer.max_steps=9"):
        assert arg in run.cli_args
    allora = next(r for r in runs if r.label == "allora")
    assert "--model.adapter.dropout=0.0" in allora.cli_args  # ALLoRA trains without dropout by definition
    with pytest.raises(SystemExit, match="unknown method 'lora2'"):
        compare.build_runs(argparse.Namespace(**{**vars(ns), "methods": "lora2"}), [], tmp_path)


def test_target_parsing_and_steps_to_target():
    assert compare.parse_target("val_acc=0.9") == ("val_acc", ">=", 0.9)
    assert compare.parse_target("val_loss=0.3") == ("val_loss", "<=", 0.3)  # loss-like: lower is better
    assert compare.parse_target("val_f1>=0.5") == ("val_f1", ">=", 0.5)
    with pytest.raises(SystemExit, match="metric=value"):
        compare.parse_target("val_acc")
    val = [{"step": 10, "val_acc": 0.5}, {"step": 20, "val_acc": 0.91}, {"step": 30, "val_acc": 0.95}]
    assert compare._steps_to_target(val, [], ("val_acc", ">=", 0.9)) == 20
    assert compare._steps_to_target(val, [], ("val_acc", ">=", 0.99)) is None
    assert compare._steps_to_target([], [[1, 2.0, 0], [2, 0.5, 0]], ("train_loss", "<=", 1.0)) == 2


def test_child_process_run_records_its_own_peak_memory(tmp_path):
    out = tmp_path / "cmp"
    code = compare.main(["--config", _teacher_config(tmp_path), "--methods", "lora", "--out", str(out),
                         "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    assert code == 0
    (record,) = _records(out).values()
    assert record["status"] == "ok" and record["global_step"] == 2
    assert record["peak_mem_source"] == "max_rss_run_process" and record["peak_mem_mb"] > 10
    assert (out / "runs" / "lora-s0.log").is_file()
