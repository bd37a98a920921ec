"""monster_finetune.py: the lecture's network, where its first layer comes from, freezing, the
comparison runs, and main() end to end."""
import json
import os
import re

import pytest
import torch
import torchvision

import alexnet
import data
import monster_finetune as mf
from conftest import (assert_classified, assert_shapes_class_records, command, image_tree,
                     only_the_test_split, shapes_pictures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_lectures_network():
    m = mf.Monster()
    assert len(m.resnet_blocks) == 16 and isinstance(m.resnet_blocks, torch.nn.ModuleList)
    kinds = [type(x).__name__ for x in m.resnet_blocks[0]]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
    # 32x32 -> AlexNet's 11x11/4, padding 2 -> (32 + 4 - 11) // 4 + 1 = 7: the lecture's 7x7
    assert m.feature_map_size == 7 and m.final_average.kernel_size == 7
    x = torch.randn(2, 3, 32, 32)
    assert m.features(x).shape == (2, 64, 7, 7) and m(x).shape == (2, 10)
    # parameters by hand: conv1 64*3*121+64, converter 64*64*9+64, 16 blocks of two
    # (64*64*9+64) convolutions and two BN (2*64), fc 64*10+10
    by_hand = 64 * 363 + 64 + 64 * 576 + 64 + 16 * (2 * (64 * 576 + 64) + 2 * 128) + 650
    assert mf.count_parameters(m) == by_hand
    # the identity is added around every block: zeroing a block's last BN makes it the identity
    m.eval()
    with torch.no_grad():
        h = m.converter(m.features(x))
        for bn in (b[4] for b in m.resnet_blocks):
            bn.weight.zero_()
            bn.bias.zero_()
        assert torch.allclose(m(x), m.fc(h.mean(dim=(2, 3))), atol=1e-5)


def save_alexnets(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None)
    tv_path = tmp_path / "tv_alexnet.pth"
    torch.save(tv.state_dict(), tv_path)  # as torchvision's downloaded weights are stored
    paper = alexnet.alexnet(10, variant="paper")
    paper_path = tmp_path / "paper.pt"
    torch.save({"arch": "alexnet-paper", "model": paper.state_dict()}, paper_path)
    return tv, str(tv_path), paper, str(paper_path)


def test_first_layer_from_torchvision_and_alexnet_py_checkpoints(tmp_path):
    tv, tv_path, paper, paper_path = save_alexnets(tmp_path)
    args = mf.get_args_parser().parse_args(["--alexnet-weights", tv_path])
    w, b = mf.alexnet_first_layer(args)
    assert torch.equal(w, tv.features[0].weight) and torch.equal(b, tv.features[0].bias)
    args = mf.get_args_parser().parse_args(["--alexnet-weights", paper_path])
    w, _ = mf.alexnet_first_layer(args)
    assert torch.equal(w, paper.features.conv1.weight) and w.shape[0] == 96


def run(tmp_path, name, *extra):
    # 2 epochs unless extra says otherwise (the last --epochs wins): the tests' own budget,
    # not --quick's
    out = str(tmp_path / name)
    return mf.main(["--data", "shapes", "--quick", "--epochs", "2", "--device", "cpu", "--out", out,
                    "--log-every", "100000", *extra]), out


def test_frozen_layer_is_bit_identical_while_frozen_and_trained_after(tmp_path, monkeypatch):
    tv, tv_path, _, _ = save_alexnets(tmp_path)
    source = tv.features[0].weight.detach().clone()
    # weight decay and momentum on: still nothing may move the frozen layer; --eval-every 2:
    # the test split after epochs 2 and 4, in the resumed run too
    common = ["--alexnet-weights", tv_path, "--epochs", "4", "--frozen-epochs", "2",
              "--weight-decay", "0.01", "--momentum", "0.9", "--limit", "512", "--eval-every", "2"]
    run(tmp_path, "a", *common, "--stop-after", "2")  # the end of the frozen epochs
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert torch.equal(ck["model"]["features.0.weight"], source)
    assert torch.equal(ck["model"]["features.0.bias"], tv.features[0].bias)
    assert [h["frozen"] for h in ck["history"]] == [True, True]
    torch.manual_seed(0)  # the run's initial weights (same seed, same construction order)
    fresh = mf.Monster(4, 16, 6)
    assert not torch.equal(ck["model"]["converter.0.weight"], fresh.converter[0].weight)
    resumed, _ = run(tmp_path, "a", *common, "--resume")  # fine-tuning epochs 3 and 4
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert not torch.equal(ck["model"]["features.0.weight"], source)
    assert [h["frozen"] for h in resumed["history"]] == [True, True, False, False]
    # the resumed run equals an uninterrupted one
    full, _ = run(tmp_path, "b", *common)
    assert full["history"] == resumed["history"] and full["metrics"] == resumed["metrics"]
    assert ["test_error" in h for h in full["history"]] == [False, True, False, True]
    assert full["history"][-1]["test_error"] == full["metrics"]["test_error"]  # the final test
    # --eval-only: the checkpoint alone (no AlexNet layer given) on the same 500 test images
    only_the_test_split(monkeypatch)
    again, _ = run(tmp_path, "e", "--eval-only", "--weights",
                   str(tmp_path / "b" / "checkpoint.pt"), "--limit", "512")
    assert again["metrics"] == full["metrics"] and again["history"] == []
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 500}
    assert_shapes_class_records(full)
    # --classify: a folder of the user's images through that network (its blocks, channels,
    # classes, normalisation and 32x32 input from the checkpoint), no data set read
    mine = shapes_pictures(tmp_path / "mine")
    rows = mf.main(["--classify", mine, "--weights", str(tmp_path / "b" / "checkpoint.pt"),
                    "--device", "cpu", "--out", str(tmp_path / "p")])
    assert_classified(rows, tmp_path / "p")


@pytest.mark.slow
def test_quick_run_learns_and_prints_the_lectures_line(tmp_path, capsys):
    # ~12 s: 20 epochs on 2,000 shapes images from a random first layer; chance is 0.833 error,
    # this reaches ~0.64.
    results, out = run(tmp_path, "a", "--scratch", "--epochs", "20")
    assert results["metrics"]["test_error"] < 0.72
    err = results["metrics"]["test_error"]
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("test_error")][-1]
    assert line == f"test_error {100 * err:.02f}% ({round(err * 500)}/500)"
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["metrics"]["test_error"] == err


def test_compare_runs_the_three_recipes(tmp_path):
    _, tv_path, _, _ = save_alexnets(tmp_path)
    results, out = run(tmp_path, "c", "--alexnet-weights", tv_path, "--epochs", "2",
                       "--compare", "--blocks", "1", "--channels", "8", "--limit", "512")
    assert set(results) == {"finetune", "never_frozen", "scratch"}
    with open(os.path.join(out, "comparison.json")) as f:
        saved = json.load(f)
    assert set(saved["metrics"]) == {"finetune_test_error", "never_frozen_test_error",
                                     "scratch_test_error"}
    frozen = {}
    for name in results:
        with open(os.path.join(out, name, "results.json")) as f:
            frozen[name] = [h["frozen"] for h in json.load(f)["history"]]
    assert frozen == {"finetune": [True, False], "never_frozen": [False, False],
                      "scratch": [False, False]}


def test_trains_on_a_folder_of_the_users_own_images(tmp_path):
    # --data folder:DIR: DIR/train/<class>/*, DIR/val/<class>/* held at 32x32; dark and light
    r = mf.main(["--data", image_tree(tmp_path / "tree"), "--scratch", "--blocks", "1",
                 "--channels", "8", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--out", str(tmp_path / "run")])
    assert r["config"]["sizes"] == {"train": 16, "val": 0, "test": 8}
    assert set(r["per_class_error"]) == {"dark", "light"} and 0 <= r["auc"] <= 1
    assert r["confusion"]["classes"] == ["dark", "light"]


def test_a_run_from_the_paper_alexnets_layer_is_evaluated_from_its_checkpoint_alone(tmp_path):
    # The paper variant's first layer has 96 filters (torchvision's 64): the evaluation takes
    # the width from the checkpoint, without --alexnet-weights.
    _, _, _, paper_path = save_alexnets(tmp_path)
    tree = image_tree(tmp_path / "tree")
    r = mf.main(["--data", tree, "--alexnet-weights", paper_path, "--blocks", "1",
                 "--channels", "8", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--out", str(tmp_path / "run")])
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    again = mf.main(["--eval-only", "--weights", ckpt, "--device", "cpu",
                     "--out", str(tmp_path / "eval")])
    assert again["metrics"] == r["metrics"] and again["config"]["sizes"]["train"] == 0
    torch.save({"fc.weight": torch.zeros(2, 8)}, tmp_path / "other.pt")
    with pytest.raises(data.DataError, match="holds no features.0 layer"):
        mf.main(["--eval-only", "--weights", str(tmp_path / "other.pt"), "--data", tree,
                 "--blocks", "1", "--channels", "8", "--device", "cpu",
                 "--out", str(tmp_path / "e2")])


def test_bad_input_is_a_one_line_error(tmp_path):
    bad = tmp_path / "resnet.pt"
    torch.save({"arch": "resnet20", "model": {"conv1.weight": torch.zeros(16, 3, 3, 3)}}, bad)
    for argv, message in ((["--data", "shapes", "--epochs", "1"], "no trained AlexNet given"),
                          (["--data", "imagenet", "--scratch"], "takes small images"),
                          (["--data", "shapes", "--quick", "--alexnet-weights", str(bad)],
                           "hold no AlexNet first layer"),
                          (["--classify", "/nonexistent.jpg", "--pretrained"],
                           "--classify needs --weights CKPT: without it"),
                          (["--classify", "/nonexistent.jpg", "--weights", str(bad)],
                           "is of 'resnet20', not 'monster'")):
        with pytest.raises(mf.data.DataError, match=message) as e:
            mf.main(["--device", "cpu", "--no-download", "--out", str(tmp_path / "x"), *argv])
        assert "\n" not in str(e.value)
    # as a command: exit code != 0, one line on stderr
    r = command("monster_finetune.py", ["--device", "cpu", "--no-download",
                        "--out", str(tmp_path / "x"), "--data", "voc"])
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "'voc' is a detection data set" in r.stderr, \
        r.stderr


def test_at_init_output_depends_on_input_and_eval_mode_learns():
    from conftest import assert_learns_in_eval_mode, shapes_batch
    x, y = shapes_batch(16, 32)
    torch.manual_seed(0)
    assert_learns_in_eval_mode(mf.Monster(4, 16, 6, 64, 32), x, y, 40, 0.01, 0.6)


def test_dry_run_takes_two_steps_checks_the_checkpoint_and_writes_results(tmp_path, capsys):
    # The lecture's network (16 blocks of 64) and recipe from a random first layer (--scratch:
    # no frozen stage), 100 epochs cut to 1 of 2 steps, batch 2, on shapes; the test is 2
    # batches of 500. --limit 1200: rendering the whole set (12,000 images) would take longer
    # than the run; 1,200 test images still show the cut to 1,000.
    out = tmp_path / "dry"
    results = mf.main(["--data", "shapes", "--scratch", "--device", "cpu", "--dry-run",
                       "--batch-size", "2", "--limit", "1200", "--out", str(out),
                       "--log-every", "1"])
    said = capsys.readouterr().out
    assert re.findall(r"^epoch 1/1 step (\d+)/(\d+) ", said, re.M) == [("1", "2"), ("2", "2")]
    assert re.search(r"^test_error [\d.]+% \(\d+/1000\)$", said, re.M)
    config = results["config"]
    assert config["dry_run"] is True and (config["epochs"], config["frozen_epochs"]) == (1, 0)
    assert (config["blocks"], config["channels"], config["sizes"]["test"]) == (16, 64, 1200)
    state = data.load_checkpoint(str(out / "checkpoint.pt"), "monster")
    assert state["epoch"] == 0 and [h["frozen"] for h in state["history"]] == [False]
    assert json.loads((out / "results.json").read_text())["config"]["dry_run"] is True


def test_dry_run_of_a_fine_tuning_run_takes_both_stages(tmp_path, capsys):
    # From a trained AlexNet the run has two stages (frozen for half of the epochs, then
    # fine-tuned): the dry run takes 2 steps of each. A small net: this checks the stages only.
    _, tv_path, _, _ = save_alexnets(tmp_path)
    results = mf.main(["--data", "shapes", "--alexnet-weights", tv_path, "--device", "cpu",
                       "--dry-run", "--batch-size", "2", "--blocks", "1", "--channels", "8",
                       "--limit", "600", "--out", str(tmp_path / "dry"), "--log-every", "1"])
    steps = re.findall(r"^epoch (\d)/2 step (\d+)/2 ", capsys.readouterr().out, re.M)
    assert steps == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert [h["frozen"] for h in results["history"]] == [True, False]
    assert (results["config"]["epochs"], results["config"]["frozen_epochs"]) == (2, 1)
