"""lenet5.py: the paper's parameter counts, the C3 table, the recipe, and main() end to end."""
import json
import os
import re

import pytest
import torch

import data
import lenet5
from conftest import command, ddp_results_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lecture_network_layout_and_parameters():
    m = lenet5.lenet5()
    # conv 1->6 5x5: 6*25+6 = 156; conv 6->16: 16*6*25+16 = 2,416; 256*120+120 = 30,840;
    # 120*84+84 = 10,164; 84*10+10 = 850.
    assert [p.numel() for p in m.parameters()][::2] == [150, 2400, 30720, 10080, 840]
    assert lenet5.count_parameters(m) == 156 + 2416 + 30840 + 10164 + 850
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert lenet5.lenet5(num_classes=6, in_channels=3, image_size=32)(
        torch.zeros(1, 3, 32, 32)).shape == (1, 6)


def test_1998_network_has_the_papers_parameter_counts():
    m = lenet5.lenet5("1998")
    per_layer = {name: lenet5.count_parameters(getattr(m, name))
                 for name in ("c1", "s2", "c3", "s4", "c5", "f6")}
    # §II.B: C1 156, S2 12, C3 1,516, S4 32, C5 48,120, F6 10,164 trainable parameters.
    assert per_layer == {"c1": 156, "s2": 12, "c3": 1516, "s4": 32, "c5": 48120, "f6": 10164}
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert lenet5.ScaledTanh()(torch.tensor([1.0, -1.0])).tolist() == pytest.approx([1, -1], 1e-4)


def test_1998_init_is_uniform_2_4_over_the_fan_in():
    torch.manual_seed(0)
    m = lenet5.lenet5("1998")
    # C3: map 0 reads 3 S2 maps (fan-in 75), map 6 reads 4 (100), map 15 all 6 (150)
    for j, fan_in in ((0, 75), (6, 100), (15, 150)):
        w = (m.c3.weight[j] * m.c3.mask[j]).detach()
        assert 0.8 * 2.4 / fan_in < float(w.abs().max()) <= 2.4 / fan_in, j
    for layer, fan_in in ((m.c1, 25), (m.c5, 400), (m.f6, 120), (m.output, 84)):
        w = layer.weight.detach()
        assert 0.95 * 2.4 / fan_in < float(w.abs().max()) <= 2.4 / fan_in
        assert abs(float(w.std()) - 2.4 / fan_in / 3 ** 0.5) < 0.1 * 2.4 / fan_in  # uniform
        assert (layer.bias == 0).all()
    assert float(m.s2.weight.detach().abs().max()) <= 0.6 \
        and float(m.s4.weight.detach().abs().max()) <= 0.6


def test_c3_maps_see_only_the_inputs_of_table_1():
    torch.manual_seed(0)
    c3 = lenet5.MaskedConv2d(lenet5.C3_TABLE, 5)
    x = torch.randn(1, 6, 10, 10)
    x2 = x.clone()
    x2[:, 3:] += 1.0  # change S2 maps 3, 4, 5
    changed = (c3(x) - c3(x2)).abs().amax(dim=(0, 2, 3)) > 0
    # Table I: C3 map 0 reads S2 maps 0, 1, 2 only; map 1 reads 1, 2, 3; map 15 reads all.
    assert not changed[0] and changed[1] and changed[15]
    c3(x).sum().backward()
    assert (c3.weight.grad[0, 3:] == 0).all() and (c3.weight.grad[0, :3] != 0).any()


def test_learning_rate_schedule_has_the_papers_shape():
    assert [lenet5.lr_factor(e) for e in (0, 1, 2, 4, 5, 7, 8, 11, 12, 19)] == \
        [1, 1, 0.4, 0.4, 0.2, 0.2, 0.1, 0.1, 0.02, 0.02]
    # --epochs 40: the milestones keep their fractions of the 20 passes
    assert [lenet5.lr_factor(e, 40) for e in (3, 4, 9, 10, 15, 16, 23, 24, 39)] == \
        [1, 0.4, 0.4, 0.2, 0.2, 0.1, 0.1, 0.02, 0.02]


def run(tmp_path, name, *extra):
    # 2 epochs unless extra says otherwise (the last --epochs wins): the tests' own budget,
    # not --quick's
    out = str(tmp_path / name)
    return lenet5.main(["--data", "shapes", "--quick", "--epochs", "2", "--device", "cpu", "--out", out,
                        "--log-every", "1000", *extra]), out


@pytest.mark.slow
def test_quick_run_on_shapes_learns_and_writes_results(tmp_path):
    # ~3 s: 15 passes over 2,000 images; chance is 5/6 = 0.83 error, this reaches ~0.64.
    results, out = run(tmp_path, "a", "--epochs", "15", "--lr", "0.1")
    assert results["metrics"]["test_error"] < 0.75
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["metrics"] == results["metrics"] and saved["script"] == "lenet5.py"
    assert len(saved["history"]) == 15 and saved["paper"]["test_error"] == 0.0095
    assert saved["history"][-1]["train_loss"] < saved["history"][0]["train_loss"]
    # --eval-only with the checkpoint gives back the same test error
    again, _ = run(tmp_path, "b", "--eval-only", "--weights", os.path.join(out, "checkpoint.pt"))
    assert again["metrics"] == results["metrics"]


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    tiny = ["--variant", "1998", "--limit", "512"]  # the code path, not learning: 512 images
    full, out_full = run(tmp_path, "full", "--epochs", "3", *tiny)
    run(tmp_path, "cut", "--epochs", "1", *tiny)  # "killed" after epoch 1
    resumed, out_cut = run(tmp_path, "cut", "--epochs", "3", "--resume", *tiny)
    assert resumed["history"] == full["history"]
    assert resumed["metrics"] == full["metrics"]
    a = torch.load(os.path.join(out_full, "checkpoint.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(out_cut, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_is_enough_to_resume_and_to_evaluate(tmp_path):
    # The resumed run and the evaluation are given no setting of the run: it trained with
    # --augment, the 1998 net, 512 images, lr 0.02 for 2 epochs on shapes, and both take all of
    # that from the checkpoint (the defaults are the lecture's net, MNIST, 20 epochs, lr 0.05).
    tiny = ["--variant", "1998", "--limit", "512", "--augment", "--lr", "0.02"]
    full, _ = run(tmp_path, "full", *tiny)
    assert run(tmp_path, "cut", "--stop-after", "1", *tiny)[0] is None  # "killed" after epoch 1
    cut = str(tmp_path / "cut")
    resumed = lenet5.main(["--resume", "--out", cut, "--device", "cpu"])
    assert resumed["history"] == full["history"] and resumed["metrics"] == full["metrics"]
    # each epoch's row holds the lr its steps used (curves.png draws it)
    assert [r["lr"] for r in full["history"]] == pytest.approx(
        [0.02 * lenet5.lr_factor(e, 2) for e in range(2)])
    assert resumed["config"]["augment"] is True and resumed["config"]["script"] == "lenet5.py"
    ckpt = os.path.join(cut, "checkpoint.pt")
    again = lenet5.main(["--eval-only", "--weights", ckpt, "--out", str(tmp_path / "e"),
                         "--device", "cpu", "--quick", "--limit", "512"])  # the same 500 images
    assert again["data"] == "shapes" and again["metrics"] == full["metrics"]
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 500}  # only the test split
    # a flag that contradicts the checkpoint is one line naming both values
    with pytest.raises(data.DataError, match=re.escape(
            f"--variant lecture contradicts {ckpt}, trained with --variant 1998; drop --variant")):
        lenet5.main(["--eval-only", "--weights", ckpt, "--variant", "lecture", "--device", "cpu",
                     "--out", str(tmp_path / "f")])
    with pytest.raises(data.DataError, match=re.escape(
            f"--lr 0.1 contradicts {ckpt}, trained with --lr 0.02")):
        lenet5.main(["--resume", "--out", cut, "--lr", "0.1", "--device", "cpu"])
    # --classify: a folder of the user's images through that network, no data set read
    from PIL import Image
    mine = tmp_path / "mine"
    mine.mkdir()
    for i in range(2):
        image = data.render_shapes(0, i, 48, split="test")[0]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(mine / f"s{i}.png")
    rows = lenet5.main(["--classify", str(mine), "--weights", ckpt, "--device", "cpu", "--out",
                        str(tmp_path / "p")])
    assert [len(r["found"]) for r in rows] == [5, 5]
    assert {f["class"] for f in rows[0]["found"]} <= set(data.SHAPES_CLASSES)
    assert (tmp_path / "p" / "predictions.csv").is_file()
    assert (tmp_path / "p" / "s1_classes.png").is_file()


def test_trains_on_a_folder_of_the_users_own_images(tmp_path):
    # --data folder:DIR: DIR/train/<class>/*, DIR/val/<class>/* (val is the test split), held at
    # 32x32; the class names are the folders'. Bright against dark images: two classes.
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("val", 8)):
        for c, level in (("dark", 40), ("light", 200)):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = (level + 30 * torch.randn(20, 26, 3, generator=g)).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(
                    tmp_path / "tree" / split / c / f"{i}.jpg")
    r = lenet5.main(["--data", f"folder:{tmp_path / 'tree'}", "--epochs", "3", "--batch-size",
                     "8", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert r["config"]["sizes"] == {"train": 48, "val": 0, "test": 16}
    assert r["per_class_error"] == {"dark": 0.0, "light": 0.0} and r["auc"] == 1.0
    assert r["confusion"]["classes"] == ["dark", "light"]
    (tmp_path / "tree" / "val" / "cat").mkdir()
    with pytest.raises(data.DataError, match="val/cat is a class that .*train does not have"):
        lenet5.main(["--data", f"folder:{tmp_path / 'tree'}", "--device", "cpu", "--out",
                     str(tmp_path / "x")])
    with pytest.raises(data.DataError, match="nowhere/train does not exist; the images go in "
                                             "DIR/train/<class>"):
        lenet5.main(["--data", f"folder:{tmp_path / 'nowhere'}", "--device", "cpu", "--out",
                     str(tmp_path / "y")])


def test_bad_input_is_a_one_line_error():
    for argv, message in ((["--data", "voc"], "'voc' is a detection data set"),
                          (["--data", "cifar10"], "lenet5.py trains on mnist"),
                          (["--data", "shapes", "--weights", "/nonexistent.pt", "--quick"],
                           "checkpoint /nonexistent.pt not found")):
        with pytest.raises(data.DataError, match=re.escape(message)) as e:
            lenet5.main(["--device", "cpu", *argv])
        assert "\n" not in str(e.value)
    r = command("lenet5.py", ["--device", "cpu", "--data", "voc"])
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("lenet5.py: error: ") and "is a detection data set" in r.stderr


DDP_ARGS = ["--epochs", "1", "--limit", "512"]


@pytest.mark.ddp("lenet5", "lenet5", ["--data", "shapes", "--quick", "--device", "cpu",
                                *DDP_ARGS,
                                "--log-every", "100000"])
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path, ddp_runs):
    single, _ = run(tmp_path, "one", *DDP_ARGS)
    double = ddp_results_json(ddp_runs, "lenet5")
    assert double["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"],
                                                               rel=1e-4)
    assert double["metrics"]["test_error"] == pytest.approx(single["metrics"]["test_error"],
                                                            abs=2 / 500)


@pytest.mark.parametrize("variant,steps", [("lecture", 40), ("1998", 80)])
def test_at_init_output_depends_on_input_and_eval_mode_learns(variant, steps):
    # 16 grey shapes images at the default lr 0.05: measured (first, train, eval) losses
    # (1.78, 0.77, 0.77) after 40 steps (lecture); the 1998 net at Appendix A's small init
    # starts slowly: (1.79, 1.41, 1.41) after 40 steps, (1.79, 0.008, 0.008) after 80.
    from conftest import assert_learns_in_eval_mode, shapes_batch
    x, y = shapes_batch(16, 32, channels=1)
    torch.manual_seed(0)
    assert_learns_in_eval_mode(lenet5.lenet5(variant, 6, 1, 32), x, y, steps, 0.05, 0.6)


def test_trains_on_the_whole_training_set_unless_holdout(tmp_path):
    whole, _ = run(tmp_path, "whole", "--epochs", "1")
    held, _ = run(tmp_path, "held", "--epochs", "1", "--holdout")
    assert whole["config"]["sizes"] == {"train": 2250, "val": 0, "test": 500}
    assert held["config"]["sizes"] == {"train": 2000, "val": 250, "test": 500}
    assert "val_error" not in whole["history"][0] and "val_error" in held["history"][0]
    assert (whole["config"]["holdout"], held["config"]["holdout"]) == (False, True)


def test_dry_run_takes_two_steps_checks_the_checkpoint_and_writes_results(tmp_path, capsys):
    # The paper's settings (20 epochs, batch 64: cut to 1 epoch of 2 steps) on shapes; --limit
    # 2500 draws 2,500 images per split instead of 12,000 (seconds of CPU) and still leaves the
    # test 3 batches of 1,000, of which 2 are evaluated.
    out = tmp_path / "dry"
    results = lenet5.main(["--data", "shapes", "--device", "cpu", "--dry-run", "--batch-size",
                           "2", "--out", str(out), "--log-every", "1", "--limit", "2500"])
    said = capsys.readouterr().out
    assert re.findall(r"^epoch 1/1 step (\d+)/(\d+) ", said, re.M) == [("1", "2"), ("2", "2")]
    assert re.search(r"^test_error .* \(\d+/2000\)", said, re.M)  # 2 batches of 1,000
    assert results["config"]["dry_run"] is True and results["config"]["epochs"] == 1
    assert data.load_checkpoint(str(out / "checkpoint.pt"), "lenet5-lecture")["epoch"] == 0
    assert json.loads((out / "results.json").read_text())["config"]["dry_run"] is True


def _impulse_after(**move):
    # an impulse 4 pixels below the centre of a 29x29 field (centre: pixel 14), moved by one map
    x = torch.zeros(1, 1, 29, 29)
    x[0, 0, 18, 14] = 1
    s, q, k = (torch.tensor([move.get(n, d)]) for n, d in (("s", 1.0), ("q", 1.0), ("k", 0.0)))
    grid = lenet5.distortion_grid(s, q, k, torch.tensor([move.get("t", (0.0, 0.0))]), x.shape)
    y = torch.nn.functional.grid_sample(x, grid, align_corners=False)[0, 0]
    return divmod(int(y.argmax()), 29), float(y.max())


def test_distortions_are_the_papers_affine_maps():
    # §III.C: translation, scaling, squeezing (x by q, y by 1/q), horizontal shear (x += k y);
    # (row, column) of the impulse at (x, y) = (0, +4) pixels from the centre, worked by hand
    for move, where in (({}, (18, 14)), ({"t": (2.0, -1.0)}, (17, 16)),  # right 2, up 1
                        ({"s": 2.0}, (22, 14)),  # y 4 -> 8
                        ({"q": 2.0}, (16, 14)),  # y 4 -> 2 (x 0 stays)
                        ({"k": 0.5}, (18, 16))):  # x 0 -> 0 + 0.5 * 4
        at, value = _impulse_after(**move)
        assert at == where, move
        assert value == pytest.approx(1, abs=1e-5)  # whole-pixel moves: no blur


def test_distort_changes_nine_in_ten_digits_within_its_ranges():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 1, 28, 28)
    y = lenet5.distort(x, g)
    changed = (y - x).abs().flatten(1).amax(1) > 1e-4
    assert abs(changed.float().mean().item() - lenet5.DISTORT["p"]) < 0.03
    assert torch.equal(y[~changed], x[~changed])  # the others untouched, bit for bit
    assert torch.equal(lenet5.distort(x, torch.Generator().manual_seed(0)), y)  # seeded
    # no move at all leaves every image as it was (the grid reads pixel centres)
    same = lenet5.distort(x[:8], g, p=1, translate=0, scale=0, squeeze=0, shear=0)
    assert torch.allclose(same, x[:8], atol=1e-5)
    # an ink mass of a centred blob keeps most of its mass: small maps, not crops
    blob = torch.zeros(64, 1, 28, 28)
    blob[:, :, 8:20, 8:20] = 1
    kept = lenet5.distort(blob, g, p=1).sum((1, 2, 3)) / 144
    assert kept.min() > 0.7 and kept.max() < 1.4


def test_distort_and_eval_every_give_figure_5s_curves(tmp_path):
    # --eval-every 1: each pass's training error (undistorted, eval mode) and test error in the
    # history; the last pass's test error is the final test's (nothing chosen on the curves)
    results, _ = run(tmp_path, "d", "--distort", "--eval-every", "1", "--limit", "512")
    rows = results["history"]
    assert [sorted(k for k in r if k.endswith("_error")) for r in rows] == \
        [["test_error", "train_error"]] * 2
    assert rows[-1]["test_error"] == results["metrics"]["test_error"]
    assert results["config"]["distort"] is True
    assert results["paper"]["test_error"] == 0.008  # §III.C's figure with distortions
    every2, _ = run(tmp_path, "e", "--epochs", "3", "--eval-every", "2", "--limit", "512")
    assert ["test_error" in r for r in every2["history"]] == [False, True, False]
    plain, _ = run(tmp_path, "p", "--limit", "512")
    assert "test_error" not in plain["history"][0] and not plain["config"]["distort"]
    assert plain["paper"]["test_error"] == 0.0095
    # the distortions reach training: other weights than the undistorted run's
    assert rows[0]["train_loss"] != plain["history"][0]["train_loss"]


def test_augment_and_distort_together_is_a_one_line_error():
    with pytest.raises(data.DataError, match="--augment and --distort"):
        lenet5.main(["--data", "shapes", "--device", "cpu", "--augment", "--distort"])
