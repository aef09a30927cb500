"""`benchmarks/synthetic_ablation.py` end to end at toy size: every variant trains on the same schedule, is
evaluated per level, lands in the results table, and a re-run reuses finished runs and their evaluations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BENCHMARKS, load_benchmark, synth_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_variants_train_evaluate_and_resume(tmp_path, capsys):
    ablation = load_benchmark("synthetic_ablation")
    data = synth_benchmark(tmp_path / "data", train=8, val=4, test=4)
    tiny = ["data.image_size=64", "train.batch_size=2", "train.workers=0", "train.warmup_steps=0",
            "train.val_split=null", "model.decoder_layers=1", "model.generator_layers=1"]  # fmt: skip
    argv = ["--out", str(tmp_path / "bench"), "--data", str(data), "--steps", "2", "--device", "cpu"]
    argv += ["--variants", "linguistic,learnable-k1", *(a for item in tiny for a in ("--set", item))]
    assert ablation.main(argv) == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [r["variant"] for r in results] == ["linguistic", "learnable-k1"]
    for r in results:
        assert r["steps"] == 2 and r["split"] == "test" and r["protocol"] == "resized"
        assert set(r["by_level"]) <= {"1", "2", "3", "4"} and r["by_level"]
        assert 0.0 <= r["oIoU"] <= 100.0 and "train.max_steps=2" in r["command"]
        assert (tmp_path / "bench" / r["variant"] / "eval-test.json").is_file()
    table = (tmp_path / "bench" / "results.md").read_text().splitlines()
    assert table[0].startswith("| variant | oIoU | mIoU | P@0.5 | P@0.7 | P@0.9 | L1 oIoU") and table[
        2
    ].startswith("| linguistic |")
    assert "oIoU minus linguistic's [95% interval]" in (tmp_path / "bench" / "results.md").read_text()
    [difference] = json.loads((tmp_path / "bench" / "differences.json").read_text())
    assert difference["variant"] == "learnable-k1" and difference["against"] == "linguistic"
    overall = difference["overall"]
    assert overall["low"] <= overall["delta"] <= overall["high"]
    capsys.readouterr()
    assert ablation.main(argv) == 0  # finished: no training, no evaluation, the same numbers
    out = capsys.readouterr().out
    assert (
        "== linguistic" not in out
        and json.loads((tmp_path / "bench" / "results.json").read_text()) == results
    )


def test_paired_differences_follow_the_sentences_and_their_images():
    """The same sentences scored twice differ by exactly 0; a variant that is better on every level-1
    sentence is better overall and on level 1 with an interval above 0, and the same on level 2; scores on
    other sentences are refused."""
    differences = load_benchmark("synthetic_ablation").paired_differences
    images = [str(i // 3) for i in range(60)]  # 20 images of 3 sentences
    levels = [1, 2] * 30
    union = [100] * 60
    a = {
        "variant": "a",
        "per_sentence": {"inter": [50] * 60, "union": union, "image": images, "level": levels},
    }
    better = [80 if lv == 1 else 50 for lv in levels]
    b = {"variant": "b", "per_sentence": {**a["per_sentence"], "inter": better}}
    [same, diff] = differences([a, dict(a, variant="a2"), b])
    assert all(same[g] == {"delta": 0.0, "low": 0.0, "high": 0.0} for g in ("overall", "1", "2"))
    assert "3" not in same  # no level-3 sentences
    assert diff["1"]["delta"] == pytest.approx(30.0) and diff["overall"]["delta"] == pytest.approx(15.0)
    assert 0 < diff["overall"]["low"] <= diff["overall"]["high"] and diff["2"]["delta"] == 0.0
    moved = {"variant": "c", "per_sentence": {**a["per_sentence"], "image": images[1:] + images[:1]}}
    with pytest.raises(ValueError, match="c was scored on other sentences than a"):
        differences([a, moved])


def test_unknown_variant_lists_the_valid_ones(tmp_path, capsys):
    assert (
        load_benchmark("synthetic_ablation").main(["--out", str(tmp_path), "--variants", "linguistic,k3"])
        == 2
    )
    assert (
        "unknown variant(s) k3; valid: linguistic, learnable-k1, learnable-k10, pwam"
        in capsys.readouterr().err
    )


def test_variants_train_in_turns_side_by_side_and_a_cut_short_benchmark_reports_where_they_stand(
    tmp_path, capsys
):
    """--chunk trains the variants in turns (a benchmark cut short leaves them at the same step), --jobs 2
    two turns at once, each process writing to its RUN/console.txt; --hours 0 starts no turn and reports
    the checkpoints as they are, marked mid-schedule."""
    ablation = load_benchmark("synthetic_ablation")
    data = synth_benchmark(tmp_path / "data", train=8, val=4, test=4)
    tiny = ["data.image_size=64", "train.batch_size=2", "train.workers=0", "train.warmup_steps=0",
            "train.val_split=null", "model.decoder_layers=1", "model.generator_layers=1"]  # fmt: skip
    argv = ["--out", str(tmp_path / "bench"), "--data", str(data), "--device", "cpu"]
    argv += ["--variants", "linguistic,pwam", *(a for item in tiny for a in ("--set", item))]
    assert ablation.main([*argv, "--steps", "2", "--hours", "0"]) == 1
    assert "no variant has a checkpoint yet" in capsys.readouterr().err
    assert ablation.main([*argv, "--steps", "2", "--chunk", "1", "--jobs", "2"]) == 0
    turns = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert all("output in" in turn for turn in turns)
    turns = [turn.split(" (")[0] for turn in turns]
    assert turns[:2] == ["== linguistic: training to step 1", "== pwam: training to step 1"]
    assert sorted(turns[2:]) == ["== linguistic: continuing to step 2", "== pwam: continuing to step 2"]
    for name in ("linguistic", "pwam"):
        console = (tmp_path / "bench" / name / "console.txt").read_text()
        assert "stopped at step 1" in console and "finished at step 2" in console
    assert ablation.main([*argv, "--steps", "4", "--hours", "0"]) == 0  # a longer schedule, no time left
    rows = (tmp_path / "bench" / "results.md").read_text().splitlines()[2:4]
    assert [row.split(" |")[0] for row in rows] == ["| linguistic", "| pwam"]
    assert all("| 2 of 4 (mid-schedule) |" in row for row in rows)


def test_a_stopped_benchmark_stops_its_training_processes(tmp_path):
    """SIGTERM (a session's end, `kill`) to the benchmark ends the `lgformer train` processes it started."""
    data = synth_benchmark(tmp_path / "data", train=8, val=4, test=4)
    out = tmp_path / "bench"
    tiny = ["data.image_size=64", "train.batch_size=2", "train.workers=0", "model.decoder_layers=1"]
    argv = [sys.executable, str(BENCHMARKS / "synthetic_ablation.py"), "--out", str(out), "--data", str(data)]
    argv += ["--device", "cpu", "--jobs", "2", "--variants", "linguistic,pwam", "--steps", "1000"]
    bench = subprocess.Popen(
        [*argv, *(a for item in tiny for a in ("--set", item))], stdout=subprocess.PIPE, text=True
    )
    turns = [bench.stdout.readline(), bench.stdout.readline()]
    assert all(turn.startswith("== ") for turn in turns)
    logs = [out / name / "console.txt" for name in ("linguistic", "pwam")]
    while not all(log.is_file() and "it/s" in log.read_text() for log in logs):  # both are training
        assert bench.poll() is None
        time.sleep(0.5)
    bench.send_signal(signal.SIGTERM)
    code = bench.wait(timeout=60)
    left = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # ended meanwhile
            continue
        if f"{out}/" in command:  # a variant's run folder: one of the benchmark's training processes
            left[int(pid)] = command
    for pid in left:  # not left behind by a failing test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"left running: {list(left.values())}"
    assert code == 128 + signal.SIGTERM


def test_a_bad_override_is_one_line_before_any_work(tmp_path, capsys):
    ablation = load_benchmark("synthetic_ablation")
    assert ablation.main(["--out", str(tmp_path / "bench"), "--set", "model.fusoin=pwam"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("synthetic_ablation: error: ")
        and "unknown key 'fusoin'" in err
        and err.count("\n") == 1
    )
    assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize("bad", [["--chunk", "0"], ["--hours", "-1"], ["--jobs", "0"]])
def test_a_turn_of_no_steps_or_negative_hours_is_refused(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("synthetic_ablation").main(["--out", str(tmp_path), *bad])
    assert exit_info.value.code == 2 and bad[0] in capsys.readouterr().err
