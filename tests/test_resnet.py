"""resnet.py: parameter counts (Table 6, torchvision), option-A shortcuts, the iteration schedule
of §4.2, torchvision compatibility, and main() end to end."""
import json
import os
import re

import pytest
import torch
import torchvision

import data
import resnet
from conftest import (assert_classified, assert_shapes_class_records, command, ddp_results_json,
                     image_tree, only_the_test_split, shapes_pictures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cifar_parameters_by_hand(depth, classes=10):
    """§4.2: a 3x3 stem with 16 maps, 3 stages of n basic blocks (16, 32, 64 filters), fc.
    Convolutions have no bias (BN follows); each BN has 2 parameters per channel; option-A
    shortcuts have none."""
    n = (depth - 2) // 6
    total = 9 * 3 * 16 + 2 * 16
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += 9 * c_in * c + 9 * c * c + 4 * c
            c_in = c
    return total + 64 * classes + classes


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_parameter_counts_match_table_6(depth):
    m = resnet.resnet(depth, 10)
    n = resnet.count_parameters(m)
    assert n == cifar_parameters_by_hand(depth)
    # Table 6 gives 0.27M, 0.46M, 0.66M, 0.85M, 1.7M
    assert round(n / 1e6, 2 if depth < 100 else 1) == resnet.CIFAR_PARAMS[depth] / 1e6
    # 6n + 2 weighted layers: convolutions plus the fc
    layers = sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())
    assert layers == depth


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_imagenet_networks_have_torchvisions_parameters_and_names(depth):
    ours = resnet.resnet(depth)
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    assert resnet.count_parameters(ours) == sum(p.numel() for p in ref.parameters())
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_state_dict_gives_identical_outputs(depth):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, so that eval mode uses them
        for mod in ref.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    ref.eval()
    ours = resnet.resnet(depth).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5, rtol=0)


def test_output_and_stage_shapes():
    m = resnet.resnet(20, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert m(x).shape == (2, 10)
        h = m.relu(m.bn1(m.conv1(x)))
        sizes = []
        for stage in (m.layer1, m.layer2, m.layer3):
            h = stage(h)
            sizes.append(tuple(h.shape[1:]))
    assert sizes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]  # §4.2: maps 32, 16, 8
    assert resnet.resnet(8, 6, in_channels=1)(torch.randn(1, 1, 28, 28)).shape == (1, 6)
    with torch.no_grad():
        assert resnet.resnet(50, 7).eval()(torch.randn(1, 3, 224, 224)).shape == (1, 7)
    with pytest.raises(ValueError, match="unknown ResNet depth 17"):
        resnet.resnet(17)
    assert resnet.is_cifar_depth(8) and resnet.is_cifar_depth(1202)
    assert not resnet.is_cifar_depth(50) and not resnet.is_cifar_depth(21)


def test_option_a_shortcut_subsamples_and_pads_with_zeros():
    sc = resnet.ShortcutA(16, 32, 2)
    assert sum(p.numel() for p in sc.parameters()) == 0
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    y = sc(x)
    assert y.shape == (2, 32, 2, 2)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])  # every other pixel of each input map
    assert torch.equal(y[:, 16:], torch.zeros(2, 16, 2, 2))  # the extra channels are zero
    # no ResNet-20 block has a projection: the only downsampling shortcuts are option A
    m = resnet.resnet(20)
    shortcuts = [b.downsample for b in m.modules() if isinstance(b, resnet.BasicBlock)
                 and b.downsample is not None]
    assert len(shortcuts) == 2 and all(isinstance(s, resnet.ShortcutA) for s in shortcuts)


def test_iteration_schedule_of_section_4_2():
    # 45k images at batch 128: 352 steps per epoch (the last batch is dropped: 351)
    total, milestones = resnet.schedule("cifar", 351)
    assert (total, milestones) == (64000, [32000, 48000])
    f = [resnet.lr_factor(i, milestones) for i in (0, 31999, 32000, 47999, 48000, 63999)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # ResNet-110: lr 0.01 for the first 400 iterations, then back to 0.1 (§4.2)
    assert [resnet.lr_factor(i, milestones, 400) for i in (0, 399, 400)] == \
        pytest.approx([0.1, 0.1, 1])
    # a shorter run keeps the milestones at 1/2 and 3/4
    assert resnet.schedule("cifar", 10, epochs=8) == (80, [40, 60])
    assert resnet.schedule("imagenet", 100) == (9000, [3000, 6000])  # 90 epochs, / 10 at 30, 60
    args = resnet.get_args_parser().parse_args([])
    assert (args.depth, args.lr, args.momentum, args.weight_decay) == (20, 0.1, 0.9, 1e-4)


def run(tmp_path, name, *extra):
    # the tests' own budget (2 epochs, batch 128) unless extra says otherwise (the last flag
    # wins), not --quick's
    out = str(tmp_path / name)
    return resnet.main(["--data", "shapes", "--quick", "--batch-size", "128", "--epochs", "2", "--device", "cpu", "--out", out,
                        "--log-every", "100000", *extra]), out


@pytest.mark.slow
def test_quick_run_on_shapes_learns_and_writes_results(tmp_path, monkeypatch):
    # ~20 s: ResNet-8 (n = 1 of the 6n+2 family) on 2,000 32x32 images for 10 epochs. Chance is
    # 5/6 = 0.833 error; this reaches ~0.71 (global-average-pooled networks learn which shape
    # is the largest slowly on so few images).
    results, out = run(tmp_path, "a", "--depth", "8", "--img-size", "32", "--epochs", "10",
                       "--batch-size", "32", "--lr", "0.02")
    assert results["metrics"]["test_error"] < 0.77
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["metrics"] == results["metrics"] and saved["script"] == "resnet.py"
    # 2,250 images (shapes' train + val: the whole training set) at batch 32: 70 steps an epoch
    assert saved["config"]["iterations"] == 10 * 70 and saved["config"]["milestones"] == [350, 525]
    assert saved["history"][-1]["train_loss"] < saved["history"][0]["train_loss"]
    assert "top5_error" not in saved["metrics"]  # 6 classes
    # --eval-only: the same figures from the test split and the checkpoint's normalisation
    only_the_test_split(monkeypatch)
    again, _ = run(tmp_path, "b", "--depth", "8", "--img-size", "32", "--eval-only",
                   "--weights", os.path.join(out, "checkpoint.pt"))
    assert again["metrics"] == results["metrics"]
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 500}
    assert again["config"]["normalisation"] == saved["config"]["normalisation"]
    assert again["config"]["iterations"] is None  # no schedule is followed


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    # 3 epochs of 8 iterations; the lr drops at iterations 12 and 18, inside epochs 2 and 3,
    # so the resumed run must restore the per-iteration scheduler exactly. --eval-every 3:
    # the test split after epoch 3 only, the resumed run's history included.
    b = ["--batch-size", "64", "--limit", "512", "--eval-every", "3"]  # 8 iterations an epoch
    full, out_full = run(tmp_path, "full", "--depth", "8", "--epochs", "3", *b)
    run(tmp_path, "cut", "--depth", "8", "--epochs", "3", "--stop-after", "1", *b)  # "killed"
    resumed, out_cut = run(tmp_path, "cut", "--depth", "8", "--epochs", "3", "--resume", *b)
    assert full["config"]["milestones"] == [12, 18]
    assert resumed["history"] == full["history"]
    assert resumed["metrics"] == full["metrics"]
    assert ["test_error" in row for row in full["history"]] == [False, False, True]
    assert full["history"][-1]["test_error"] == full["metrics"]["test_error"]  # the final test
    a = torch.load(os.path.join(out_full, "checkpoint.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(out_cut, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_shapes_class_records(full)
    # --classify: a folder of the user's images through that network (its depth, classes,
    # normalisation and 16x16 input from the checkpoint), no data set read
    mine = shapes_pictures(tmp_path / "mine")
    rows = resnet.main(["--classify", mine, "--weights", os.path.join(out_full, "checkpoint.pt"),
                        "--device", "cpu", "--out", str(tmp_path / "p")])
    assert_classified(rows, tmp_path / "p")


def test_trains_on_a_folder_of_the_users_own_images(tmp_path):
    r = resnet.main(["--data", image_tree(tmp_path / "tree"), "--depth", "8", "--epochs", "1",
                     "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert r["config"]["sizes"] == {"train": 16, "val": 0, "test": 8}
    assert set(r["per_class_error"]) == {"dark", "light"} and 0 <= r["auc"] <= 1
    assert r["confusion"]["classes"] == ["dark", "light"]


def imagenet_val_only(root):
    """DIR/imagenet/val with one image of each of two classes, and no DIR/imagenet/train."""
    from PIL import Image
    for k, wnid in enumerate(("n01440764", "n01443537")):
        (root / "imagenet" / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (300, 260), (k * 80, 50, 0)).save(
            root / "imagenet" / "val" / wnid / "0.JPEG")
    return str(root)


def test_eval_only_on_imagenet_needs_the_val_folder_alone(tmp_path):
    # --eval-only builds no training set (DIR/imagenet/train is not there) and follows no
    # schedule (ResNet-8 at 32x32 on two val images, ten-crop test: the code path, in a second)
    root = imagenet_val_only(tmp_path)
    torch.save(resnet.resnet(8, 2).state_dict(), tmp_path / "w.pt")
    r = resnet.main(["--data", "imagenet", "--data-dir", root, "--depth", "8", "--img-size",
                     "32", "--eval-only", "--weights", str(tmp_path / "w.pt"), "--workers", "0",
                     "--device", "cpu", "--out", str(tmp_path / "e")])
    assert r["config"]["sizes"] == {"train": 0, "val": 0, "test": 2}
    assert r["config"]["steps_per_epoch"] is None and "ten_crop_error" in r["metrics"]


def test_dry_run_takes_two_steps_checks_the_checkpoint_and_writes_results(tmp_path, capsys):
    # The paper's settings (ResNet-20, §4.2's 64k iterations at lr 0.1: cut to 1 epoch of 2
    # steps) on shapes at the paper's 32x32, batch 2. --limit 1001: rendering the whole shapes
    # set (12,000 images) takes ~30 s of this CPU, longer than the dry run itself; 1,001 test
    # images are 3 batches of 500, of which the dry run evaluates 2 (and 1,001 training images
    # 500 steps, of which it takes 2).
    out = tmp_path / "dry"
    results = resnet.main(["--data", "shapes", "--device", "cpu", "--dry-run", "--batch-size",
                           "2", "--limit", "1001", "--out", str(out), "--log-every", "1"])
    said = capsys.readouterr().out
    assert re.findall(r"^epoch 1/1 step (\d+)/(\d+) ", said, re.M) == [("1", "2"), ("2", "2")]
    assert re.search(r"^test_error .* \(\d+/1000\) ", said, re.M)  # 2 batches of 500
    config = results["config"]
    assert config["dry_run"] is True and config["epochs"] == 1
    assert (config["arch"], config["iterations"], config["steps_per_epoch"]) == ("resnet20", 2, 2)
    assert config["sizes"] == {"train": 1001, "val": 0, "test": 1001} and config["img_size"] == 32
    assert [row["iteration"] for row in results["history"]] == [2]
    ckpt = data.load_checkpoint(str(out / "checkpoint.pt"), "resnet20")
    assert ckpt["epoch"] == 0 and ckpt["scheduler"]["last_epoch"] == 2
    assert json.loads((out / "results.json").read_text())["config"]["dry_run"] is True


def test_bad_input_is_a_clear_error(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"arch": "resnet20", "model": {}}, other)
    for argv, message in ((["--depth", "17"], "unknown ResNet depth 17"),
                          (["--data", "voc"], "'voc' is a detection data set"),
                          (["--data", "shapes", "--ten-crop"], "--ten-crop is the ImageNet test"),
                          (["--data", "cifar10", "--img-size", "64"], "--img-size applies to"),
                          (["--depth", "32", "--data", "shapes", "--quick", "--weights",
                            str(other)], "is of 'resnet20', not 'resnet32'"),
                          (["--depth", "20", "--pretrained", "--data", "shapes", "--quick"],
                           "--pretrained needs an ImageNet depth"),
                          (["--classify", "/nonexistent.jpg"], "--classify needs --weights CKPT "
                           "or --pretrained"),
                          (["--classify", "/nonexistent.jpg", "--depth", "32", "--weights",
                            str(other)], "is of 'resnet20', not 'resnet32'")):
        with pytest.raises(data.DataError, match=message.replace("(", r"\(")):
            resnet.main([*argv, "--device", "cpu", "--out", str(tmp_path / "x")])
    # as a command: one line on stderr, non-zero exit, no traceback
    r = command("resnet.py", ["--data", "shapes", "--quick", "--weights",
                        "/nonexistent.pt", "--device", "cpu"])
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "checkpoint /nonexistent.pt not found" in r.stderr, r.stderr


DDP_ARGS = ["--depth", "8", "--epochs", "1", "--batch-size", "128", "--limit", "512"]


@pytest.mark.ddp("resnet", "resnet", ["--data", "shapes", "--quick", "--device", "cpu",
                                *DDP_ARGS,
                                "--log-every", "100000"])
def test_two_gloo_processes_agree_with_one_process(tmp_path, ddp_runs):
    # BatchNorm statistics are per process under DDP (as on the paper's two GPUs; SyncBatchNorm
    # needs a GPU), so the two runs see the same data and the same averaged gradients but not
    # bit-identical normalisation: their losses agree closely, not exactly.
    single, _ = run(tmp_path, "one", *DDP_ARGS)
    double = ddp_results_json(ddp_runs, "resnet")
    assert double["config"]["steps_per_epoch"] == single["config"]["steps_per_epoch"]
    assert double["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"],
                                                               rel=0.03)


def test_at_init_output_depends_on_input_and_eval_mode_learns():
    from conftest import assert_learns_in_eval_mode, shapes_batch
    x, y = shapes_batch(16, 32)
    torch.manual_seed(0)
    assert_learns_in_eval_mode(resnet.resnet(20, 6, 3), x, y, 40, 0.01, 0.5)
