"""resnet.py: parameter counts (Table 6, torchvision), the shortcut options A/B/C and the plain
networks (§3.3, Table 3, Fig. 6), the iteration schedule of §4.2, torchvision compatibility, and
main() end to end."""
import json
import os
import re
import types

import pytest
import torch
import torch.nn.functional as F
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
    # §4.2: with option A "our residual models have exactly the same depth, width, and number of
    # parameters as the plain counterparts"
    plain = resnet.resnet(depth, 10, plain=True)
    assert resnet.count_parameters(plain) == n
    assert all(b.plain and b.downsample is None for b in plain.modules()
               if isinstance(b, resnet.BasicBlock))


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


def test_shortcut_options_parameters_by_hand():
    # CIFAR ResNet-20: A has no shortcut parameters (269,722, Table 6's 0.27M); B adds the two
    # projections where the shape changes, 16->32 and 32->64 (1x1 conv + BN's 2 per channel):
    # 16*32 + 64 + 32*64 + 128 = 2,752; C one in each of the 9 blocks: 3 x (16*16 + 32) +
    # (16*32 + 64) + 2 x (32*32 + 64) + (32*64 + 128) + 2 x (64*64 + 128) = 14,240.
    counts = {o: resnet.count_parameters(resnet.resnet(20, 10, shortcut=o)) for o in "ABC"}
    assert counts == {"A": 269722, "B": 269722 + 2752, "C": 269722 + 14240}
    # ResNet-18 (torchvision's is option B: 11,689,512): A drops its three projections
    # 64*128 + 256 + 128*256 + 512 + 256*512 + 1024 = 173,824; C adds the 5 identity blocks'
    # 2 x (64*64 + 128) + (128*128 + 256) + (256*256 + 512) + (512*512 + 1024) = 354,304.
    ref = sum(p.numel() for p in torchvision.models.resnet18(weights=None).parameters())
    counts = {o: resnet.count_parameters(resnet.resnet(18, shortcut=o)) for o in "ABC"}
    assert counts == {"A": ref - 173824, "B": ref, "C": ref + 354304}
    # plain nets have the parameters of option A's network (Table 2's plain-18 and ResNet-18)
    assert resnet.count_parameters(resnet.resnet(18, plain=True)) == counts["A"]


@pytest.mark.parametrize("depth", [20, 18, 50])
def test_option_c_has_a_projection_in_every_block_and_b_only_where_the_shape_changes(depth):
    kinds, counts = {}, {}
    for option in "ABC":
        m = resnet.resnet(depth, 10, shortcut=option)
        blocks = [b for b in m.modules() if isinstance(b, (resnet.BasicBlock, resnet.Bottleneck))]
        changes = [max(b.conv1.stride + b.conv2.stride) != 1 or b.conv1.in_channels !=
                   (b.conv3 if isinstance(b, resnet.Bottleneck) else b.conv2).out_channels
                   for b in blocks]  # the block's shape changes: stride 2 or more channels
        kinds[option] = [type(b.downsample).__name__ for b in blocks]
        assert sum(changes) == {20: 2, 18: 3, 50: 4}[depth]  # 50: also 64 -> 256 at conv2_1
        assert kinds[option] == [
            {"A": "ShortcutA" if c else "NoneType", "B": "Sequential" if c else "NoneType",
             "C": "Sequential"}[option] for c in changes]
        counts[option] = resnet.count_parameters(m)
    assert counts["A"] < counts["B"] < counts["C"]


def test_forward_shapes_of_every_option_and_the_plain_networks():
    with torch.no_grad():
        for kw in ({"plain": True}, {"shortcut": "B"}, {"shortcut": "C"}):
            assert resnet.resnet(20, 10, **kw).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        x = torch.randn(1, 3, 64, 64)  # ImageNet nets on a small input: 2x2 maps at conv5
        for depth, kw in ((18, {"plain": True}), (18, {"shortcut": "C"}), (50, {"shortcut": "A"})):
            assert resnet.resnet(depth, 7, **kw).eval()(x).shape == (1, 7)
    with pytest.raises(ValueError, match="a plain network has no shortcuts"):
        resnet.resnet(20, plain=True, shortcut="A")


def random_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2),
                                  (m.running_mean, -0.1, 0.1), (m.running_var, 0.5, 1.5)):
                    t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=g))
    return module.eval()


def branch_by_hand(b, x):
    """relu(bn2(conv2(relu(bn1(conv1(x)))))) without the block's forward: the residual branch."""
    def bn(m, h):
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    h = F.relu(bn(b.bn1, F.conv2d(x, b.conv1.weight, stride=b.conv1.stride, padding=1)))
    return bn(b.bn2, F.conv2d(h, b.conv2.weight, padding=1))


def test_a_plain_block_outputs_its_residual_branch_alone():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    for stride, cout in ((1, 8), (2, 16)):  # a plain block changes the shape with no shortcut
        plain = random_bn(resnet.BasicBlock(8, cout, stride, plain=True))
        with torch.no_grad():
            assert torch.allclose(plain(x), F.relu(branch_by_hand(plain, x)), atol=1e-6)
    # the same weights with the identity shortcut: relu(branch + x)
    res = random_bn(resnet.BasicBlock(8, 8))
    plain = resnet.BasicBlock(8, 8, plain=True).eval()
    plain.load_state_dict(res.state_dict())
    with torch.no_grad():
        assert torch.allclose(res(x), F.relu(branch_by_hand(res, x) + x), atol=1e-6)
        assert torch.allclose(plain(x), F.relu(branch_by_hand(res, x)), atol=1e-6)
        assert not torch.allclose(plain(x), res(x))
    # the bottleneck's plain block: relu(bn3(conv3(...))) with no identity added
    bott = random_bn(resnet.Bottleneck(16, 4, plain=True))
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        h = bott.relu(bott.bn2(bott.conv2(bott.relu(bott.bn1(bott.conv1(x))))))
        assert torch.equal(bott(x), F.relu(bott.bn3(bott.conv3(h))))


def test_option_a_in_a_block_is_the_strided_input_zero_padded_in_channels():
    x = torch.arange(32, dtype=torch.float32).view(1, 2, 4, 4)
    y = resnet.ShortcutA(2, 4, 2)(x)
    expected = torch.tensor([[[[0., 2.], [8., 10.]], [[16., 18.], [24., 26.]],
                              [[0., 0.], [0., 0.]], [[0., 0.], [0., 0.]]]])
    assert torch.equal(y, expected)
    # inside a block: relu(branch(x) + that shortcut); ResNet-18's option A pads 64 -> 128
    b = random_bn(resnet.resnet(20, shortcut="A").layer2[0])
    x = torch.randn(2, 16, 8, 8)
    sc = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 4, 4)], 1)
    with torch.no_grad():
        assert torch.allclose(b(x), F.relu(branch_by_hand(b, x) + sc), atol=1e-6)
    assert isinstance(resnet.resnet(18, shortcut="A").layer2[0].downsample, resnet.ShortcutA)


def test_arch_names_and_paper_figures_of_each_configuration():
    def name(depth, shortcut=None, plain=False):
        args = types.SimpleNamespace(depth=depth, plain=plain, shortcut=shortcut)
        if not plain:
            args.shortcut = shortcut or resnet.default_shortcut(depth)
        return resnet.arch_name(args)
    # the defaults keep the names of older checkpoints
    assert (name(20), name(20, "A"), name(50), name(50, "B")) == \
        ("resnet20", "resnet20", "resnet50", "resnet50")
    assert (name(20, "C"), name(34, "A"), name(20, plain=True), name(34, plain=True)) == \
        ("resnet20-C", "resnet34-A", "plain20", "plain34")
    f = resnet.paper_figures
    assert (f(34, "A")["test_error"], f(34)["test_error"], f(34, "C")["top5_error"]) == \
        (0.2503, 0.2452, 0.0740)  # Table 3
    assert (f(18, plain=True)["test_error"], f(34, plain=True)["top5_error"]) == (0.2794, 0.1002)
    assert "test_error" not in f(20, plain=True) and "test_error" not in f(20, "B")
    assert f(56)["test_error"] == 0.0697


def test_training_error_is_the_running_error_of_the_trained_batches():
    # lr 0: the weights stay the identity, so the predictions are the inputs' argmax: batch 1
    # predicts 0, 1, 2, 0 for labels 0, 1, 1, 1 (2 wrong), batch 2 predicts 2, 2 for 2, 0 (1
    # wrong): 3 of 6.
    model = torch.nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    e = torch.eye(3)
    loader = [(e[[0, 1, 2, 0]], torch.tensor([0, 1, 1, 1])), (e[[2, 2]], torch.tensor([2, 0]))]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    args = types.SimpleNamespace(channels_last=False, amp=False, world=1)
    progress = resnet.metrics.Progress(2, 1, enabled=False)
    cpu = torch.device("cpu")
    loss, error = resnet.train_one_epoch(model, loader, opt, sched, data.grad_scaler(cpu, False),
                                         args, cpu, 0, progress, 2)
    assert error == 0.5 and loss > 0


def test_plain_and_shortcut_flags_that_cannot_combine_are_one_line_errors(tmp_path, capsys):
    for argv, flags in ((["--plain", "--pretrained", "--depth", "18"], ("--plain", "--pretrained")),
                        (["--plain", "--shortcut", "b"], ("--plain", "--shortcut B")),
                        (["--shortcut", "C", "--depth", "34", "--pretrained"],
                         ("--shortcut C", "--pretrained")),
                        (["--shortcut", "A", "--depth", "50", "--pretrained", "--eval-only"],
                         ("--shortcut A", "--pretrained"))):
        with pytest.raises(data.DataError, match="cannot combine") as e:
            resnet.main([*argv, "--device", "cpu", "--out", str(tmp_path / "x")])
        assert "\n" not in str(e.value) and all(f in str(e.value) for f in flags), str(e.value)
    assert not (tmp_path / "x").exists()  # refused before any folder or data
    with pytest.raises(SystemExit):
        resnet.main(["--shortcut", "D"])
    assert "--shortcut: invalid choice: 'D'" in capsys.readouterr().err


def test_a_checkpoint_of_another_configuration_is_refused_by_name(tmp_path):
    base = ["--data", "shapes", "--quick", "--device", "cpu"]
    for saved, argv, message in (("plain20", [], "is of 'plain20', not 'resnet20'"),
                                 ("resnet20", ["--plain"], "is of 'resnet20', not 'plain20'"),
                                 ("resnet20", ["--shortcut", "C"], "not 'resnet20-C'"),
                                 ("resnet20-C", ["--shortcut", "A"], "not 'resnet20'")):
        ckpt = tmp_path / f"{saved}.pt"
        torch.save({"arch": saved, "model": {}}, ckpt)
        for extra in ([], ["--eval-only"]):
            with pytest.raises(data.DataError, match=re.escape(message)):
                resnet.main([*base, *argv, *extra, "--weights", str(ckpt),
                             "--out", str(tmp_path / "x")])


def test_plain_run_records_its_curves_and_its_checkpoint_keeps_the_configuration(tmp_path):
    # plain-8 (6n+2, n = 1) for 2 epochs of 4 steps: the history has each epoch's training and
    # test error; --weights then rebuilds the plain network (the same state_dict keys as option
    # A's: only the name and the settings tell them apart), and refuses a contradicting flag
    tiny = ["--depth", "8", "--limit", "128", "--batch-size", "32", "--eval-every", "1"]
    r, out = run(tmp_path, "plain", "--plain", *tiny)
    assert (r["config"]["arch"], r["config"]["shortcut"], r["config"]["plain"]) == \
        ("plain8", None, True)
    assert r["config"]["parameters"] == resnet.count_parameters(resnet.resnet(8, 6))
    assert [sorted(k for k in row if k.endswith("error")) for row in r["history"]] == \
        [["test_error", "train_error"]] * 2
    assert all(0 <= row["train_error"] <= 1 for row in r["history"])
    assert r["history"][-1]["test_error"] == r["metrics"]["test_error"]
    ckpt = os.path.join(out, "checkpoint.pt")
    again, _ = run(tmp_path, "e", "--depth", "8", "--limit", "128", "--eval-only",
                   "--weights", ckpt)
    assert again["config"]["arch"] == "plain8" and again["metrics"] == r["metrics"]
    for flag, said in ((["--no-plain"], "no --plain contradicts"),
                       (["--shortcut", "A"], "--shortcut A contradicts")):
        with pytest.raises(data.DataError, match=re.escape(said) + ".*trained with"):
            run(tmp_path, "f", *tiny, *flag, "--weights", ckpt)


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


def test_fig6_bench_reads_names_draws_dashed_and_bold_curves_and_judges_the_claim(tmp_path):
    # bench/resnet_fig6.py without training: its net names, the verdict on the final training
    # errors, and the PNG (PIL) of made-up curves
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "resnet_fig6", os.path.join(ROOT, "bench", "resnet_fig6.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.net_flags("plain56") == ["--depth", "56", "--plain"]
    assert bench.net_flags("resnet20") == ["--depth", "20"]
    with pytest.raises(data.DataError, match="--nets resnet21"):
        bench.net_flags("resnet21")

    def curve(*train):
        return {"iteration": [62, 124, 186], "train_error": list(train),
                "test_error": [t + 0.1 for t in train]}
    curves = {"plain20": curve(0.6, 0.4, 0.3), "plain56": curve(0.7, 0.5, 0.4),
              "resnet20": curve(0.6, 0.4, 0.3), "resnet56": curve(0.6, 0.4, 0.3)}
    assert [c["holds"] for c in bench.verdict(curves)] == [True, True]  # 0.4 > 0.3; 0.3 <= 0.3
    curves["resnet56"] = curve(0.6, 0.4, 0.31)
    curves["plain56"] = curve(0.7, 0.5, 0.3)
    assert [c["holds"] for c in bench.verdict(curves)] == [False, False]
    from PIL import Image
    path = bench.draw_figure(curves, str(tmp_path / "fig6.png"), "test")
    with Image.open(path) as im:
        assert im.size == (1000, 400)
        rgb = torch.as_tensor(bytearray(im.convert("RGB").tobytes())).view(-1, 3)
    for c in bench.COLOURS.values():  # both depths' curves drawn
        assert (rgb == torch.tensor(c, dtype=torch.uint8)).all(1).any()
