"""alexnet.py: parameter counts, torchvision compatibility, the two towers, LRN, the ten-crop test,
--classify, and main() end to end."""
import json
import os
import re
import sys
import types

import pytest
import torch
import torchvision

import data
import alexnet
from conftest import (assert_shapes_class_records, command, ddp_results_json, deterministic_step,
                      host_reads, image_tree, old_kernels, only_the_test_split,
                      refuse_nondeterministic_kernels, shapes_pictures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parameter_counts_match_torchvision_and_the_paper():
    ours = alexnet.count_parameters(alexnet.alexnet())
    assert ours == sum(p.numel() for p in torchvision.models.alexnet(weights=None).parameters())
    assert ours == 61_100_840
    # Paper: conv1 96*3*121+96 = 34,944; conv2 256*48*25+256 = 307,456 (two towers);
    # conv3 384*256*9+384 = 885,120; conv4 384*192*9+384 = 663,936; conv5 256*192*9+256 =
    # 442,624; fc6 9216*4096+4096 = 37,752,832; fc7 16,781,312; fc8 4,097,000.
    paper = alexnet.alexnet(variant="paper")
    per_layer = [alexnet.count_parameters(m) for m in
                 list(paper.features.children()) + list(paper.classifier.children())
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert per_layer == [34944, 307456, 885120, 663936, 442624, 37752832, 16781312, 4097000]
    n = alexnet.count_parameters(paper)
    assert n == 60_965_224 == alexnet.PAPER["parameters"] and 60e6 <= n <= 62e6


def test_torchvision_state_dict_loads_strictly_and_gives_identical_outputs():
    torch.manual_seed(0)
    ref = torchvision.models.alexnet(weights=None).eval()
    ours = alexnet.alexnet().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_output_shapes_of_both_variants():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    for variant in ("torchvision", "paper"):
        m = alexnet.alexnet(variant=variant).eval()
        with torch.no_grad():
            assert m(x).shape == (2, 1000)
            assert m.features(x).shape[-2:] == (6, 6)  # Fig. 2: 55, 27, 13, 6 on 224 + pad 2
            assert m.features[0](x).shape[-2:] == (55, 55)
        small = alexnet.alexnet(6, variant, 3, width=0.25).eval()
        with torch.no_grad():  # upsampled small sets (64, 96) and a 1-channel input
            assert small(torch.randn(3, 3, 64, 64)).shape == (3, 6)
            assert small(torch.randn(3, 3, 96, 96)).shape == (3, 6)
        assert alexnet.alexnet(10, variant, 1, 0.25)(torch.randn(1, 1, 64, 64)).shape == (1, 10)
    m = alexnet.alexnet(variant="paper")
    assert [getattr(m.features, k).out_channels for k in ("conv1", "conv2", "conv3", "conv4",
                                                           "conv5")] \
        == [96, 256, 384, 384, 256]


def test_paper_init_and_two_towers():
    torch.manual_seed(0)
    m = alexnet.alexnet(variant="paper", width=0.25)
    f, c = m.features, m.classifier
    # §5: biases 1 in conv2, conv4, conv5, fc6, fc7; 0 in conv1, conv3, fc8; weights N(0, 0.01)
    assert all((getattr(f, k).bias == 1).all() for k in ("conv2", "conv4", "conv5"))
    assert (c.fc6.bias == 1).all() and (c.fc7.bias == 1).all()
    assert (f.conv1.bias == 0).all() and (f.conv3.bias == 0).all() and (c.fc8.bias == 0).all()
    assert c.fc6.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert [getattr(f, k).groups for k in ("conv2", "conv3", "conv4", "conv5")] == [2, 1, 2, 2]
    # Full width: conv2's tower 0 (output maps 0..127) must not see conv1's maps 48..95.
    conv2 = alexnet.alexnet(variant="paper").features.conv2
    x = torch.randn(1, 96, 13, 13)
    x2 = x.clone()
    x2[:, 48:] += torch.randn(1, 48, 13, 13)
    with torch.no_grad():
        a, b = conv2(x), conv2(x2)
    assert torch.equal(a[:, :128], b[:, :128])
    assert not torch.allclose(a[:, 128:], b[:, 128:])
    # conv3 connects to all: every output map changes
    conv3 = alexnet.alexnet(variant="paper").features.conv3
    y = torch.randn(1, 256, 5, 5)
    y2 = y.clone()
    y2[:, 128:] += 1
    with torch.no_grad():
        assert ((conv3(y) - conv3(y2)).abs().amax(dim=(0, 2, 3)) > 0).all()


def test_lrn_matches_the_formula_by_hand():
    # b_i = a_i / (k + alpha/n * sum_{j=max(0,i-2)}^{min(N-1,i+2)} a_j^2)^beta, n = 5, k = 2,
    # alpha = 1e-4, beta = 0.75: PyTorch's alpha/n convention (= cuda-convnet's and Caffe's).
    a = [3.0, -10.0, 20.0, 1.0, 50.0, 7.0]
    x = torch.tensor(a).view(1, 6, 1, 1)
    lrn = alexnet.alexnet(variant="paper").features.norm1
    got = lrn(x).view(-1).tolist()
    for i in range(6):
        s = sum(a[j] ** 2 for j in range(max(0, i - 2), min(5, i + 2) + 1))
        assert got[i] == pytest.approx(a[i] / (2 + 1e-4 / 5 * s) ** 0.75, rel=1e-6)
    # e.g. channel 2: sum = 9 + 100 + 400 + 1 + 2500 = 3010; 20 / (2 + 0.0602)^0.75
    assert got[2] == pytest.approx(20 / 2.0602 ** 0.75, rel=1e-6)


def test_ten_crop_equals_the_softmax_average_over_hand_sliced_crops():
    torch.manual_seed(0)
    model = alexnet.alexnet(5, width=0.25).eval()
    size = 224
    x = torch.randn(2, 3, 256, 256)
    got = alexnet.predict(model, x, size, ten_crop=True)
    crops = [x[..., :224, :224], x[..., :224, 32:], x[..., 32:, :224], x[..., 32:, 32:],
             x[..., 16:240, 16:240]]
    crops += [c.flip(-1) for c in crops]
    with torch.no_grad():
        want = torch.stack([model(c).softmax(1) for c in crops]).mean(0)
    assert torch.allclose(got, want, atol=1e-6)
    # the single-crop test is the centre crop
    with torch.no_grad():
        assert torch.allclose(alexnet.predict(model, x, size), model(crops[4]).softmax(1),
                              atol=1e-6)


def test_lr_schedule_divides_by_ten_three_times():
    assert [alexnet.lr_factor(e) for e in (0, 29, 30, 59, 60, 79, 80, 89)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def imagenet_checkpoint(path, variant="torchvision", width=0.25):
    """A random-weight checkpoint of an ImageNet network with what --classify needs beside the
    weights (data.test_settings: the 1000 names, ImageNet's normalisation, 3x224 inputs)."""
    torch.save({"arch": f"alexnet-{variant}-w{width:g}",
                "model": alexnet.alexnet(1000, variant, width=width).state_dict(),
                "classes": data.imagenet_class_names(),
                "normalisation": (data.IMAGENET_MEAN, data.IMAGENET_STD),
                "input_shape": (3, 224)}, path)
    return str(path)


def test_classify_prints_fifteen_named_lines(tmp_path):
    from PIL import Image
    torch.manual_seed(0)
    ckpt = imagenet_checkpoint(tmp_path / "random.pt")
    img = tmp_path / "img.png"
    Image.fromarray((torch.rand(300, 260, 3) * 255).byte().numpy()).save(img)
    r = command("alexnet.py", ["--classify", str(img), "--weights", ckpt, "--width", "0.25",
                               "--device", "cpu", "--out", str(tmp_path / "p")])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == f"{img}:" and lines[16].startswith("1 image(s): pictures in ")
    names = set(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.meta["categories"])
    probabilities = []
    for k, line in enumerate(lines[1:16]):  # the lecture's 15 named lines
        m = re.fullmatch(r"  #(\d+) +(\d+\.\d\d)% (.+)", line)
        assert m and int(m.group(1)) == k + 1 and m.group(3) in names, line
        probabilities.append(float(m.group(2)))
    assert probabilities == sorted(probabilities, reverse=True)
    assert (tmp_path / "p" / "img_classes.png").is_file()


def run(tmp_path, name, *extra):
    # the tests' own budget (2 epochs, batch 128) unless extra says otherwise (the last flag
    # wins), not --quick's
    out = str(tmp_path / name)
    return alexnet.main(["--data", "shapes", "--quick", "--batch-size", "128", "--epochs", "2", "--device", "cpu", "--out", out,
                         "--log-every", "1000", *extra]), out


@pytest.mark.slow
def test_quick_run_on_shapes_learns_and_writes_results(tmp_path):
    # With the paper's lr 0.01 at batch 128 this narrow network stays at chance on shapes; at
    # lr 0.001, batch 16 on the 2,250 training images it reaches 0.762 error after 8 epochs
    # (chance: 5/6 = 0.83).
    results, out = run(tmp_path, "a", "--epochs", "8", "--lr", "0.001", "--batch-size", "16")
    assert results["metrics"]["test_error"] < 0.78
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["metrics"] == results["metrics"] and saved["script"] == "alexnet.py"
    assert saved["paper"]["top5_error"] == 0.182 and len(saved["history"]) == 8
    assert "top5_error" not in saved["metrics"]  # 6 classes: no top-5 figure


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    # --eval-every 2: the test split after epoch 2 only, the resumed run's history included
    tiny = ["--width", "0.125", "--variant", "paper", "--init", "variant", "--limit", "512",
            "--eval-every", "2"]
    full, out_full = run(tmp_path, "full", "--epochs", "2", *tiny)
    cut, out_cut = run(tmp_path, "cut", "--epochs", "2", "--stop-after", "1", *tiny)  # "killed"
    assert cut is None and not os.path.exists(os.path.join(out_cut, "results.json"))
    resumed, _ = run(tmp_path, "cut", "--epochs", "2", "--resume", *tiny)
    assert resumed["history"] == full["history"]
    assert ["test_error" in row for row in full["history"]] == [False, True]
    assert full["history"][-1]["test_error"] == full["metrics"]["test_error"]  # the final test
    assert resumed["metrics"] == full["metrics"]
    ckpt = torch.load(os.path.join(out_full, "checkpoint.pt"), weights_only=True)
    a = ckpt["model"]
    b = torch.load(os.path.join(out_cut, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the released rates: every bias at 2x the lr without weight decay, the weights at 5e-4
    weights, biases = ckpt["optimizer"]["param_groups"]
    assert biases["lr"] == pytest.approx(2 * weights["lr"])
    assert (weights["weight_decay"], biases["weight_decay"]) == (5e-4, 0.0)
    assert len(biases["params"]) == sum(k.endswith("bias") for k in a)
    # --eval-only: the checkpoint's network (paper variant, width 0.125) and normalisation, the
    # same 500 test images and nothing else (no training image read, no PCA colour taken)
    only_the_test_split(monkeypatch)
    again, _ = run(tmp_path, "e", "--eval-only", "--weights",
                   os.path.join(out_full, "checkpoint.pt"), "--limit", "512")
    assert again["metrics"] == full["metrics"] and again["config"]["arch"] == "alexnet-paper-w0.125"
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 500}
    assert again["config"]["normalisation"] == full["config"]["normalisation"]
    assert_shapes_class_records(full)
    # --classify: a folder of the user's images through that network (its variant, width,
    # classes, normalisation and 32x32 input upsampled to 96 from the checkpoint), no data read
    mine = shapes_pictures(tmp_path / "mine")
    rows = alexnet.main(["--classify", mine, "--weights",
                         os.path.join(out_full, "checkpoint.pt"), "--device", "cpu", "--out",
                         str(tmp_path / "p")])
    assert [len(r["found"]) for r in rows] == [6, 6]  # top-15 of 6 classes: all six
    assert {f["class"] for f in rows[1]["found"]} == set(data.SHAPES_CLASSES)
    assert (tmp_path / "p" / "predictions.csv").is_file()


def imagenet_val_only(root):
    """DIR/imagenet/val with one image of each of two classes, and no DIR/imagenet/train."""
    from PIL import Image
    for k, wnid in enumerate(("n01440764", "n01443537")):
        (root / "imagenet" / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (300, 260), (k * 80, 50, 0)).save(
            root / "imagenet" / "val" / wnid / "0.JPEG")
    return str(root)


def test_eval_only_on_imagenet_needs_the_val_folder_alone(tmp_path):
    # --eval-only builds no training set: DIR/imagenet/train is not there (an eighth-width net
    # at 64x64 on two val images, with the ten-crop test: the code path, in a second)
    root = imagenet_val_only(tmp_path)
    torch.save(alexnet.alexnet(2, width=0.125).state_dict(), tmp_path / "w.pt")
    r = alexnet.main(["--data", "imagenet", "--data-dir", root, "--width", "0.125", "--img-size",
                      "64", "--eval-only", "--weights", str(tmp_path / "w.pt"), "--workers", "0",
                      "--device", "cpu", "--out", str(tmp_path / "e")])
    assert r["config"]["sizes"] == {"train": 0, "val": 0, "test": 2}
    assert "ten_crop_error" in r["metrics"]


def test_bad_input_is_a_one_line_error(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"arch": "lenet5-lecture", "model": {}}, other)
    for argv, message in ((["--data", "nope"], "unknown data set 'nope'"),
                          (["--data", "shapes", "--weights", "/nonexistent.pt", "--quick"],
                           "checkpoint /nonexistent.pt not found"),
                          (["--data", "shapes", "--weights", str(other), "--quick"],
                           "is of 'lenet5-lecture', not 'alexnet-torchvision-w0.25'"),
                          (["--classify", "/nonexistent.jpg"], "--classify needs --weights CKPT or "
                           "--pretrained"),
                          (["--classify", "/nonexistent.jpg", "--weights", str(other)],
                           "is of 'lenet5-lecture'")):
        with pytest.raises(data.DataError, match=re.escape(message)) as e:
            alexnet.main(["--device", "cpu", *argv])
        assert "\n" not in str(e.value)
    # The script's own guard: the same error as one line on stderr, a non-zero exit.
    r = command("alexnet.py", ["--device", "cpu", "--data", "nope"])
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("alexnet.py: error: ") and "unknown data set 'nope'" in r.stderr


def test_classify_bad_image_is_a_one_line_error(tmp_path):
    ckpt = imagenet_checkpoint(tmp_path / "w.pt", "paper", 0.125)
    r = command("alexnet.py", ["--classify", "/nonexistent.jpg", "--weights", ckpt, "--variant",
                               "paper", "--width", "0.125", "--out", str(tmp_path / "p")])
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "/nonexistent.jpg does not exist" in r.stderr, r.stderr
    # a checkpoint without the class names and input settings (a bare state_dict)
    torch.save(alexnet.alexnet(1000, width=0.25).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(data.DataError, match="holds no class names and input settings"):
        alexnet.main(["--classify", ckpt, "--weights", str(tmp_path / "bare.pt"), "--width",
                      "0.25", "--device", "cpu", "--out", str(tmp_path / "q")])


DDP_ARGS = ["--epochs", "1", "--batch-size", "32", "--limit", "512"]


@pytest.mark.ddp("alexnet", "alexnet", ["--data", "shapes", "--quick", "--device", "cpu",
                                *DDP_ARGS,
                                "--log-every", "100000"])
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path, ddp_runs):
    # No BatchNorm: two processes with half the batch each and DDP's averaged gradients follow
    # the single-process run step for step; dropout masks differ (seed + rank), hence eval mode
    # comparisons with a tolerance rather than bit equality.
    single, _ = run(tmp_path, "one", *DDP_ARGS)
    double = ddp_results_json(ddp_runs, "alexnet")
    assert double["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"],
                                                               rel=0.02)
    assert double["metrics"]["test_error"] == pytest.approx(single["metrics"]["test_error"],
                                                            abs=0.05)


@pytest.mark.parametrize("variant", ["torchvision", "paper"])
def test_at_init_output_depends_on_input_and_eval_mode_learns(variant):
    # The small-set init (He, last layer N(0, 0.01)), quarter width, 16 shapes images at 64x64,
    # 60 steps at the paper's lr 0.01. (At §5's N(0, 0.01) the output spread is 0.0.)
    from conftest import assert_learns_in_eval_mode, shapes_batch
    x, y = shapes_batch(16, 64)
    torch.manual_seed(0)
    model = alexnet.alexnet(6, variant, 3, 0.25)
    alexnet.kaiming_init(model)
    assert_learns_in_eval_mode(model, x, y, 60, 0.01, 0.6)


def test_dry_run_takes_two_steps_checks_the_checkpoint_and_writes_results(tmp_path, capsys,
                                                                         monkeypatch):
    # The paper's network and recipe (torchvision layout at full width, 57M parameters with 6
    # classes; batch 128, 90 epochs: cut to 1 epoch of 2 steps at batch 2) on shapes at the
    # script's 96x96. --limit 600: rendering the whole 12,000-image set alone costs ~11 CPU
    # seconds here; 600 test images are 3 evaluation batches of 250, of which 2 are evaluated.
    evaluated, real = [], alexnet.evaluate

    def evaluate(*args, **kwargs):  # the number of images each evaluation saw
        r = real(*args, **kwargs)
        evaluated.append(r["samples"])
        return r
    monkeypatch.setattr(alexnet, "evaluate", evaluate)
    out = tmp_path / "dry"
    results = alexnet.main(["--data", "shapes", "--device", "cpu", "--dry-run", "--batch-size",
                            "2", "--out", str(out), "--log-every", "1", "--limit", "600"])
    said = capsys.readouterr().out
    assert re.findall(r"^epoch 1/1 step (\d+)/(\d+) ", said, re.M) == [("1", "2"), ("2", "2")]
    assert evaluated == [500]  # the test only (no --holdout): 2 batches of 250
    assert re.search(r"^test_error .* \(\d+/500, single crop\)", said, re.M)
    config = results["config"]
    assert config["dry_run"] is True and config["epochs"] == 1 and config["width"] == 1.0
    assert config["img_size"] == 96 and config["variant"] == "torchvision"
    assert config["parameters"] == 61_100_840 - 994 * 4097  # torchvision's, fc8 of 6 classes
    assert len(results["history"]) == 1
    ckpt = data.load_checkpoint(str(out / "checkpoint.pt"), "alexnet-torchvision")
    assert ckpt["epoch"] == 0 and ckpt["args"]["dry_run"] is True
    assert json.loads((out / "results.json").read_text())["config"]["dry_run"] is True


def test_trains_on_a_folder_of_the_users_own_images(tmp_path):
    r = alexnet.main(["--data", image_tree(tmp_path / "tree"), "--width", "0.125", "--img-size",
                      "64", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out",
                      str(tmp_path / "run")])
    assert r["config"]["sizes"] == {"train": 16, "val": 0, "test": 8}
    assert set(r["per_class_error"]) == {"dark", "light"} and 0 <= r["auc"] <= 1
    assert r["confusion"]["classes"] == ["dark", "light"]


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU, checked on this CPU: --deterministic, host syncs, --amp

@pytest.mark.parametrize("variant", ["torchvision", "paper"])
@pytest.mark.parametrize("size", [96, 224])
def test_deterministic_cuda_path_trains_and_gives_the_old_numbers(variant, size, monkeypatch):
    # 96: the small sets' input, 2x2 maps pooled to 6x6 (a real adaptive pool); 224: the paper's
    # (6x6, the identity), and the LRN of the paper variant at both. The old code raised at the
    # first step here (F.adaptive_avg_pool2d, F.local_response_norm refused); the new one gives
    # the old kernels' logits and gradients within 1e-5.
    torch.manual_seed(0)
    model = alexnet.alexnet(6, variant, 3, width=0.25)
    alexnet.kaiming_init(model)  # logits of a useful scale (the paper init's are ~1e-3)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 5])
    want, want_grads = deterministic_step(old_kernels(model), x, y, deterministic=False)
    refuse_nondeterministic_kernels(monkeypatch, alexnet)
    got, grads = deterministic_step(model, x, y)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_torchvision_weights_on_the_deterministic_path_give_torchvisions_outputs(monkeypatch):
    # torchvision's own network (its AdaptiveAvgPool2d kernel) against ours with its state_dict
    # on the deterministic path, at 96 where the pool is a real one (224: the test above).
    torch.manual_seed(0)
    ref = torchvision.models.alexnet(weights=None, num_classes=6).eval()
    ours = alexnet.alexnet(6).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = ref(x)
        refuse_nondeterministic_kernels(monkeypatch, alexnet)
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("colour", [False, True])
def test_train_one_epoch_reads_no_loss_back_per_step(monkeypatch, colour):
    # Batches of 3, 2 and 3 images: the epoch's loss is Progress's mean weighted by each step's
    # samples; the old loop read every loss with .item() (a host sync per step on CUDA).
    torch.manual_seed(0)
    model = alexnet.alexnet(6, "paper", 3, width=0.125)
    alexnet.kaiming_init(model)
    batches = [(torch.randn(n, 3, 32, 32), torch.randint(0, 6, (n,))) for n in (3, 2, 3)]
    args = types.SimpleNamespace(img_size=64, channels_last=False, amp=False, world=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = data.grad_scaler(torch.device("cpu"), False)
    progress = alexnet.metrics.Progress(3, 1, every=1000, enabled=False, model=model)
    seen, real_step = [], progress.step
    monkeypatch.setattr(progress, "step", lambda images, loss, lr, epoch, n=None:
                        seen.append((loss, n)) or real_step(images, loss, lr, epoch, n))
    stats = (torch.tensor([0.2, 0.02, 0.005]), torch.eye(3), torch.ones(1, 3, 1, 1)) \
        if colour else None
    reads = host_reads(monkeypatch, alexnet)
    mean = alexnet.train_one_epoch(model, batches, optimizer, scaler, args, torch.device("cpu"),
                                   0, progress, stats)
    assert reads == []
    assert all(isinstance(loss, torch.Tensor) for loss, _ in seen) and [n for _, n in seen] == \
        [3, 2, 3]
    assert mean == pytest.approx(sum(float(l.detach()) * n for l, n in seen) / 8, rel=1e-6)


def test_evaluate_moves_its_outputs_to_the_cpu_once_not_per_batch(monkeypatch):
    # A .cpu() per batch is a host sync per batch on CUDA: the count must not grow with the
    # number of batches (the old loop moved 2 (3 with ten crops) tensors per batch).
    torch.manual_seed(0)
    model = alexnet.alexnet(6, width=0.125)
    args = types.SimpleNamespace(img_size=64, channels_last=False, amp=False)
    moves, real_cpu = [], torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: moves.append(
        sys._getframe(1).f_code.co_filename == alexnet.__file__) or real_cpu(t))
    counts = []
    for n_batches in (2, 4):
        loader = [(torch.randn(2, 3, 73, 73), torch.tensor([0, 1]))] * n_batches
        moves.clear()
        r = alexnet.evaluate(model, loader, args, torch.device("cpu"), 6, ten_crop=True)
        assert r["samples"] == 2 * n_batches
        counts.append(sum(moves))
    assert counts[0] == counts[1] <= 3, counts


def test_paper_lrn_runs_in_float32_under_fp16_autocast():
    # --amp on an older GPU autocasts to fp16, where LRN's squares overflow above 255
    # (nn.LocalResponseNorm then divides by inf: zeros). Activations of 1000 here: the paper
    # variant's LRN gives the float32 answer, in the half dtype it was given.
    lrn = alexnet.alexnet(variant="paper", width=0.25).features.norm1
    x = torch.full((1, 8, 3, 3), 1000.0)
    x[:, ::2] = 10.0
    with torch.autocast("cpu", dtype=torch.float16):
        got = lrn(x.half())
    assert got.dtype == torch.float16
    want = torch.nn.functional.local_response_norm(x, 5, 1e-4, 0.75, 2.0)
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=0)


# ---------------------------------------------------------------------------------------------
# The paper variant's ablations: --no-lrn (§3.3), --no-overlap-pool (§3.4), --no-dropout (§4.2)

SWITCHES = [{}, {"lrn": False}, {"overlap_pool": False}, {"dropout": False},
            {"lrn": False, "overlap_pool": False, "dropout": False}]


def names(m):
    return list(m.features._modules), list(m.classifier._modules)


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(s) or "paper")
def test_each_switch_removes_or_changes_its_layers_only(switches):
    full = alexnet.alexnet(variant="paper", width=0.25)
    m = alexnet.alexnet(variant="paper", width=0.25, **switches)
    features, classifier = names(full)
    lrn, overlap, dropout = (switches.get(k, True) for k in ("lrn", "overlap_pool", "dropout"))
    assert names(m) == ([k for k in features if lrn or k not in ("norm1", "norm2")],
                        [k for k in classifier if dropout or k not in ("drop6", "drop7")])
    assert sum(isinstance(x, data.LocalResponseNorm) for x in m.modules()) == (2 if lrn else 0)
    assert sum(isinstance(x, torch.nn.Dropout) for x in m.modules()) == (2 if dropout else 0)
    if dropout:
        assert m.classifier.drop6.p == m.classifier.drop7.p == 0.5  # §4.2
    pools = [m.features.pool1, m.features.pool2, m.features.pool5]
    assert {(p.kernel_size, p.stride) for p in pools} == {(3, 2) if overlap else (2, 2)}
    # none of the three has parameters: the same count, the same names and shapes
    assert alexnet.count_parameters(m) == alexnet.count_parameters(full)
    assert [(k, v.shape) for k, v in m.state_dict().items()] == \
        [(k, v.shape) for k, v in full.state_dict().items()]
    with torch.device("meta"):  # at full width: the paper's 60,965,224
        assert alexnet.count_parameters(alexnet.alexnet(variant="paper", **switches)) \
            == 60_965_224


def test_non_overlapping_pooling_gives_the_same_map_sizes():
    # §3.4: s = 2, z = 2 "produces output of equivalent dimensions": floor((n - z) / s) + 1 on
    # the odd maps of a 224 crop (55, 27, 13 after conv1 with padding 2, conv2, conv5).
    for n, out in ((55, 27), (27, 13), (13, 6)):
        assert (n - 3) // 2 + 1 == (n - 2) // 2 + 1 == out
    assert (56 - 3) // 2 + 1 != (56 - 2) // 2 + 1  # an even map would differ (27 vs 28)
    torch.manual_seed(0)
    overlap = alexnet.alexnet(6, "paper", width=0.125).eval()
    plain = alexnet.alexnet(6, "paper", width=0.125, overlap_pool=False).eval()
    plain.load_state_dict(overlap.state_dict())
    for size in (224, 96, 64):  # the paper's crop, the small sets' upsampled inputs
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            sizes = []
            for m in (overlap, plain):
                h, seen = x, []
                for name, layer in m.features.named_children():
                    h = layer(h)
                    if name.startswith("pool"):
                        seen.append(tuple(h.shape))
                sizes.append(seen)
            assert sizes[0] == sizes[1], size
            assert plain(x).shape == overlap(x).shape == (2, 6)
            assert not torch.allclose(plain(x), overlap(x))  # other windows: other numbers
    assert [s[-1] for s in sizes[0]] == [7, 3, 1]  # 64: 15 -> 7 -> 3 -> 1
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert plain.features(x).shape[-2:] == overlap.features(x).shape[-2:] == (6, 6)


def test_switches_in_the_arch_name_results_and_a_run(tmp_path):
    # A run with all three off: the net built so, the switches in results.json's config, the
    # checkpoint named for them. Two steps of 2 images at width 1/8 (the code path).
    r = alexnet.main(["--data", "shapes", "--variant", "paper", "--no-lrn", "--no-overlap-pool",
                      "--no-dropout", "--width", "0.125", "--img-size", "64", "--dry-run",
                      "--batch-size", "2", "--limit", "8", "--device", "cpu", "--out",
                      str(tmp_path / "run"), "--log-every", "100000"])
    config = r["config"]
    assert (config["lrn"], config["overlap_pool"], config["dropout"]) == (False, False, False)
    assert config["arch"] == "alexnet-paper-no-lrn-no-overlap-pool-no-dropout-w0.125"
    ckpt = data.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"), config["arch"])
    assert not any("norm" in k or "drop" in k for k in ckpt["model"])
    # the default names are unchanged; each switch that is off is named
    ns = types.SimpleNamespace
    assert alexnet.arch_name(ns(variant="paper", width=1.0, lrn=True, overlap_pool=True,
                                dropout=True)) == "alexnet-paper"
    assert alexnet.arch_name(ns(variant="torchvision", width=0.25, lrn=None, overlap_pool=None,
                                dropout=None)) == "alexnet-torchvision-w0.25"
    assert alexnet.arch_name(ns(variant="paper", width=1.0, lrn=True, overlap_pool=False,
                                dropout=True)) == "alexnet-paper-no-overlap-pool"
    # --weights of that checkpoint: its switches are taken from it; one typed against it is an
    # error naming both values
    with pytest.raises(data.DataError, match=re.escape("--lrn contradicts")):
        alexnet.main(["--data", "shapes", "--eval-only", "--weights",
                      str(tmp_path / "run" / "checkpoint.pt"), "--lrn", "--device", "cpu",
                      "--out", str(tmp_path / "e")])


def test_bad_switches_are_one_line_errors(tmp_path):
    ablated = tmp_path / "ablated.pt"
    torch.save({"arch": "alexnet-paper-no-lrn-w0.25", "model": {}}, ablated)
    for argv, message in (
            (["--no-lrn"], "--no-lrn with --variant torchvision: the ablations of §3.3, §3.4 "
             "and §4.2 are the paper variant's (torchvision's AlexNet is a fixed layout without "
             "LRN); add --variant paper or drop --no-lrn"),
            (["--lrn"], "--lrn with --variant torchvision"),
            (["--no-overlap-pool", "--dropout"], "--no-overlap-pool --dropout with --variant "
             "torchvision"),
            (["--variant", "torchvision", "--no-dropout", "--classify", "x.jpg", "--pretrained"],
             "--no-dropout with --variant torchvision"),
            # a checkpoint of another ablation, refused by name
            (["--variant", "paper", "--weights", str(ablated), "--quick", "--limit", "8"],
             "is of 'alexnet-paper-no-lrn-w0.25', not 'alexnet-paper-w0.25'"),
            (["--variant", "paper", "--no-dropout", "--weights", str(ablated), "--quick",
              "--limit", "8"], "not 'alexnet-paper-no-dropout-w0.25'"),
            (["--variant", "paper", "--classify", "x.jpg", "--weights", str(ablated), "--width",
              "0.25", "--no-overlap-pool"], "not 'alexnet-paper-no-overlap-pool-w0.25'")):
        with pytest.raises(data.DataError, match=re.escape(message)) as e:
            alexnet.main(["--data", "shapes", "--device", "cpu", "--out", str(tmp_path / "o"),
                          *argv])
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="the paper variant's"):
        alexnet.alexnet(variant="torchvision", lrn=False)
