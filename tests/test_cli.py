"""The command line (issue 12): bad arguments end in one line and exit status 2 before any
model or video loads; `run` writes its JSON and honours --size."""
from __future__ import annotations

import json

import pytest

from eventful_fx.cli import main


@pytest.mark.parametrize("argv, says", [
    (["run", "--budget", "2"], "--budget: 2"),
    (["bench", "--budget", "0.5,2", "--json", "o.json"], "--budget: 2"),  # was: crash after budget 0.5
    (["run", "--budget", "half"], "not a number"),
    (["run", "--frames", "1"], "--frames: 1"),
    (["run", "--threshold", "-1"], "--threshold"),
    (["run", "--json", "/no/such/folder/o.json"], "--json"),
    (["run", "--video", "/no/such/clip.mp4"], "--video"),
    (["run", "--video", "builtin:cartoon"], "--video: unknown built-in clip"),
    (["run", "--model", "vit_no_such_model"], "unknown model"),
    (["run", "--baselines", "eager,tensorrt"], "--baselines"),
    (["run", "--device", "gpu0"], "--device"),
    (["run", "--plot", "/no/such/folder/p.png"], "--plot"),
    (["analyze", "os:getcwd"], "not a torch.nn.Module"),
])
def test_bad_arguments_exit_2_with_one_line(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.json").exists()


def test_run_at_another_size_writes_json(capsys, tmp_path):
    out = tmp_path / "run.json"
    assert main(["run", "--model", "vit_tiny_patch16_224", "--size", "160", "--frames", "3", "--budget", "0.5",
                 "--baselines", "eager,packed", "--json", str(out)]) == 0  # was: timm's "Input height (160) doesn't match model (224)"
    assert "3 frames of 160x160" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert row["budget"] == 0.5 and row["mac_fraction"] < 0.55
    records = row["records"]  # one per incremental frame
    assert [r["frame"] for r in records] == [1, 2] and set(records[0]["dense_ms"]) == {"eager", "packed"}
    assert all(0 < r["mac_fraction"] < 0.55 and r["tokens_per_gate"] and r["eventful_ms"] > 0 for r in records)
    assert all(r["top1_agrees"] == (r["top1_dense"] == r["top1_eventful"]) for r in records)
    assert abs(sum(r["error"] for r in records) / 2 - row["rel_error"]) <= 1e-12


@pytest.mark.parametrize("command", ["run", "bench"])
def test_plot_writes_a_png(command, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "plot.png"
    assert main([command, "--model", "vit_tiny_patch16_224", "--size", "96", "--frames", "3", "--budget", "0.5,0.25",
                 "--baselines", "eager", "--plot", str(out)]) == 0
    image = imread(out)
    assert image.shape[:2] == ((800, 700) if command == "run" else (400, 1000)) and image.std() > 0
