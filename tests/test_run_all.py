"""run_all.sh: runs the selected scripts, keeps going past a failure, summarises from results.json."""
import csv
import json
import os
import re
import shlex
import subprocess
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import fcn
import metrics
from conftest import command, voc_xml, write_cifar10, write_mnist, write_sbd, write_voc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summary_row_headline_and_paper_figure():
    paper = {"data": "imagenet", "test_error": 0.4, "top5_error": 0.18}
    rec = {"script": "a.py", "data": "imagenet", "metrics": {"test_error": 0.5, "top5_error": 0.3},
           "paper": paper, "config": {"epochs": 3}, "device": "cuda:0", "seconds": 12.0}
    row = metrics.summary_row("a", rec, "python a.py")
    assert (row["metric"], row["ours"], row["paper"], row["epochs"]) == ("top5_error", 0.3, 0.18, 3)
    # Another data set than the paper's: our figure, no paper figure beside it.
    row = metrics.summary_row("a", {**rec, "data": "shapes"})
    assert row["ours"] == 0.3 and row["paper"] == ""
    # Without a paper top-5 figure the test error is the headline; detection's mAP comes first.
    row = metrics.summary_row("b", {**rec, "paper": {"data": "imagenet", "test_error": 0.4}})
    assert (row["metric"], row["ours"], row["paper"]) == ("test_error", 0.5, 0.4)
    row = metrics.summary_row("c", {**rec, "metrics": {"map": 0.6, "test_error": 0.1}})
    assert (row["metric"], row["ours"]) == ("map", 0.6)
    row = metrics.summary_row("d", None, "python d.py", error="d.py: error: no data")
    assert row["status"] == "failed: d.py: error: no data" and row["ours"] == ""
    row = metrics.summary_row("e", {**rec, "config": {"epochs": 1, "dry_run": True}})
    assert (row["status"], row["paper"]) == ("ok (dry run)", "")


@pytest.mark.slow
def test_run_all_dry_run_checks_paper_runs_keeps_going_and_summarises(tmp_path):
    # The paper run of lenet5 on tiny MNIST idx files in the real format, with the flags after
    # `--` at batch 2: the real loader, the paper's network, 2 steps, 2 test batches, checkpoint
    # read back, results.json (the other scripts' dry runs are tested in their own files, in
    # process: a tiny CIFAR file here would fail its md5 check). AlexNet's paper run finds no
    # ImageNet there: it fails with its one-line error and the others go on.
    from conftest import write_mnist
    tree = tmp_path / "data"
    write_mnist(tree)
    out = tmp_path / "dry"
    p = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--dry-run", "--only",
                        "lenet5", "alexnet", "--out", str(out), "--", "--data-dir",
                        str(tree), "--no-download", "--device", "cpu", "--batch-size", "2",
                        "--log-every", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 run(s) failed: alexnet" in p.stderr
    res = json.load(open(out / "runs" / "lenet5" / "results.json"))
    assert res["config"]["dry_run"] is True and res["data"] == "mnist"
    assert res["config"]["batch_size"] == 2
    log = open(out / "runs" / "lenet5" / "log.txt").read()
    assert "epoch 1/1 step 2/2 " in log and "step 3/" not in log
    rows = {r["run"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert set(rows) == {"lenet5", "alexnet"} and rows["lenet5"]["status"] == "ok (dry run)"
    assert rows["lenet5"]["command"].startswith("python lenet5.py --data mnist --out ")
    assert rows["lenet5"]["command"].endswith("--dry-run --overwrite --data-dir " + str(tree) +
                                              " --no-download --device cpu --batch-size 2 "
                                              "--log-every 1")
    bad = rows["alexnet"]["status"]
    assert bad.startswith("failed: alexnet.py: error:") and "ImageNet" in bad
    md = open(out / "summary.md").read()
    assert md.count("\n| lenet5 |") == 1 and "failed: alexnet.py" in md


def paper_trees(root):
    """One --data-dir holding every paper's data set in its real format, a few images each:
    MNIST idx files, CIFAR-10 batches, ImageNet class folders (2 synsets) and their box XML,
    VOC2007 trainval and test, VOC2012 trainval and its segmentation train/val (palette PNG masks), FCN's: SBD train
    (.mat masks) and the 736 seg11valid images in VOC2012's tree (16 x 12 pixels)."""
    write_mnist(root)
    write_cifar10(root)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(
                    folder / f"{wnid}_{i}.JPEG")
                boxes = root / "imagenet" / "bbox" / split / (wnid if split == "train" else "")
                boxes.mkdir(parents=True, exist_ok=True)  # ILSVRC's box XML (OverFeat §4)
                (boxes / f"{wnid}_{i}.xml").write_text(voc_xml(
                    f"{wnid}_{i}.JPEG", 80, 60, [(wnid, 11, 5, 60, 50, 0)]))
    images = {"000001": (64, 48, [("dog", 5, 6, 30, 40, 0), ("person", 33, 2, 60, 47, 0)]),
              "000002": (50, 40, [("car", 1, 1, 50, 40, 0)]),
              "000003": (56, 44, [("cat", 10, 8, 50, 40, 0)]),
              "000004": (48, 64, [("bird", 4, 4, 40, 60, 0)])}
    for year, image_set in (("2007", "trainval"), ("2007", "test"), ("2012", "trainval")):
        write_voc(root, year, image_set, images)
    for image_set in ("train", "val"):
        write_voc(root, "2012", image_set, images, seg=True)
    write_sbd(str(root / "SBD"), images)
    write_voc(root, "2012", "seg11valid", {i: (16, 12, [("cat", 2, 2, 12, 10, 0)])
                                           for i in fcn.seg11valid()}, seg=True)


@pytest.mark.slow
def test_every_paper_runs_dry_run_reads_its_real_data_format(tmp_path, monkeypatch):
    # `bash run_all.sh --dry-run`'s own command lines (--list), each run in process (a new
    # python costs ~6 s here) on tiny trees in the papers' real formats: the real loaders and
    # transforms, the paper's recipe and test protocol, 2 steps per stage, 2 test batches,
    # the checkpoint read back, results.json written. For this CPU: batch 2 (FCN: its paper's
    # 1), and --width 0.125 for the four networks whose paper test is minutes here at full
    # width (VGG-19's dense multi-scale test, GoogLeNet's 144 crops, OverFeat's 6-scale test,
    # YOLO at 448 after its ImageNet pre-training); the --pretrained runs (SSD, FCN-32s, the fine-tuning) read
    # torchvision-layout weights of random values from the hub cache (no download), at width 1.
    tree = tmp_path / "data"
    paper_trees(tree)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(hub))
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    for build, weights in ((torchvision.models.vgg16, torchvision.models.VGG16_Weights),
                           (torchvision.models.alexnet, torchvision.models.AlexNet_Weights)):
        torch.save(build().state_dict(), hub / "hub" / "checkpoints" /
                   os.path.basename(weights.IMAGENET1K_V1.url))
    out = tmp_path / "dry"
    listed = subprocess.run(
        ["bash", os.path.join(ROOT, "run_all.sh"), "--dry-run", "--list", "--out", str(out), "--",
         "--data-dir", str(tree), "--no-download", "--device", "cpu", "--batch-size", "2",
         "--workers", "0", "--log-every", "1"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    runs = [line.split(": ", 1) for line in listed.stdout.strip().splitlines()]
    assert len(runs) == 19 and not out.exists()  # --list runs nothing
    failed, seconds = [], {}
    for name, line in runs:
        launcher, script, *argv = shlex.split(line)
        assert launcher == "python"
        if script in ("vgg19.py", "googlenet.py", "overfeat.py", "yolo.py") and name != "nin":
            argv += ["--width", "0.125"]
        if script == "fcn.py":
            argv += ["--batch-size", "1"]  # FCN's own (the paper's), at 134M parameters
        # The first run of each script draws its pictures, as a user's run does (an FCN run
        # once failed there alone); the others do not (~1 s a run).
        drawn = all(script not in line for _, line in runs[:runs.index([name, line])])
        monkeypatch.setenv("REPRO_NO_PLOTS", "0" if drawn else "1")
        start = time.time()
        r = command(script, argv)
        seconds[name] = round(time.time() - start, 1)
        if r.returncode != 0:
            failed.append(f"{name}: {r.stderr.strip()[-500:]}")
            continue
        said = r.stdout
        res = json.load(open(out / "runs" / name / "results.json"))
        want = re.search(r"--data (\S+)", line).group(1)
        if (res["config"]["dry_run"] is not True or res["data"] != want or
                "step 3/" in said or not re.search(r" step 2/2 ", said) or
                not (out / "runs" / name / "checkpoint.pt").exists() or
                (out / "runs" / name / "curves.png").exists() != drawn):
            failed.append(f"{name}: not a dry run of {want} (data {res['data']}, "
                          f"config {res['config'].get('dry_run')})")
    print(seconds)
    assert not failed, "\n".join(failed)


def test_run_all_rejects_unknown_names_and_flags(tmp_path):
    for args in (["--only", "lenet6"], ["--frobnicate"]):
        p = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--quick", *args,
                            "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.startswith("run_all.sh: error:"), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "runs").exists()


def test_metrics_tabulates_any_run_folders_whoever_made_them(tmp_path, capsys):
    # Run folders written by the scripts themselves (no run_all.sh files), nested at any depth,
    # one damaged; a run folder given on its own; a folder without runs is an error.
    rec = dict(metrics={"test_error": 0.25}, paper={"data": "mnist", "test_error": 0.0095},
               config={"epochs": 3}, device="cpu", seconds=12.0)
    metrics.write_results(str(tmp_path / "runs" / "lenet5-mnist" / "results.json"), "lenet5.py",
                          "mnist", **rec)
    metrics.write_results(str(tmp_path / "runs" / "yolo-shapes-det" / "pretrain" /
                              "results.json"), "yolo.py", "shapes", {"test_error": 0.5})
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "results.json").write_text("{not json")
    assert os.stat(tmp_path / "runs" / "lenet5-mnist" / "results.json").st_mode & 0o777 == 0o644
    capsys.readouterr()
    rows = metrics.main([str(tmp_path / "runs"), "--md", str(tmp_path / "t.md"),
                         "--csv", str(tmp_path / "t.csv")])
    said = capsys.readouterr().out
    assert [r["run"] for r in rows] == ["broken", "lenet5-mnist", "yolo-shapes-det/pretrain"]
    lenet = rows[1]
    assert (lenet["script"], lenet["ours"], lenet["paper"], lenet["epochs"], lenet["seconds"],
            lenet["status"]) == ("lenet5.py", 0.25, 0.0095, 3, 12.0, "ok")
    assert rows[0]["status"].startswith("failed: ") and "broken/results.json" in rows[0]["status"]
    assert "| lenet5-mnist | lenet5.py | mnist | test_error | 25.00 % | 0.95 % | 3 |" in said
    assert said.strip().endswith("3 run(s), 1 failed: broken; table in " + str(tmp_path / "t.md")
                                 + "; rows in " + str(tmp_path / "t.csv"))
    assert open(tmp_path / "t.md").read().count("\n| ") == 4  # the header and 3 rows
    assert len(list(csv.DictReader(open(tmp_path / "t.csv")))) == 3
    one = metrics.main([str(tmp_path / "runs" / "lenet5-mnist")])
    assert [r["run"] for r in one] == ["lenet5-mnist"]
    for argv, message in (([str(tmp_path / "nowhere")], "is not a folder"),
                          ([str(tmp_path / "runs" / "broken" / "results.json")], "is not a folder")):
        with pytest.raises(SystemExit) as e:
            metrics.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        metrics.main([str(tmp_path / "empty")])
    assert e.value.code == 1 and "no results.json under" in capsys.readouterr().err


class Parsed(Exception):
    """Raised by a stand-in for data.setup: the script's flags as its main() resolved them."""


def test_each_paper_run_takes_as_many_gpus_as_divide_its_global_batch(monkeypatch):
    # Every script refuses a global batch that its processes cannot share equally: on 3, 5, 6
    # or 7 GPUs a run on all of them would fail, and FCN's batch 1 always. run_all.sh picks the
    # most GPUs that divide each run's batch (a fake GPU count here), and its table of batches
    # is each script's own default, resolved by the script's main() up to data.setup.
    import importlib
    lists = {}
    for gpus in (1, 2, 3, 6, 8):
        listed = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--list"],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "RUN_ALL_GPUS": str(gpus)})
        assert listed.returncode == 0, listed.stderr
        lists[gpus] = [line.split(": ", 1) for line in listed.stdout.strip().splitlines()]
    assert len(lists[8]) == 19

    table = dict(re.findall(r"\[([\w-]+)\]=(\d+)", open(os.path.join(ROOT, "run_all.sh")).read()))

    def stop(args, *a, **k):
        raise Parsed(args.batch_size)
    monkeypatch.setattr("data.setup", stop)
    # --weights @RUN (OverFeat's localisation): that run's checkpoint, not made here, stands as
    # a settings-free classification checkpoint (the batch is the script's own default)
    monkeypatch.setattr("data.load_checkpoint", lambda path, arch=None: {})
    monkeypatch.setattr("overfeat.localisation_start", lambda *a: "classification")
    for gpus, runs in lists.items():
        for name, line in runs:
            launcher, *rest = shlex.split(line)
            n = int(launcher == "torchrun" and rest[1].split("=")[1]) or 1
            script, argv = (rest[2], rest[3:]) if launcher == "torchrun" else (rest[0], rest[1:])
            if "--init-from" in argv:  # another run's checkpoint, not there: read after setup
                at = argv.index("--init-from")
                argv = argv[:at] + argv[at + 2:]
            argv = argv[:argv.index("--out")]
            with pytest.raises(Parsed) as got:
                importlib.import_module(script[:-3]).main(argv)
            batch = got.value.args[0]
            assert int(table[name]) == batch, f"run_all.sh's batch of {name}"
            best = max(k for k in range(1, gpus + 1) if batch % k == 0)
            assert (launcher == "python") == (best == 1) and n == best, (gpus, name, batch)
    assert all(line.startswith("python fcn.py") for name, line in lists[8] if "fcn" in name)
    # -- --batch-size N replaces every run's batch
    listed = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--list", "--only", "ssd",
                             "--", "--batch-size", "12"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "RUN_ALL_GPUS": "8"})
    assert listed.stdout.startswith("ssd: torchrun --standalone --nproc_per_node=6 ssd.py")
