"""What every script shares at run time: flags checked before a run, a diverging run stopped."""
import csv
import importlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import metrics


# ---------------------------------------------------------------------------- flags

def test_non_finite_numbers_are_one_line_flag_errors(capsys):
    p = data.ArgumentParser(prog="x.py")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=float, nargs="*", default=[])
    assert p.parse_args(["--lr", "1e-3", "--steps", "1", "2.5"]).steps == [1.0, 2.5]
    for argv, flag in ((["--lr", "nan"], "--lr nan"), (["--lr", "inf"], "--lr inf"),
                       (["--lr=-inf"], "--lr -inf"), (["--steps", "3", "nan"], "--steps nan")):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"x.py: error: {flag}: must be a finite number")
        assert err.count("\n") == 1


@pytest.mark.parametrize("script", ["lenet5", "resnet", "yolo", "fcn"])
def test_loader_and_logging_flags_out_of_range_are_one_line_errors(script, capsys):
    module = importlib.import_module(script)
    for flag, value, least in (("--workers", "-1", 0), ("--log-every", "0", 1),
                               ("--limit", "0", 1)):
        if flag == "--limit" and script in ("yolo", "fcn"):
            continue  # no --limit: detection and segmentation sets are not held in memory
        with pytest.raises(SystemExit) as e:
            module.main([flag, value])
        assert e.value.code == 2
        assert f"error: {flag} {value}: must be {least} or more" in capsys.readouterr().err


# ---------------------------------------------------------------------------- divergence

def test_progress_stops_at_the_first_non_finite_loss_naming_epoch_and_step():
    # The losses stay tensors until a progress line or the epoch's end reads them all at once:
    # a NaN at step 3 is found at the epoch's last step (5), still named as step 3, and before
    # the epoch could end (so before its checkpoint).
    progress = metrics.Progress(5, 2, every=100, enabled=False)
    for _ in range(5):
        progress.step(8, torch.tensor(1.0), 0.1, 0)
    assert progress.epoch_loss() == 1.0
    progress.step(8, torch.tensor(0.9), 0.1, 1)
    progress.step(8, torch.tensor(0.8), 0.1, 1)
    progress.step(8, torch.tensor(math.nan), 0.1, 1)  # not read yet: no host sync per step
    progress.step(8, torch.tensor(0.7), 0.1, 1)
    with pytest.raises(metrics.Diverged, match=r"loss became nan at epoch 2 step 3; .*lower --lr "
                                               r"\(now 0.1\)"):
        progress.step(8, torch.tensor(math.inf), 0.1, 1)
    # a line every 2 steps reads them sooner; an epoch cut short is read by epoch_loss()
    progress = metrics.Progress(5, 1, every=2, enabled=False)
    progress.step(8, torch.tensor(1.0), 0.1, 0)
    with pytest.raises(metrics.Diverged, match="loss became inf at epoch 1 step 2"):
        progress.step(8, torch.tensor(math.inf), 0.1, 0)
    progress = metrics.Progress(5, 1, enabled=False)
    progress.step(8, torch.tensor(-math.inf), 0.1, 0)
    with pytest.raises(metrics.Diverged, match="loss became -inf at epoch 1 step 1"):
        progress.epoch_loss()


def test_progress_reads_the_losses_once_per_line_and_weights_the_epoch_mean(monkeypatch):
    # Every read of a device tensor is a host sync: Progress reads its window of losses with one
    # .tolist() per line (counted here), never one .item() per step.
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a host sync per step"))
    progress = metrics.Progress(10, 1, every=4, enabled=False)
    for i in range(10):
        progress.step(2 * (i + 1), torch.tensor(float(i)), 0.1, 0)
    assert reads == [4, 4, 2]  # steps 4, 8 and the epoch's last: 3 reads for 10 steps
    # the epoch's mean weights each step by its samples (n, default: its images)
    assert progress.epoch_loss() == pytest.approx(sum(i * 2 * (i + 1) for i in range(10)) /
                                                  sum(2 * (i + 1) for i in range(10)))


def test_progress_checks_the_weights_at_the_end_of_each_epoch():
    model = torch.nn.Linear(3, 2)
    progress = metrics.Progress(3, 2, enabled=False, model=model)
    progress.step(8, 1.0, 0.1, 0)
    with torch.no_grad():
        model.weight[0, 0] = math.inf  # the last update of the epoch blew up; its loss was finite
    progress.step(8, 1.0, 0.1, 0)      # mid-epoch: not looked at (the next loss would show it)
    with pytest.raises(metrics.Diverged, match="weights became non-finite in epoch 1"):
        progress.step(8, 1.0, 0.1, 0)  # the epoch's last step: checked before its checkpoint
    # the run's last step is checked too when the run ends inside an epoch (resnet's iterations)
    progress = metrics.Progress(10, 1, enabled=False, model=model)
    progress.remaining = 2
    progress.step(8, 1.0, 0.1, 0)
    with pytest.raises(metrics.Diverged, match="weights became non-finite"):
        progress.step(8, 1.0, 0.1, 0)


# Each script, one tiny run at an absurd learning rate into the folder of an earlier run
# (--overwrite): the run must end in Diverged (each script's __main__ turns it into its one-line
# error, exit 1), with no results.json written and the earlier checkpoint left byte for byte.
DIVERGING = [
    ("lenet5", ["--data", "shapes"]),
    ("alexnet", ["--data", "shapes"]),
    ("vgg19", ["--data", "shapes"]),
    ("resnet", ["--data", "shapes", "--depth", "8"]),
    ("resnext", ["--data", "shapes"]),
    ("googlenet", ["--data", "shapes"]),
    ("googlenet", ["--data", "shapes", "--variant", "nin"]),
    ("overfeat", ["--data", "shapes"]),
    ("monster_finetune", ["--data", "shapes"]),
    ("yolo", ["--data", "shapes-det", "--pretrain-epochs", "0"]),
    ("ssd", ["--data", "shapes-det"]),
    ("fcn", ["--data", "shapes-seg"]),
]


@pytest.mark.parametrize("script,argv", DIVERGING, ids=[f"{s}{'-' + a[-1] if 'nin' in a else ''}"
                                                        for s, a in DIVERGING])
def test_a_diverging_run_stops_and_writes_nothing(tmp_path, script, argv):
    module = importlib.import_module(script)
    (tmp_path / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
    limit = [] if script in ("yolo", "ssd", "fcn") else ["--limit", "48"]
    with pytest.raises(metrics.Diverged, match="became (nan|inf|-inf|non-finite)"):
        module.main([*argv, "--quick", "--epochs", "1", "--batch-size", "16", "--lr", "1e30",
                     "--device", "cpu", "--out", str(tmp_path), "--log-every", "100000",
                     "--overwrite", *limit])
    assert not (tmp_path / "results.json").exists()
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"an earlier run's checkpoint"


# ---------------------------------------------------------------------------- outputs

SCRIPTS = ["lenet5", "alexnet", "vgg19", "resnet", "resnext", "googlenet", "overfeat",
           "monster_finetune", "yolo", "ssd", "fcn"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unusable_out_is_an_error_before_any_data_is_read(tmp_path, script):
    # Each script's default (real) data set, absent, with --no-download: were the data read
    # before --out is checked, the error would be about the data.
    module = importlib.import_module(script)
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    for out in (in_the_way, in_the_way / "run"):
        with pytest.raises(data.DataError, match=f"--out {out}: {in_the_way} is a file, in the "
                                                 f"way of the run's folder"):
            module.main(["--data-dir", str(tmp_path / "no-data"), "--no-download", "--device",
                         "cpu", "--out", str(out)])
    assert in_the_way.read_text() == "not a folder"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, script):
    module = importlib.import_module(script)
    for held in ("results.json", "checkpoint.pt"):
        out = tmp_path / held
        out.mkdir()
        (out / held).write_text("an earlier run")
        with pytest.raises(data.DataError, match=f"--out {out} already holds a run \\({held}\\); "
                                                 f"pass --resume .* --overwrite to replace it"):
            module.main(["--data-dir", str(tmp_path / "no-data"), "--no-download", "--device",
                         "cpu", "--out", str(out)])
        assert (out / held).read_text() == "an earlier run"
        # --overwrite gets past the folder check (to the missing data here)
        with pytest.raises(data.DataError) as e:
            module.main(["--data-dir", str(tmp_path / "no-data"), "--no-download", "--device",
                         "cpu", "--out", str(out), "--overwrite"])
        assert "already holds a run" not in str(e.value)


def test_prepare_out_creates_the_folder_and_names_an_unwritable_one(tmp_path, monkeypatch):
    data.prepare_out(str(tmp_path / "a" / "b"))  # checked, and nothing left behind
    assert os.listdir(tmp_path) == []

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("builtins.open", refuse)  # as a read-only folder does for a non-root user
    with pytest.raises(data.DataError, match=r"--out .*: cannot write in .* \(Permission denied\)"):
        data.prepare_out(str(tmp_path / "a" / "b"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_eval_only_without_weights_is_an_error_not_an_untrained_score(tmp_path, script):
    module = importlib.import_module(script)
    base = script in ("monster_finetune", "ssd", "fcn")  # their --pretrained is a base network
    with pytest.raises(data.DataError, match="--eval-only needs --weights CKPT" +
                       ("" if base else " or --pretrained") + ": without it"):
        module.main(["--eval-only", "--device", "cpu", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


# A flag that builds each script's network: the value a checkpoint was trained with, another
TRAINED_WITH = {"lenet5": ("variant", "1998", "lecture"), "alexnet": ("width", 0.5, "0.25"),
                "vgg19": ("width", 0.5, "0.25"), "resnet": ("depth", 32, "20"),
                "resnext": ("cardinality", 4, "8"), "googlenet": ("width", 0.5, "0.25"),
                "overfeat": ("variant", "accurate", "fast"), "monster_finetune": ("blocks", 4, "8"),
                "yolo": ("grid", 4, "7"), "ssd": ("img_size", 512, "300"),
                "fcn": ("arch", "16s", "32s")}
TASK_SET = {"yolo": "shapes-det", "ssd": "shapes-det", "fcn": "shapes-seg"}


class Reached(Exception):
    """Raised by a stand-in for data.setup: the flags as the run would have used them."""


@pytest.mark.parametrize("script", SCRIPTS)
def test_eval_only_and_resume_take_the_settings_of_the_checkpoint(tmp_path, script,
                                                                   monkeypatch):
    module = importlib.import_module(script)
    key, trained, other = TRAINED_WITH[script]
    flag = "--" + key.replace("_", "-")
    run = tmp_path / "run"
    run.mkdir()
    ckpt = str(run / "checkpoint.pt")
    torch.save({"model": {}, "args": {
        "script": f"{script}.py", key: trained, "data": TASK_SET.get(script, "shapes"),
        "seed": 7, "epochs": 3, "device": "cuda:3", "workers": 9}}, ckpt)

    def reached(args, *a, **k):
        raise Reached(dict(vars(args)))
    monkeypatch.setattr(data, "setup", reached)
    base = ["--device", "cpu", "--out", str(tmp_path / "e")]
    with pytest.raises(Reached) as e:  # --weights: the network's flags and the data set
        module.main(["--eval-only", "--weights", ckpt, *base])
    seen = e.value.args[0]
    assert (seen[key], seen["data"], seen["seed"]) == (trained, TASK_SET.get(script, "shapes"), 0)
    with pytest.raises(data.DataError, match=re.escape(
            f"{flag} {other} contradicts {ckpt}, trained with {flag} {trained}; drop {flag}")):
        module.main(["--eval-only", "--weights", ckpt, flag, other, *base])
    with pytest.raises(Reached) as e:  # --resume: every setting but how the run runs
        module.main(["--resume", "--out", str(run), "--workers", "0"])
    seen = e.value.args[0]
    assert (seen[key], seen["seed"], seen["workers"], seen["device"]) == (trained, 7, 0, None)
    with pytest.raises(Reached) as e:  # it may be lengthened
        module.main(["--resume", "--out", str(run), "--epochs", "5"])
    assert e.value.args[0]["epochs"] == 5
    with pytest.raises(data.DataError, match=re.escape(
            f"--seed 1 contradicts {ckpt}, trained with --seed 7")):
        module.main(["--resume", "--out", str(run), "--seed", "1"])
    other_script = "resnet" if script != "resnet" else "lenet5"
    torch.save({"model": {}, "args": {"script": f"{other_script}.py"}}, ckpt)
    with pytest.raises(data.DataError, match=re.escape(
            f"{ckpt} was written by {other_script}.py, not {script}.py")):
        module.main(["--eval-only", "--weights", ckpt, *base])


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_flag_error_leaves_no_output_folder(tmp_path, script):
    module = importlib.import_module(script)
    wrong = "shapes" if script in ("yolo", "ssd", "fcn") else "shapes-seg"  # another task's set
    with pytest.raises(data.DataError, match=f"'{wrong}' is a"):
        module.main(["--data", wrong, "--device", "cpu", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_a_real_command_line_exits_1_with_one_line_on_stderr():
    # The other tests run each script's __main__ in process (conftest.command): this one pays
    # for a new python once to show that the interpreter does what command() assumes.
    r = subprocess.run([sys.executable, "lenet5.py", "--device", "cpu", "--data", "voc"],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "lenet5.py: error: 'voc' is a detection data set; this script needs " \
                       "classification data: one of mnist, fashion-mnist, cifar10, cifar100, " \
                       "cifar10-jpg, imagenet, shapes\n"


RUNTIME_FLAGS = [*data.RUNTIME_FLAGS, "--epochs", "--batch-size", "--lr", "--stop-after"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_the_runtime_flags_the_readme_lists(script):
    parser = importlib.import_module(script).get_args_parser()
    have = {option for action in parser._actions for option in action.option_strings}
    assert [f for f in RUNTIME_FLAGS if f not in have] == []
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "README.md")).read()
    listed = readme.split("Every script takes the same flags: `")[1].split("`")[0].split()
    assert sorted(listed) == sorted(RUNTIME_FLAGS)


def test_kernels_follow_deterministic_and_one_run_does_not_leak_into_the_next():
    cuda = torch.device("cuda")  # the flags can be set without a GPU
    try:
        data.set_kernels(cuda, False)
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert not torch.are_deterministic_algorithms_enabled()
        data.set_kernels(cuda, True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32
                    or torch.backends.cudnn.allow_tf32)
        data.set_kernels(torch.device("cpu"), False)
        assert not (torch.are_deterministic_algorithms_enabled() or
                    torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32)
    finally:
        data.set_kernels(torch.device("cpu"), False)


def test_eval_shards_are_strided_without_padding_and_gather_restores_the_order(monkeypatch):
    # Rank r of W evaluates samples r, r + W, ...; gather_shards interleaves them back. Both
    # ranks are simulated in one process: distributed_info and all_gather_object are replaced.
    images, labels = torch.zeros(7, 1, 2, 2, dtype=torch.uint8), torch.arange(7)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(data, "distributed_info", lambda rank=rank: (rank, 2))
        loader = data.DeviceLoader(images, labels, 3, False)
        dl = data.make_loader(torch.utils.data.TensorDataset(labels), 3, False, workers=0)
        shards.append(torch.cat([y for _, y in loader]))
        assert torch.equal(torch.cat([y for (y,) in dl]), shards[-1])
    assert [s.tolist() for s in shards] == [[0, 2, 4, 6], [1, 3, 5]]

    def all_gather_object(out, obj):
        out[:] = [[shards[0], [f"d{i}" for i in shards[0].tolist()]],
                  [shards[1], [f"d{i}" for i in shards[1].tolist()]]]
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    y, dets = data.gather_shards(shards[1], [f"d{i}" for i in shards[1].tolist()])
    assert y.tolist() == list(range(7)) and dets == [f"d{i}" for i in range(7)]


# ---------------------------------------------------------------------------- predictions

def test_classify_images_of_a_folder_prints_draws_and_records_the_top_classes(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (250, 250, 250)).save(folder / "bright.png")
    Image.new("RGB", (20, 20), (5, 5, 5)).save(folder / "sub" / "dark.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image, not looked at")
    seen = []

    def forward(x):  # grey 28x28 like MNIST, normalised: brighter images score class 1
        seen.append(tuple(x.shape))
        m = x.mean()
        return torch.stack([-m, m, torch.zeros(())])[None]
    classes = ("zero", "one", "two")
    rows = data.classify_images(str(folder), str(tmp_path / "out"), forward, classes, (0.5,),
                                (0.25,), (1, 28), k=2)
    said = capsys.readouterr().out
    assert seen == [(1, 1, 28, 28)] * 2
    assert [os.path.relpath(r["image"], folder) for r in rows] == \
        ["bright.png", "broken.jpg", os.path.join("sub", "dark.jpg")]
    bright, broken, dark = rows
    assert [f["class"] for f in bright["found"]] == ["one", "two"]
    assert [f["class"] for f in dark["found"]] == ["zero", "two"]
    assert sum(f["probability"] for f in bright["found"]) < 1
    assert "is not an image" in broken["error"] and f"skipped {folder / 'broken.jpg'}" in said
    assert f"{folder / 'bright.png'}:\n  #1 " in said
    picture = Image.open(bright["picture"])
    assert bright["picture"] == str(tmp_path / "out" / "bright_classes.png")
    assert dark["picture"] == str(tmp_path / "out" / "sub_dark_classes.png")
    assert min(picture.size) >= 512
    saved = json.load(open(tmp_path / "out" / "predictions.json"))
    assert saved[0]["found"][0]["class"] == "one" and saved[1]["error"] == broken["error"]
    lines = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [(os.path.basename(l["image"]), l["rank"], l["class"]) for l in lines[:4]] == \
        [("bright.png", "1", "one"), ("bright.png", "2", "two"), ("dark.jpg", "1", "zero"),
         ("dark.jpg", "2", "two")]
    assert lines[4]["error"] == broken["error"]
    # the user's own files are named as theirs, never as a data set to fetch again
    for path, message in ((folder / "broken.jpg", "broken.jpg is not an image"),
                          (tmp_path / "nope.jpg", "nope.jpg does not exist; give an image file "
                                                  "or a folder of them")):
        with pytest.raises(data.DataError, match=re.escape(message)) as e:
            data.classify_images(str(path), str(tmp_path / "o2"), forward, classes, (0.5,),
                                 (0.25,), (1, 28))
        assert "fetch" not in str(e.value)


@pytest.mark.parametrize("script,flags", [("alexnet", []), ("resnet", ["--depth", "18"]),
                                          ("googlenet", [])])
def test_classify_with_torchvisions_pretrained_weights(tmp_path, monkeypatch, script, flags):
    # torchvision's weights cannot be downloaded here: the same torchvision models' random
    # state_dicts stand in for them (the real ones load through the same path). The classes
    # are ImageNet's 1,000 names, the view ImageNet's (short side 256, centre 224).
    import torchvision
    from conftest import shapes_pictures

    def weights(w):
        name = next(n for n in torchvision.models.list_models()
                    if torchvision.models.get_model_weights(n) is type(w))
        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None, **(
            {"aux_logits": True, "init_weights": True} if name == "googlenet" else {})).state_dict()
    monkeypatch.setattr(data, "torchvision_weights", weights)
    module = importlib.import_module(script)
    rows = module.main(["--classify", shapes_pictures(tmp_path / "mine"), "--pretrained",
                        "--device", "cpu", "--out", str(tmp_path / "out"), *flags])
    names = set(data.imagenet_class_names())
    assert len(rows) == 2 and all(f["class"] in names for r in rows for f in r["found"])
    assert all(os.path.exists(r["picture"]) for r in rows)
    assert (tmp_path / "out" / "predictions.csv").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="empty holds no image files"):
        data.user_images(str(tmp_path / "empty"))


def test_detection_and_segmentation_pictures_are_large_coloured_and_labelled_inside(tmp_path):
    from PIL import Image
    image = torch.full((3, 48, 64), 200, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0], [40.0, 30.0, 64.0, 48.0]])
    picture = metrics.draw_detections(image, boxes, [0, 0, 2], [0.9, 0.8, 0.7],
                                      ("circle", "square", "star"), str(tmp_path / "d.png"))
    assert Image.open(tmp_path / "d.png").size == picture.size
    W = picture.size[0]
    assert W >= 512 and picture.size[1] > 512  # 48 px -> 512, and the legend below
    pixels = torch.from_numpy(np.array(picture))
    found = {tuple(c) for c in pixels.reshape(-1, 3).unique(dim=0).tolist()}
    assert metrics.class_colour(0) in found and metrics.class_colour(2) in found
    assert metrics.class_colour(1) not in found  # only the classes drawn, each its own colour
    assert metrics.class_colour(0) != metrics.class_colour(2)
    mask = torch.zeros(48, 64, dtype=torch.long)
    mask[10:20, 10:30] = 2
    seg = metrics.draw_segmentation(image, mask, ("background", "circle", "square"),
                                    str(tmp_path / "s.png"))
    assert min(seg.size) >= 512
    rgb = torch.from_numpy(np.array(seg))
    y, x = int(15 * 512 / 48), int(20 * 512 / 48)  # inside the square, upscaled
    expected = (torch.tensor(metrics.class_colour(1)) * 0.5 + 200 * 0.5)
    assert (rgb[y, x].float() - expected).abs().max() <= 2


# ---------------------------------------------------------------------------- exact resume

RESUME = ["--data", "shapes", "--quick", "--device", "cpu", "--epochs", "2", "--batch-size",
          "16", "--limit", "96", "--log-every", "100000"]


@pytest.mark.ddp("resume-full", "alexnet", RESUME)
@pytest.mark.ddp("resume-cut", "alexnet", [*RESUME, "--stop-after", "1"])
@pytest.mark.ddp("resume-resumed", "alexnet", [*RESUME, "--resume"], out="resume-cut")
def test_two_processes_killed_after_an_epoch_resume_to_the_uninterrupted_run(ddp_runs):
    # AlexNet's dropout draws from each rank's own generator (seed + rank): the checkpoint holds
    # both ranks' states and each takes its own back, so the resumed run ends where the
    # uninterrupted one does, bit for bit.
    from conftest import ddp_results_json
    full = ddp_results_json(ddp_runs, "resume-full")
    resumed = ddp_results_json(ddp_runs, "resume-resumed")
    assert resumed["history"] == full["history"] and resumed["metrics"] == full["metrics"]
    a = torch.load(ddp_runs["resume-full"] / "checkpoint.pt", weights_only=True)
    b = torch.load(ddp_runs["resume-cut"] / "checkpoint.pt", weights_only=True)
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["cpu"], b["rng"][1]["cpu"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---------------------------------------------------------------------------- the GPU box
# What a CPU can show of the CUDA and torchrun paths (bench/gpu_check.py runs the rest on a GPU).

def test_flag_combinations_that_cannot_work_on_a_gpu_box_are_one_line_errors(tmp_path,
                                                                              monkeypatch):
    with pytest.raises(data.DataError, match="--cuda asks for a GPU and --device cpu"):
        data.select_device("cpu", cuda=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(data.DataError, match="--device cuda:1 under torchrun would put every "
                                             "process on one GPU; use --cuda"):
        data.select_device("cuda:1")
    monkeypatch.delenv("WORLD_SIZE")
    # before any data is read: the data set named here does not exist
    for argv in (["--cuda", "--device", "cpu"], ["--gpu-decode", "--device", "cpu"]):
        with pytest.raises(data.DataError, match="--cuda asks|--gpu-decode decodes on a CUDA"):
            importlib.import_module("resnet").main(
                ["--data", "imagenet", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"),
                 *argv])
    assert not (tmp_path / "r").exists()


def test_amp_takes_fp16_with_loss_scaling_where_bf16_is_only_emulated(monkeypatch):
    # A V100 or T4: torch.cuda.is_bf16_supported() says True (emulation counts), the hardware
    # has no bf16 units; amp must choose fp16 (and so the GradScaler), not a slow bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    data.amp_dtype.cache_clear()
    try:
        dtype, why = data.amp_dtype(torch.device("cuda:0"))
        assert dtype == torch.float16 and "no bf16 units" in why
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        data.amp_dtype.cache_clear()
        assert data.amp_dtype(torch.device("cuda:0"))[0] == torch.bfloat16
        assert data.amp_dtype(torch.device("cpu"))[0] == torch.bfloat16
        assert not data.grad_scaler(torch.device("cpu"), True).is_enabled()
    finally:
        data.amp_dtype.cache_clear()


def test_resuming_a_run_without_a_scaler_into_an_active_one(tmp_path):
    # A bf16 (or CPU) run's checkpoint holds an empty scaler state; resumed on an fp16 GPU the
    # scaler is active and must start afresh instead of refusing the empty state.
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    path = str(tmp_path / "checkpoint.pt")
    off = torch.amp.GradScaler("cpu", enabled=False)
    data.save_training_state(path, "lin", model, opt, sched, off, 0, {"seed": 0}, [])
    on = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 10)
    assert data.resume_training_state(path, "lin", model, opt, sched, on)[0] == 1
    assert on.get_scale() == 2.0 ** 10
    # and an fp16 run's scale is taken back
    on.load_state_dict({**on.state_dict(), "scale": 8.0})
    data.save_training_state(path, "lin", model, opt, sched, on, 1, {"seed": 0}, [])
    again = torch.amp.GradScaler("cpu", enabled=True)
    data.resume_training_state(path, "lin", model, opt, sched, again)
    assert again.get_scale() == 8.0


def test_per_sample_seeding_leaves_the_cuda_generators_alone(monkeypatch):
    # torch.manual_seed would re-seed every CUDA generator (dropout's) at every sample built in
    # the main process; only the CPU generator is the sample's.
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    ds = data.Seeded(torch.utils.data.TensorDataset(torch.arange(4)), seed=3)
    x = [ds[(i, 0)] for i in range(4)]
    assert seeded == [] and [int(v[0]) for v in x] == [0, 1, 2, 3]


def test_device_loader_augments_each_torchrun_rank_with_its_own_draws(monkeypatch):
    # Eight copies of one image: whatever indices a rank takes, its batch differs from another
    # rank's only by the augmentation's draws; those must be the rank's own (rank 0's the same
    # as a single process's).
    image = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8).repeat(8, 1, 1, 1)
    labels = torch.zeros(8, dtype=torch.long)
    batches = {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        monkeypatch.setattr(data, "distributed_info", lambda r=rank, w=world: (r, w))
        loader = data.DeviceLoader(image, labels, 4, True, augment={"padding": 2, "flip": True})
        batches[rank, world] = next(iter(loader))[0]
    assert torch.equal(batches[0, 1], batches[0, 2])
    assert not torch.equal(batches[0, 2], batches[1, 2])


def test_a_set_too_large_for_the_device_is_one_line_naming_its_bytes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2 ** 30, 80 * 2 ** 30))
    data.check_fits(2 ** 30, torch.device("cuda:0"), "cifar10's training images", "fix")
    with pytest.raises(data.DataError, match=r"cifar10's training images needs 3.0 GiB on cuda:0, "
                                             r"which has 2.0 GiB free; use a smaller"):
        data.check_fits(3 * 2 ** 30, torch.device("cuda:0"), "cifar10's training images",
                        "use a smaller --img-size")
    data.check_fits(10 ** 12, torch.device("cpu"), "anything", "fix")  # the host: not checked


DOWNLOAD_DRIVER = """
import os, sys, time
import torchvision
sys.path.insert(0, {root!r})
import data
sys.path.insert(0, {tests!r})
from conftest import write_mnist

def download(self):  # a slow fake of torchvision's download, in MNIST's real format
    with open(os.path.join({log!r}), "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    time.sleep(2)
    write_mnist({root_data!r}, n_train=12, n_test=4)

torchvision.datasets.MNIST.download = download
torch = data.torch
torch.distributed.init_process_group("gloo")
ds = data._torchvision_classification("mnist", True, {root_data!r}, True)
with open(os.path.join({log!r} + ".rank" + os.environ["RANK"]), "w") as f:  # not the shared pipe
    f.write(str(len(ds.targets)))
torch.distributed.destroy_process_group()
"""


def test_the_first_torchrun_downloads_a_data_set_once(tmp_path):
    # Two gloo processes on a fresh box: local rank 0 downloads, the other waits at a barrier
    # and reads what it wrote (every rank downloading into the same files corrupts them).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log, driver = tmp_path / "downloads.txt", tmp_path / "driver.py"
    driver.write_text(DOWNLOAD_DRIVER.format(root=root, tests=os.path.join(root, "tests"),
                                             log=str(log), root_data=str(tmp_path / "data")))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--standalone", str(driver)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                         "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr[-2000:]
    assert log.read_text().split() == ["0"]
    # each rank read the whole set the first one wrote
    assert [open(f"{log}.rank{k}").read() for k in (0, 1)] == ["12", "12"]
