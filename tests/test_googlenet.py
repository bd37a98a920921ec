"""googlenet.py: parameter counts (torchvision, Table 1 by hand, NIN by hand), torchvision
compatibility, output shapes of every variant, the §5 auxiliary loss, the lr schedules and
parameter groups (BVLC's solvers and train_val.prototxt), the §7 144-crop test, and main() end
to end (learning, --eval-only, kill-and-resume, one-line errors)."""
import copy
import json
import math
import os
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import data
import googlenet
from conftest import (command, ddp_results_json, deterministic_step, host_reads, old_kernels,
                      only_the_test_split, refuse_nondeterministic_kernels, shapes_pictures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Table 1: name, input depth, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj, output depth,
# params (K = 1024 weights, biases not counted, as the table's column)
TABLE_1 = [("3a", 192, 64, 96, 128, 16, 32, 32, 256, 159), ("3b", 256, 128, 128, 192, 32, 96, 64, 480, 380),
           ("4a", 480, 192, 96, 208, 16, 48, 64, 512, 364), ("4b", 512, 160, 112, 224, 24, 64, 64, 512, 437),
           ("4c", 512, 128, 128, 256, 24, 64, 64, 512, 463), ("4d", 512, 112, 144, 288, 32, 64, 64, 528, 580),
           ("4e", 528, 256, 160, 320, 32, 128, 128, 832, 840), ("5a", 832, 256, 160, 320, 32, 128, 128, 832, 1072),
           ("5b", 832, 384, 192, 384, 48, 128, 128, 1024, 1388)]


def count(model):
    return sum(p.numel() for p in model.parameters())


def tv_googlenet(aux=True):
    return torchvision.models.googlenet(weights=None, aux_logits=aux, init_weights=True)


def test_parameter_counts_match_torchvision_with_and_without_aux():
    for aux in (True, False):
        ours = googlenet.googlenet(aux_logits=aux)
        assert count(ours) == count(tv_googlenet(aux)) == googlenet.TORCHVISION_PARAMETERS[aux]
    assert googlenet.TORCHVISION_PARAMETERS[False] == \
        torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.meta["num_params"] == 6_624_904


def test_paper_variant_parameter_count_from_table_1():
    conv = lambda k, a, b: k * k * a * b  # noqa: E731  weights of a k x k conv, a -> b maps
    weights = {"conv1": conv(7, 3, 64), "conv2": conv(1, 64, 64) + conv(3, 64, 192)}
    biases = 64 + 64 + 192
    for name, cin, c1, c3r, c3, c5r, c5, pp, out, _ in TABLE_1:
        weights[name] = conv(1, cin, c1) + conv(1, cin, c3r) + conv(3, c3r, c3) + \
            conv(1, cin, c5r) + conv(5, c5r, c5) + conv(1, cin, pp)
        biases += c1 + c3r + c3 + c5r + c5 + pp
        assert c1 + c3 + c5 + pp == out  # the filter concatenation
    weights["linear"], biases = 1024 * 1000, biases + 1000
    # Table 1's params column (K = 1024 weights) sums to the "6.8M" of the text; several of its
    # rows disagree with the layer sizes of the same table (4c: 463K printed, 497.5K computed; 5a:
    # 1072K vs 1018K; conv1: 2.7K vs 9.2K), so the exact count is the one from the layer sizes,
    # within 3 % of the column's total.
    column = [2.7, 112] + [row[-1] for row in TABLE_1] + [1000]
    assert round(sum(column)) == 6798  # the text's "6.8M"
    total = sum(weights.values())
    assert abs(total / 1024 - sum(column)) / sum(column) < 0.03
    ours = googlenet.googlenet(variant="paper", aux_logits=False)
    assert count(ours) == sum(weights.values()) + biases == 6_998_552
    # §5 aux heads: 1x1 conv 128, fc 128*4*4 -> 1024, linear 1024 -> 1000, with biases
    aux = sum(cin * 128 + 128 + 2048 * 1024 + 1024 + 1024 * 1000 + 1000 for cin in (512, 528))
    assert count(googlenet.googlenet(variant="paper")) == count(ours) + aux
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
    assert sum(isinstance(m, data.LocalResponseNorm) for m in ours.modules()) == 2
    k5 = [b.branch3[1].conv.kernel_size for n, b in ours.named_children() if n.startswith("incep")]
    assert set(k5) == {(5, 5)}
    assert set(b.branch3[1].conv.kernel_size for n, b in googlenet.googlenet().named_children()
               if n.startswith("incep")) == {(3, 3)}  # torchvision's quirk, reproduced


def test_torchvision_state_dict_loads_strictly_and_gives_identical_outputs(monkeypatch):
    torch.manual_seed(0)
    ref, ours = tv_googlenet(), googlenet.googlenet()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), ref.eval()(x))
        ref.train(), ours.train()  # batch statistics and the three dropouts, same RNG order
        torch.manual_seed(1)
        a = ref(x)
        torch.manual_seed(1)
        b = ours(x)
        assert all(torch.equal(u, v) for u, v in zip(a, b)) and b._fields == a._fields
        # the aux heads' adaptive 14x14 -> 4x4 pool on the path --deterministic takes on CUDA:
        # torchvision's kernel's outputs within 1e-5
        refuse_nondeterministic_kernels(monkeypatch, googlenet)
        torch.manual_seed(1)
        b = copy.deepcopy(ours)(x)  # a copy: ours' BN statistics stay as ref's
        for u, v in zip(a, b):
            torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-5)
        monkeypatch.undo()
        ours.eval(), ref.eval()
        # what --pretrained switches on, written as torchvision writes it: the same numbers,
        # and no tensor made from Python numbers per forward (on CUDA a host-to-device copy)
        ref.transform_input = ours.transform_input = True
        want = ref(x)
        monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("a tensor per forward"))
        assert torch.equal(ours(x), want)


def test_output_shapes_of_every_variant():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    for variant in ("torchvision", "paper"):
        m = googlenet.googlenet(7, variant=variant, width=0.25).train()
        out = m(x)
        assert isinstance(out, googlenet.GoogLeNetOutputs) and [o.shape for o in out] == [(2, 7)] * 3
        with torch.no_grad():
            assert m.eval()(x).shape == (2, 7)
            small = googlenet.googlenet(6, variant=variant, in_channels=1, width=0.25,
                                        small_input=True).eval()
            assert small(torch.randn(3, 1, 32, 32)).shape == (3, 6)
            assert small.train()(torch.randn(3, 1, 28, 28)).logits.shape == (3, 6)
        noaux = googlenet.googlenet(7, aux_logits=False, variant=variant, width=0.25).train()
        assert noaux(x).shape == (2, 7)  # --no-aux: a plain tensor in training too
    nin = googlenet.googlenet(10, variant="nin")
    assert nin(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    naive = googlenet.googlenet(5, naive=True, width=0.125).train()
    assert [o.shape for o in naive(torch.randn(1, 3, 224, 224))] == [(1, 5)] * 3


def test_paper_aux_pool_is_5x5_stride_3():
    aux = googlenet.InceptionAux(512, 10, bn=False, paper_pool=True)
    f = torch.randn(2, 512, 14, 14)
    seen = {}
    aux.conv.register_forward_hook(lambda mod, i, o: seen.update(x=i[0]))  # returns None
    aux(f)
    assert torch.allclose(seen["x"], F.avg_pool2d(f, 5, 3))  # 14x14 -> 4x4


def test_naive_inception_module():
    naive = googlenet.Inception(192, 64, 96, 128, 16, 32, 32, naive=True)
    reduced = googlenet.Inception(192, 64, 96, 128, 16, 32, 32)
    x = torch.randn(1, 192, 28, 28)
    assert naive(x).shape == (1, 64 + 128 + 32 + 192, 28, 28)  # the pool passes all 192 maps
    assert reduced(x).shape == (1, 256, 28, 28)
    assert count(naive) > count(reduced)
    # no 1x1 reductions and no pool projection
    assert sum(isinstance(m, torch.nn.Conv2d) for m in naive.modules()) == 3
    assert count(googlenet.googlenet(naive=True)) > count(googlenet.googlenet())


def test_nin_has_no_linear_layer_and_its_parameters_by_hand():
    m = googlenet.googlenet(10, variant="nin")
    assert not any(isinstance(x, torch.nn.Linear) for x in m.modules())
    convs = [(5, 3, 192), (1, 192, 160), (1, 160, 96), (5, 96, 192), (1, 192, 192),
             (1, 192, 192), (3, 192, 192), (1, 192, 192), (1, 192, 10)]
    assert count(m) == sum(k * k * a * b + b for k, a, b in convs) == 966_986
    assert isinstance(m.features.relu_cccp6, torch.nn.ReLU)  # as the authors' Caffe model


def test_aux_loss_weighting_known_answer():
    y = torch.tensor([0])
    main = torch.tensor([[2.0, 0.0, 0.0]])   # CE = log(e^2 + 2) - 2
    aux2 = torch.tensor([[0.0, 1.0, 0.0]])   # CE = log(2 + e)
    aux1 = torch.zeros(1, 3)                 # CE = log 3
    want = math.log(math.e ** 2 + 2) - 2 + 0.3 * (math.log(2 + math.e) + math.log(3))
    out = googlenet.GoogLeNetOutputs(main, aux2, aux1)
    assert googlenet.googlenet_loss(out, y).item() == pytest.approx(want, rel=1e-6)
    assert googlenet.googlenet_loss(main, y).item() == pytest.approx(math.log(math.e ** 2 + 2) - 2)
    assert googlenet.googlenet_loss(out, y, 0.0).item() == pytest.approx(math.log(math.e ** 2 + 2) - 2)


def test_crops_144_on_a_known_image():
    torch.manual_seed(0)
    for h, w in ((60, 90), (90, 60)):  # landscape and portrait
        img = torch.rand(3, h, w)
        crops = googlenet.crops_144(img)
        assert crops.shape == (144, 3, 224, 224)
        assert torch.equal(crops[72:], crops[:72].flip(-1))  # the mirror images
        for si, s in enumerate(googlenet.TEST_SCALES):
            x = v2.functional.resize(img, [s], antialias=True)
            long = max(x.shape[-2:])
            assert min(x.shape[-2:]) == s
            for qi, o in enumerate((0, (long - s) // 2, long - s)):
                sq = x[:, :, o:o + s] if w > h else x[:, o:o + s, :]
                i = (si * 3 + qi) * 6
                assert torch.equal(crops[i], sq[:, :224, :224])            # top-left
                assert torch.equal(crops[i + 3], sq[:, s - 224:, s - 224:])  # bottom-right
                c = (s - 224) // 2
                assert torch.allclose(crops[i + 4], sq[:, c:c + 224, c:c + 224])  # centre
                assert torch.allclose(crops[i + 5], v2.functional.resize(sq, [224, 224],
                                                                         antialias=True))
    # a single-colour image gives 144 single-colour crops; the centre crop is 224 x 224
    assert torch.allclose(googlenet.crops_144(torch.full((3, 80, 100), 0.5)), torch.tensor(0.5))
    assert googlenet.centre_crop(torch.rand(3, 300, 400)).shape == (3, 224, 224)


def resolved(*argv):
    args = googlenet.get_args_parser().parse_args(list(argv))
    args.world = 1
    googlenet.resolve_defaults(args)
    return args


def test_lr_schedule_anneals_to_zero_and_keeps_section_6s_step_as_an_option():
    f = googlenet.lr_factor
    # poly (BVLC's quick_solver.prototxt): (1 - t/T)^0.5, to 0 at the end of the run
    assert [f(e, epochs=60) for e in (0, 15, 30, 45, 59.99, 60)] == \
        pytest.approx([1, 0.75 ** 0.5, 0.5 ** 0.5, 0.5, (0.01 / 60) ** 0.5, 0])
    # step (§6; BVLC's solver.prototxt): x 0.96 at whole multiples of 8 epochs
    assert [f(e, "step") for e in (0, 7.99, 8, 15, 16, 40)] == \
        pytest.approx([1, 1, 0.96, 0.96, 0.96 ** 2, 0.96 ** 5])
    # the warm-up: linear from warmup_from to 1, times the schedule
    assert [f(e, warmup=5, warmup_from=0.125) for e in (0, 2.5, 5)] == \
        pytest.approx([0.125, 0.5625 * (57.5 / 60) ** 0.5, (55 / 60) ** 0.5])
    # NIN: / 10 at whole epochs, per iteration as before per epoch
    assert [f(e, steps=(150, 225)) for e in (0, 149.99, 150, 225)] == \
        pytest.approx([1, 1, 0.1, 0.01])


def test_default_recipes_batch_lr_and_the_lr_at_given_iterations():
    n = 5005  # iterations an epoch: ImageNet's 1,281,167 images at batch 256

    def lrs(args, epochs, per_epoch=n):  # the scheduler's lr at these (fractional) epochs
        lam = googlenet.lr_lambda(args, per_epoch)
        return [args.lr * lam(round(e * per_epoch)) for e in epochs]
    # --variant torchvision (BN): 0.1 at 256, poly over 60 epochs, no warm-up
    args = resolved()
    assert (args.data, args.batch_size, args.lr, args.momentum, args.test_crops) == \
        ("imagenet", 256, 0.1, 0.9, 144)
    assert (args.lr_schedule, args.epochs, args.warmup_epochs) == ("poly", 60, 0)
    start, middle, last = lrs(args, (0, 30, 60 - 1 / n))
    assert (start, middle) == pytest.approx((0.1, 0.1 * 0.5 ** 0.5)) and 0 < last < 2e-4
    # --variant paper (no BN): BVLC's 0.01 per 32 images, 0.08 at 256, warmed up from 0.01
    args = resolved("--variant", "paper")
    assert (args.batch_size, args.lr, args.epochs, args.warmup_epochs) == \
        (256, pytest.approx(0.08), 60, 5)
    assert lrs(args, (0, 2, 5, 30)) == pytest.approx(
        [0.01, 0.08 * 0.475 * (58 / 60) ** 0.5, 0.08 * (55 / 60) ** 0.5, 0.08 * 0.5 ** 0.5])
    assert 0 < lrs(args, [60 - 1 / n])[0] < 2e-4
    # at batch 32 it is quick_solver.prototxt itself: lr 0.01, no warm-up, half of its
    # max_iter 2.4M at 30 epochs of 40,000 iterations
    args = resolved("--variant", "paper", "--batch-size", "32")
    assert (args.lr, args.warmup_epochs) == (0.01, 0)
    assert args.lr * googlenet.lr_lambda(args, 40_000)(1_200_000) == pytest.approx(0.01 * 0.5 ** 0.5)
    # --epochs rescales poly; --lr-schedule step: §6's x 0.96 every 8 epochs, BVLC's 250 epochs
    assert lrs(resolved("--epochs", "30"), (15,)) == pytest.approx([0.1 * 0.5 ** 0.5])
    args = resolved("--lr-schedule", "step")
    assert args.epochs == 250 and lrs(args, (0, 8, 248)) == pytest.approx(
        [0.1, 0.096, 0.1 * 0.96 ** 31])
    # NIN keeps its own schedule and refuses GoogLeNet's flags
    args = resolved("--variant", "nin")
    assert (args.data, args.batch_size, args.lr_steps, args.weight_decay, args.no_aux,
            args.lr_schedule) == ("cifar10", 128, [150, 225], 1e-4, True, None)
    with pytest.raises(data.DataError, match="GoogLeNet's"):
        resolved("--variant", "nin", "--lr-schedule", "step")


def test_lr_schedule_resumes_exactly_mid_run(tmp_path):
    # The per-iteration factor through the checkpoint code main uses: 3 iterations an epoch,
    # the warm-up and poly across the cut after epoch 1 give the same lrs as a run not cut.
    args = resolved("--variant", "paper", "--epochs", "3", "--warmup-epochs", "1.5")

    def make():
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(data.caffe_param_groups(model, args.lr, 2e-4), lr=args.lr)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, googlenet.lr_lambda(args, 3))

    def steps(opt, sched, k):
        out = []
        for _ in range(k):
            out.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        return out
    _, opt, sched = make()
    whole = steps(opt, sched, 9)
    model, opt, sched = make()
    first = steps(opt, sched, 3)
    scaler = data.grad_scaler(torch.device("cpu"), False)
    path = str(tmp_path / "c.pt")
    data.save_training_state(path, "x", model, opt, sched, scaler, 0, {}, [])
    model, opt, sched = make()
    assert data.resume_training_state(path, "x", model, opt, sched, scaler)[0] == 1
    assert first + steps(opt, sched, 6) == whole
    assert whole[0][0] == pytest.approx(0.01) and whole[-1][0] == pytest.approx(
        0.08 * (1 / 9) ** 0.5)


def test_parameter_groups_bn_at_the_lr_undecayed_biases_at_twice_the_lr():
    # BVLC's train_val.prototxt: weights at the lr with decay, biases lr_mult 2, decay_mult 0;
    # torchvision's BN (no Caffe rate to follow): scale and shift both at the lr, no decay
    tv = googlenet.googlenet(10, variant="torchvision", width=0.125)
    paper = googlenet.googlenet(10, variant="paper", width=0.125)

    def setting(model, p):
        [g] = [g for g in data.caffe_param_groups(model, 0.1, 2e-4)
               if any(q is p for q in g["params"])]
        return g["lr"], g["weight_decay"]
    assert setting(tv, tv.inception4a.branch1.bn.weight) == (0.1, 0.0)
    assert setting(tv, tv.inception4a.branch1.bn.bias) == (0.1, 0.0)
    assert setting(tv, tv.inception4a.branch1.conv.weight) == (0.1, 2e-4)
    assert setting(tv, tv.fc.weight) == (0.1, 2e-4) and setting(tv, tv.fc.bias) == (0.2, 0.0)
    assert setting(paper, paper.inception4a.branch1.conv.weight) == (0.1, 2e-4)
    assert setting(paper, paper.inception4a.branch1.conv.bias) == (0.2, 0.0)
    for model in (tv, paper):  # every parameter in exactly one group
        groups = data.caffe_param_groups(model, 0.1, 2e-4)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(data.caffe_param_groups(paper, 0.1, 2e-4)) == 2  # no BN: no third group


def run(tmp_path, name, *extra):
    # the tests' own budget (2 epochs, batch 256) unless extra says otherwise (the last flag
    # wins), not --quick's
    out = str(tmp_path / name)
    return googlenet.main(["--data", "shapes", "--quick", "--batch-size", "256", "--epochs", "2", "--device", "cpu", "--out", out,
                           "--log-every", "100000", *extra]), out


@pytest.mark.slow
def test_overfits_one_fixed_batch_with_the_auxiliary_losses():
    # The learning check that fits in CPU-test time: 40 SGD steps on one batch of 16 shapes
    # images bring the §5 loss (main + 0.3 x two auxiliaries) down by a factor of 3. (A --quick
    # run on the shapes set stays at chance in the few epochs a test can afford: see the README.)
    torch.manual_seed(0)
    x, y, _ = data.classification_arrays("shapes", "train", quick=True, size=32)
    x = (x[:16].float() / 255 - 0.5) / 0.25
    y = y[:16]
    m = googlenet.googlenet(6, variant="torchvision", width=0.125, small_input=True).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = googlenet.googlenet_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::5]


def test_quick_run_writes_results_and_eval_only_reproduces_them(tmp_path, monkeypatch):
    results, out = run(tmp_path, "a", "--epochs", "1", "--width", "0.125")
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert set(saved["per_class_error"]) == set(data.SHAPES_CLASSES)
    assert saved["confusion"]["classes"] == list(data.SHAPES_CLASSES)
    # --classify: a folder of the user's images through that checkpoint, no data set read
    only_the_test_split(monkeypatch)
    monkeypatch.setattr(data, "classification_loaders", None)
    rows = googlenet.main(["--classify", shapes_pictures(tmp_path / "mine"), "--weights",
                           os.path.join(out, "checkpoint.pt"), "--device", "cpu", "--out",
                           str(tmp_path / "p")])
    assert [len(r["found"]) for r in rows] == [5, 5]
    assert {f["class"] for f in rows[0]["found"]} <= set(data.SHAPES_CLASSES)
    assert (tmp_path / "p" / "predictions.csv").is_file()
    assert (tmp_path / "p" / "s1_classes.png").is_file()
    monkeypatch.undo()
    assert saved["metrics"] == results["metrics"] and saved["script"] == "googlenet.py"
    assert set(saved["metrics"]) == {"test_error", "test_accuracy", "balanced_error",
                                     "single_crop_error"}  # 6 classes: no top-5
    assert saved["paper"]["top5_error"] == 0.0789 and len(saved["history"]) == 1
    assert saved["history"][0]["train_loss"] > 0 and saved["config"]["aux_weight"] == 0.3
    only_the_test_split(monkeypatch)  # the checkpoint's normalisation: no training image read
    again, _ = run(tmp_path, "b", "--width", "0.125", "--eval-only", "--weights",
                   os.path.join(out, "checkpoint.pt"))
    assert again["metrics"] == results["metrics"]
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 500}
    assert again["config"]["normalisation"] == results["config"]["normalisation"]


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    # NIN (same checkpoint code path, a fraction of the time); --polyak: the EMA is resumed too;
    # --eval-every 2: the test split (the EMA, as the final test) after epoch 2 only
    tiny = ["--variant", "nin", "--data", "shapes", "--width", "0.125", "--batch-size", "128",
            "--lr-steps", "1", "--polyak", "0.9", "--limit", "512", "--eval-every", "2"]
    full, out_full = run(tmp_path, "full", "--epochs", "2", *tiny)
    run(tmp_path, "cut", "--epochs", "1", *tiny)  # "killed" after epoch 1
    resumed, out_cut = run(tmp_path, "cut", "--epochs", "2", "--resume", *tiny)
    assert resumed["history"] == full["history"] and [r["lr"] for r in full["history"]] == \
        pytest.approx([0.05, 0.005])  # the lr (quick NIN's) of each epoch's last step
    assert resumed["metrics"] == full["metrics"]
    assert ["test_error" in row for row in full["history"]] == [False, True]
    assert full["history"][-1]["test_error"] == full["metrics"]["test_error"]  # the final test
    a = torch.load(os.path.join(out_full, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(out_cut, "checkpoint.pt"), weights_only=True)
    for k in ("model", "ema"):
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])
    # NIN's --eval-only: the checkpoint's network (and EMA) and normalisation, the test split alone
    only_the_test_split(monkeypatch)
    again, _ = run(tmp_path, "e", "--eval-only", "--weights",
                   os.path.join(out_full, "checkpoint.pt"), *tiny)
    assert again["metrics"] == full["metrics"]
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 500}
    # NIN's --classify: the checkpoint's EMA (the tested weights) on the user's images
    model = googlenet.googlenet(6, variant="nin", width=0.125)
    ema = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    ema.load_state_dict(a["ema"])
    x = data.test_input(data.load_image(shapes_pictures(tmp_path / "mine") + "/s0.png"),
                        *a["normalisation"], *a["input_shape"])
    best = data.SHAPES_CLASSES[ema.module.eval()(x).argmax()]
    rows = googlenet.main(["--classify", str(tmp_path / "mine"), "--weights",
                           os.path.join(out_full, "checkpoint.pt"), "--device", "cpu", "--out",
                           str(tmp_path / "p")])
    assert len(rows) == 2 and rows[0]["found"][0]["class"] == best


def test_folder_of_the_users_own_images_is_accepted_as_a_small_set():
    # --data folder:DIR (read like cifar10-jpg, held at 32x32; a whole run costs > 3 s here: the
    # reading itself is tested with lenet5.py): GoogLeNet and NIN take it at its own size
    assert "folder:DIR" in googlenet.get_args_parser().format_help()
    for variant in ("torchvision", "nin"):
        args = googlenet.get_args_parser().parse_args(["--data", "folder:/x", "--variant",
                                                       variant])
        googlenet.resolve_defaults(args)
        assert (args.img_size, args.test_crops) == (None, 1)
    with pytest.raises(data.DataError, match="--img-size applies to imagenet and shapes"):
        googlenet.resolve_defaults(googlenet.get_args_parser().parse_args(
            ["--data", "folder:/x", "--img-size", "64"]))


def test_bad_input_is_a_one_line_error():
    for argv, message in ((["--data", "voc"], "'voc' is a detection data set"),
                          (["--data", "shapes", "--weights", "/nonexistent.pt", "--quick"],
                           "checkpoint /nonexistent.pt not found")):
        with pytest.raises((data.DataError, ValueError), match=re.escape(message)) as e:
            googlenet.main(["--device", "cpu", *argv])
        assert "\n" not in str(e.value)
    # The script's own guard: the same error as one line on stderr, a non-zero exit.
    r = command("googlenet.py", ["--device", "cpu", "--data", "nope"])
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("googlenet.py: error: ") and "unknown data set 'nope'" in r.stderr


DDP_ARGS = ["--epochs", "1", "--width", "0.125", "--batch-size", "64", "--limit", "512"]


@pytest.mark.ddp("googlenet", "googlenet", ["--data", "shapes", "--quick", "--device", "cpu",
                                *DDP_ARGS,
                                "--log-every", "100000"])
def test_two_gloo_processes_agree_with_one_process(tmp_path, ddp_runs):
    # BatchNorm statistics are per process (SyncBatchNorm needs a GPU): close, not identical.
    single, _ = run(tmp_path, "one", *DDP_ARGS)
    double = ddp_results_json(ddp_runs, "googlenet")
    assert double["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"],
                                                               rel=0.03)


def test_at_init_output_depends_on_input_and_eval_mode_follows_training():
    # At torchvision's trunc_normal(0.01) under BN the eval-mode output was constant (spread 0.0)
    # and after these 40 steps the eval-mode loss 0.96 against 0.04 in training mode (stale BN
    # statistics); at He init (0.35; 0.89 against 0.83).
    from conftest import assert_learns_in_eval_mode, shapes_batch
    x, y = shapes_batch(16, 16)
    torch.manual_seed(0)
    model = googlenet.googlenet(6, True, "torchvision", 3, width=0.125, small_input=True)
    assert_learns_in_eval_mode(model, x, y, 40, 0.01, 0.6)


def test_nin_at_the_released_init_depends_on_input_and_learns_at_the_released_rates():
    # PyTorch's default init: spread 0.003 at init and 0.0004 after these 40 steps at lr 0.1
    # (loss 1.72 of ln 6 = 1.79); the released init: 0.30, and the loss falls to 1.38.
    from conftest import assert_learns_in_eval_mode, shapes_batch
    x, y = shapes_batch(16, 32)
    torch.manual_seed(0)
    model = googlenet.googlenet(6, False, "nin", 3, width=0.25)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(float(c.bias.detach().abs().max()) == 0 for c in convs)
    assert abs(float(convs[1].weight.detach().std()) - 0.05 * 2) < 0.01  # cccp1: 0.05 x sqrt(192 / 48)
    groups = model.param_groups(0.1, 1e-4)
    assert [g["lr"] for g in groups[-2:]] == pytest.approx([0.01, 0.02])  # cccp6: 0.1x
    assert groups[1]["lr"] == pytest.approx(0.2) and groups[1]["weight_decay"] == 0  # biases
    assert_learns_in_eval_mode(model, x, y, 40, 0.1, 0.85, params=groups)


def test_polyak_averaging_is_on_for_imagenet_and_off_for_short_runs():
    def polyak(*argv):
        args = googlenet.get_args_parser().parse_args(list(argv))
        args.world = 1
        googlenet.resolve_defaults(args)
        return args.polyak
    assert polyak("--data", "imagenet") == googlenet.POLYAK == 0.9999  # §6: the final model
    assert polyak("--data", "shapes") == 0.0 and polyak("--variant", "nin") == 0.0
    assert polyak("--data", "shapes", "--polyak", "0.9") == 0.9
    with pytest.raises(googlenet.data.DataError, match="decay must be in"):
        polyak("--data", "shapes", "--polyak", "1.5")


def test_dry_run_takes_two_steps_checks_the_checkpoint_and_writes_results(tmp_path, capsys):
    # The paper's settings (the torchvision layout at full width with both auxiliary heads, lr
    # 0.1, 60 epochs cut to 1 of 2 steps, the batch cut to 2) on shapes; the test is 2 batches of
    # 250. Two departures for CPU-test time, neither in the network: --img-size 16 (--quick's)
    # instead of 32, since 500 test images at 32x32 through the full-width net cost ~4x as much,
    # and --limit 600, since rendering the whole set (12,000 images) would take longer than the
    # run; 600 test images still show the cut to 500.
    out = tmp_path / "dry"
    results = googlenet.main(["--data", "shapes", "--device", "cpu", "--dry-run", "--batch-size",
                              "2", "--img-size", "16", "--limit", "600", "--out", str(out),
                              "--log-every", "1"])
    said = capsys.readouterr().out
    assert re.findall(r"^epoch 1/1 step (\d+)/(\d+) ", said, re.M) == [("1", "2"), ("2", "2")]
    assert re.search(r"^test_error .* \(\d+/500, 1 crop\(s\)\)", said, re.M)  # 2 batches of 250
    config = results["config"]
    assert config["dry_run"] is True and config["epochs"] == 1 and config["sizes"]["test"] == 600
    assert (config["arch"], config["width"], config["lr"]) == ("googlenet", 1.0, 0.1)
    state = data.load_checkpoint(str(out / "checkpoint.pt"), "googlenet")
    assert state["epoch"] == 0 and len(state["history"]) == 1
    # main's optimizer: weights, biases (2x, undecayed), BN's scale and shift (1x, undecayed);
    # poly over the run's 2 steps: lr 0.1, then 0.1 x 0.5^0.5, 0 after the last
    groups = state["optimizer"]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == \
        [(0.1, 2e-4), (0.2, 0.0), (0.1, 0.0)]
    bn = [m for m in googlenet.googlenet(6).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(groups[2]["params"]) == 2 * len(bn)
    assert re.findall(r"^epoch 1/1 step \d+/2 .* lr ([\d.e-]+)", said, re.M) == ["0.1", "0.0707"]
    assert state["history"][0]["lr"] == pytest.approx(0.1 * 0.5 ** 0.5)  # its last step's
    assert state["scheduler"]["last_epoch"] == 2  # per iteration
    assert json.loads((out / "results.json").read_text())["config"]["dry_run"] is True


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU, checked on this CPU: --deterministic, host syncs, --amp

@pytest.mark.parametrize("variant, naive, size", [
    ("torchvision", False, 16), ("torchvision", False, 224), ("paper", False, 16),
    ("paper", False, 224), ("torchvision", True, 16), ("nin", False, 32)])
def test_deterministic_cuda_path_trains_and_gives_the_old_numbers(variant, naive, size,
                                                                   monkeypatch):
    # 16 (shapes at --quick, small_input): 4a's 8x8 maps go to the aux heads' 4x4 by
    # torchvision's adaptive pool, or by §5's 5x5/3 (2x2) then the adaptive pool up to 4x4 (paper
    # variant): real adaptive pools, whose CUDA backward has no deterministic kernel. 224: the
    # paper's 14x14 maps, adaptively pooled (torchvision) or 5x5/3 (paper, 4x4: no adaptive pool
    # left). The paper variant's LRN and the global average pools (NIN's too) at every size. The
    # old code raised at the first step here; the new one gives the old kernels' outputs and
    # gradients within 1e-5.
    torch.manual_seed(0)
    model = googlenet.googlenet(6, True, variant, 3, naive, width=0.125,
                                small_input=size < 224)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 5])
    want, want_grads = deterministic_step(old_kernels(model), x, y, deterministic=False,
                                          loss_fn=googlenet.googlenet_loss)
    refuse_nondeterministic_kernels(monkeypatch, googlenet)
    got, grads = deterministic_step(model, x, y, loss_fn=googlenet.googlenet_loss)
    assert len(got) == (1 if variant == "nin" else 3)  # the two aux heads trained too
    for g, w in zip(got + grads, want + want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def polyak_average(model, decay):
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)


def test_train_one_epoch_reads_no_loss_back_per_step(monkeypatch):
    # Batches of 3, 2 and 3 images with both aux heads and --polyak: the epoch's loss is
    # Progress's mean weighted by each step's samples. The old loop read every loss with
    # .item() and updated the EMA through AveragedModel.update_parameters, which copies its CPU
    # step count to the device at every step (on CUDA both are host syncs).
    torch.manual_seed(0)
    model = googlenet.googlenet(6, True, "torchvision", 3, width=0.125, small_input=True)
    ema = polyak_average(model, 0.9)
    batches = [(torch.randn(n, 3, 16, 16), torch.randint(0, 6, (n,))) for n in (3, 2, 3)]
    args = types.SimpleNamespace(aux_weight=0.3, polyak=0.9, channels_last=False, amp=False,
                                 world=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = data.grad_scaler(torch.device("cpu"), False)
    progress = googlenet.metrics.Progress(3, 1, every=1000, enabled=False, model=model)
    seen, real_step = [], progress.step
    monkeypatch.setattr(progress, "step", lambda images, loss, lr, epoch, n=None:
                        seen.append((loss, n)) or real_step(images, loss, lr, epoch, n))
    monkeypatch.setattr(torch.optim.swa_utils.AveragedModel, "update_parameters",
                        lambda *a: pytest.fail("a host sync per step (its step count's copy)"))
    reads = host_reads(monkeypatch, googlenet)
    mean = googlenet.train_one_epoch(model, batches, optimizer, scaler, args, torch.device("cpu"),
                                     0, progress, ema, model)
    assert reads == []
    assert all(isinstance(loss, torch.Tensor) for loss, _ in seen) and [n for _, n in seen] == \
        [3, 2, 3]
    assert mean == pytest.approx(sum(float(l.detach()) * n for l, n in seen) / 8, rel=1e-6)
    assert int(ema.n_averaged) == 3


def test_polyak_update_equals_averaged_models_exponential_average():
    # torch's AveragedModel.update_parameters with get_ema_multi_avg_fn: the first update copies
    # the model, then W_ema <- 0.9 W_ema + 0.1 W for every parameter and BN statistic. Integer
    # buffers (BN's batch count) take the model's, where AveragedModel's truncated average of
    # counts stays at 1 (int(0.9 x 1 + 0.1 x 3)).
    torch.manual_seed(0)
    model = googlenet.googlenet(6, True, "torchvision", 3, width=0.125, small_input=True)
    ours, torchs = polyak_average(model, 0.9), polyak_average(model, 0.9)
    for _ in range(3):
        with torch.no_grad():
            model.train()(torch.randn(2, 3, 16, 16))  # new BN statistics
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        googlenet.polyak_update(ours, model, 0.9)
        torchs.update_parameters(model)
    a, b = ours.state_dict(), torchs.state_dict()
    assert a.keys() == b.keys() and int(a["n_averaged"]) == 3
    for k in a:
        if a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        elif k.endswith("num_batches_tracked"):
            assert int(a[k]) == 3 and int(b[k]) == 1
    assert not torch.equal(a["module.fc.weight"], model.fc.weight)  # an average, not a copy


@pytest.mark.parametrize("imagenet", [False, True])
def test_evaluate_moves_its_outputs_to_the_cpu_once_not_per_batch(monkeypatch, imagenet):
    # A .cpu() per batch is a host sync per batch on CUDA: the count must not grow with the
    # number of batches (the old loop moved each batch's labels). ImageNet's whole images, a
    # list per batch: the ten-crop test (144 crops cost 14x more here, the same code path).
    torch.manual_seed(0)
    model = googlenet.googlenet(6, True, "torchvision", 3, width=0.125, small_input=not imagenet)
    args = types.SimpleNamespace(img_size=224, amp=False)
    moves, real_cpu = [], torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: moves.append(
        sys._getframe(1).f_code.co_filename == googlenet.__file__) or real_cpu(t))
    counts = []
    for n_batches in (1, 2):
        x = [torch.randn(3, 256, 300), torch.randn(3, 280, 256)] if imagenet else \
            torch.randn(2, 3, 16, 16)
        loader = [(x, torch.tensor([0, 1]))] * n_batches
        moves.clear()
        r = googlenet.evaluate(model, loader, args, torch.device("cpu"), 6,
                               crops=10 if imagenet else 1)
        assert r["samples"] == 2 * n_batches
        counts.append(sum(moves))
    assert counts[0] == counts[1] <= 3, counts


def test_paper_lrn_runs_in_float32_under_fp16_autocast():
    # --amp on an older GPU autocasts to fp16, where LRN's squares overflow above 255
    # (nn.LocalResponseNorm then divides by inf: zeros). Activations of 1000 here: the paper
    # variant's LRN gives the float32 answer, in the half dtype it was given.
    model = googlenet.googlenet(6, variant="paper", width=0.125)
    x = torch.full((1, 8, 3, 3), 1000.0)
    x[:, ::2] = 10.0
    for lrn in (model.norm1, model.norm2):
        with torch.autocast("cpu", dtype=torch.float16):
            got = lrn(x.half())
        assert got.dtype == torch.float16
        want = torch.nn.functional.local_response_norm(x, 5, 1e-4, 0.75, 1.0)
        torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=0)
