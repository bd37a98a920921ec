"""overfeat.py: convolutionize (§3.3's FC layers as convolutions), parameter counts of Tables 1
and 3, torchvision's AlexNet layout, offset max-pooling and dense evaluation, each variant's
Table 2 row and scales, the regression targets, field-of-view rule and greedy merge of §4, §4.2
on ImageNet's files (a classification checkpoint, its network frozen, the regressor alone trained
on training images read a batch at a time) and main() end to end; detection (§5): training
windows and hard negatives, dense box decoding, the real VOC and ImageNet box files (tiny, written
here), --detect, resume; 2 torchrun processes against 1; and --dry-run of classification and of
detection. What a
GPU box needs, checked on the CPU: no host sync in a training step (OnDevice stand-ins log every
read), the scenes on the host and each rank's share alone, exact chunked statistics, no kernel
without a deterministic CUDA backward, no cuDNN autotuning in the dense tests."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import overfeat
from conftest import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 0.0625  # --width for shape tests at the paper's input sizes


T = torch.Tensor
HOST_READS = {T.item, T.tolist, T.__float__, T.__int__, T.__bool__, T.__index__, T.cpu, T.numpy,
              T.nonzero}


class OnDevice(torch.Tensor):
    """A CPU tensor standing in for one on a GPU, so that a CPU test sees the host syncs: every
    read of its values by the host (.item(), .tolist(), float(), int(), bool(), .cpu(), .numpy(),
    .nonzero(), a boolean index) is logged in `reads`; what is computed from it stays OnDevice;
    .cpu() gives a plain tensor, as a copy to the host does. (Tensors that factories make with
    device=t.device are plain: what is computed from them alone is not followed.)"""
    reads = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_cpu = func is T.to and "cpu" in [str(a) for a in (*args[1:], *kwargs.values())]
        if func in HOST_READS or to_cpu:
            cls.reads.append(getattr(func, "__name__", str(func)))
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        if func is T.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                cls.reads.append("boolean index")
        return super().__torch_function__(func, types, args, kwargs)


def on_device(t):
    return t.as_subclass(OnDevice) if isinstance(t, torch.Tensor) else t


def test_parameter_counts_by_hand_match_tables_1_and_3():
    conv = lambda c_in, c, k: c_in * c * k * k + c  # noqa: E731
    fc = lambda a, b: a * b + b  # noqa: E731
    # Table 1 (fast): conv1 3->96 11x11, conv2 96->256 5x5, conv3 256->512, conv4 512->1024,
    # conv5 1024->1024 3x3; fc6 on the 1024 x 6 x 6 map of a 231 input, fc7, fc8.
    fast = conv(3, 96, 11) + conv(96, 256, 5) + conv(256, 512, 3) + conv(512, 1024, 3) + \
        conv(1024, 1024, 3) + fc(1024 * 36, 3072) + fc(3072, 4096) + fc(4096, 1000)
    # Table 3 (accurate): conv1 3->96 7x7, conv2 96->256 7x7, conv3 256->512, conv4 512->512,
    # conv5 512->1024, conv6 1024->1024 3x3; fc7 on the 1024 x 5 x 5 map of 221, fc8, fc9.
    accurate = conv(3, 96, 7) + conv(96, 256, 7) + conv(256, 512, 3) + conv(512, 512, 3) + \
        conv(512, 1024, 3) + conv(1024, 1024, 3) + fc(1024 * 25, 4096) + fc(4096, 4096) + \
        fc(4096, 1000)
    assert fast == 145_920_872 and accurate == 144_656_488
    with torch.device("meta"):  # shapes only: no 145M-parameter initialisation
        assert overfeat.count_parameters(overfeat.overfeat("fast")) == fast
        assert overfeat.count_parameters(overfeat.overfeat("accurate")) == accurate
        tv = torchvision.models.alexnet(weights=None)
        ours = overfeat.overfeat("alexnet")
    # The paper's "145 million" and "144 million" are these, truncated to the million.
    assert fast // 10**6 == overfeat.PAPER["parameters_fast"] / 1e6 == 145
    assert accurate // 10**6 == overfeat.PAPER["parameters_accurate"] / 1e6 == 144
    assert overfeat.count_parameters(ours) == \
        sum(p.numel() for p in tv.parameters()) == 61_100_840


def test_torchvision_alexnet_state_dict_loads_strictly_and_gives_identical_outputs():
    torch.manual_seed(0)
    ref = torchvision.models.alexnet(weights=None).eval()
    ours = overfeat.overfeat("alexnet").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-6, rtol=0)


def test_output_and_map_shapes():
    torch.manual_seed(0)
    for variant, size, window in (("fast", 231, (6, 6)), ("accurate", 221, (5, 5)),
                                  ("alexnet", 224, (6, 6))):
        m = overfeat.overfeat(variant, 7, width=TINY).eval()
        assert m.window == window
        with torch.no_grad():
            assert m(torch.randn(2, 3, size, size)).shape == (2, 7)
            assert m.features(torch.randn(1, 3, size, size)).shape[-2:] == window
        small = overfeat.SMALL_INPUT[variant]  # CPU tests: 32x32 images upsampled to this
        m = overfeat.overfeat(variant, 6, 1, 0.125, small, regressor=True).eval()
        with torch.no_grad():
            assert m(torch.randn(3, 1, small, small)).shape == (3, 6)
            assert m.regressor(m.features(torch.randn(1, 1, small, small))).shape == (1, 4, 1, 1)
    names = [n for n, _ in overfeat.overfeat("accurate", width=TINY).named_modules()]
    assert "features.conv6" in names and "classifier.fc9" in names
    with pytest.raises(ValueError, match="too small"):
        overfeat.overfeat("fast", input_size=64)


def test_every_variant_trains_with_deterministic_cuda_kernels_only(monkeypatch):
    # --deterministic on CUDA: torch's adaptive average pooling, local response norm (avg_pool3d)
    # and bilinear interpolation have no deterministic CUDA backward and raise there. The CUDA
    # path is taken on this CPU (data.deterministic_cuda) with those functions made to raise:
    # a training step of each variant (classifier and §4's regressor) must not reach them.
    def refuse(name):
        return lambda *a, **kw: pytest.fail(f"{name} has no deterministic CUDA backward")
    interpolate = F.interpolate
    monkeypatch.setattr(data, "deterministic_cuda", lambda x: True)
    for name in ("adaptive_avg_pool2d", "local_response_norm", "avg_pool3d"):
        monkeypatch.setattr(F, name, refuse(name))
    monkeypatch.setattr(F, "interpolate", lambda x, *a, **kw: refuse("interpolate")()
                        if x.requires_grad else interpolate(x, *a, **kw))
    torch.manual_seed(0)
    for variant in ("fast", "accurate", "alexnet"):
        size = overfeat.SMALL_INPUT[variant]
        m = overfeat.overfeat(variant, 6, 3, TINY, size, regressor=True)
        x, y = torch.randn(2, 3, size, size), torch.tensor([1, 4])
        F.cross_entropy(m(x), y).backward()
        args = overfeat.get_args_parser().parse_args(["--data", "shapes-det"])
        args.__dict__.update(img_size=size, task="localisation")
        boxes = torch.tensor([[2.0, 3.0, 20.0, 30.0], [5.0, 5.0, 9.0, 12.0]])
        overfeat.regression_loss(m, x, y, boxes, args).backward()
        assert m.regressor[0].weight.grad.abs().sum() > 0, variant


def test_accurate_model_dense_maps_match_table_5():
    # Table 5: input scale -> classifier map before / after the reshape of the 9 offsets.
    torch.manual_seed(0)
    dense = overfeat.DenseNet(overfeat.overfeat("accurate", 3, width=TINY).eval()).eval()
    with torch.no_grad():
        for (h, w), pre in (((245, 245), (1, 1)), ((281, 317), (2, 3)), ((317, 389), (3, 5))):
            x = torch.randn(1, 3, h, w)
            assert dense(x).shape[-2:] == pre
            maps = dense(x, offsets=True)
            assert len(maps) == 9
            body = dense.body(x)
            pooled = overfeat.interleave(overfeat.offset_max_pool(body, 3, 3), 3)
            assert pooled.shape[-2:] == (3 * (pre[0] + 4), 3 * (pre[1] + 4))  # 5x5 window
            assert overfeat.interleave(dict(enumerate_offsets(maps)), 3).shape[-2:] == \
                (3 * pre[0], 3 * pre[1])


def enumerate_offsets(maps):
    return (((dy, dx), m) for (dy, dx), m in zip([(a, b) for a in range(3) for b in range(3)],
                                                   maps))


def test_convolutionize_on_the_training_size_gives_the_original_logits():
    torch.manual_seed(0)
    for variant, size in (("fast", 231), ("accurate", 221), ("alexnet", 224), ("fast", 103),
                          ("alexnet", 63)):
        m = overfeat.overfeat(variant, 5, width=TINY, input_size=size).eval()
        conv = overfeat.convolutionize(m.layers(), (size, size)).eval()
        assert not any(isinstance(c, (nn.Linear, nn.Flatten)) for c in conv)
        heads = [c for c in conv if isinstance(c, nn.Conv2d)][-3:]
        assert [c.kernel_size for c in heads] == [m.window, (1, 1), (1, 1)]
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            s = conv(x)
            assert s.shape == (2, 5, 1, 1)
            assert torch.allclose(s[:, :, 0, 0], m(x), atol=1e-5)
        with torch.no_grad():  # weights are copies
            m.classifier[-1].weight.add_(1)
        assert not torch.equal(heads[-1].weight.flatten(1), m.classifier[-1].weight)


def test_convolutionize_folds_torchvision_alexnets_replicating_avgpool():
    # torchvision's AlexNet on 63x63: a 1x1 conv map copied to 6x6 by AdaptiveAvgPool2d(6); fc6
    # becomes a 1x1 convolution with its 36 per-position weights summed. A mismatched input size
    # is a one-line ValueError.
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None, num_classes=5).eval()
    stack = nn.Sequential(*tv.features, tv.avgpool, nn.Flatten(), *tv.classifier)
    conv = overfeat.convolutionize(stack, (63, 63)).eval()
    x = torch.randn(2, 3, 63, 63)
    with torch.no_grad():
        assert torch.allclose(conv(x)[:, :, 0, 0], tv(x), atol=1e-5)
    with pytest.raises(ValueError, match="not a fixed convolution"):
        overfeat.convolutionize(stack, (127, 127))  # a 3x3 map pooled to 6x6
    bad = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(ValueError, match="expects 10 inputs"):
        overfeat.convolutionize(bad, (8, 8))


def test_convolutionize_takes_the_lectures_call_as_written():
    # EE-559: convolutionize(list(model.features) + list(model.classifier), (3, 224, 224))
    torch.manual_seed(0)
    model = torchvision.models.alexnet(num_classes=10).eval()
    fc = overfeat.convolutionize(list(model.features) + list(model.classifier),
                                 (3, 224, 224)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(fc(x).flatten(1), model(x), atol=1e-5)
        assert fc(torch.randn(1, 3, 288, 288)).shape == (1, 10, 3, 3)
    same = overfeat.convolutionize(list(model.features) + list(model.classifier), (224, 224))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(),
                                                 fc.state_dict().values()))
    with pytest.raises(ValueError, match="not \\(H, W\\) or"):
        overfeat.convolutionize(list(model.features), (224,))


def test_convolutionize_unpadded_net_equals_the_net_on_every_crop_exactly():
    # No padding: score cell (i, j) of a larger image = the original net on the 16x16 crop at
    # (2i, 2j), 2 being the total stride (conv 1 x pool 2 x conv 1).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.ReLU(),
                        nn.Dropout(0.5), nn.Linear(10, 5)).eval()
    conv = overfeat.convolutionize(net, (16, 16)).eval()
    x = torch.randn(2, 3, 22, 25)
    with torch.no_grad():
        s = conv(x)
        assert s.shape == (2, 5, 4, 5)  # (22 - 16) / 2 + 1, (25 - 16) // 2 + 1
        for i in range(4):
            for j in range(5):
                want = net(x[:, :, 2 * i:2 * i + 16, 2 * j:2 * j + 16])
                assert torch.allclose(s[:, :, i, j], want, atol=1e-5)


def test_convolutionize_padded_net_differs_only_near_the_crop_border():
    # The fast net pads conv3-5 by 1: on a crop, its conv5 map equals the big image's conv5 map
    # (at the matching window, offset 32 / 16 = 2 cells per output cell) except in a band of 3
    # cells (one per padded layer) along the crop's border, where zeros replace the context.
    torch.manual_seed(0)
    m = overfeat.overfeat("fast", 5, width=TINY).eval()
    feat = m.features[:-1]  # up to conv5 + ReLU, before pool5: 12x12 on 231, stride 16
    x = torch.randn(1, 3, 231 + 64, 231 + 64)
    with torch.no_grad():
        big = feat(x)
        for i, j in ((0, 0), (1, 2), (2, 1)):
            crop = feat(x[:, :, 32 * i:32 * i + 231, 32 * j:32 * j + 231])
            window = big[:, :, 2 * i:2 * i + 12, 2 * j:2 * j + 12]
            assert torch.allclose(crop[..., 3:9, 3:9], window[..., 3:9, 3:9], atol=1e-5)
            border = torch.ones(12, 12, dtype=torch.bool)
            border[3:9, 3:9] = False
            assert (crop - window).abs()[..., border].max() > 1e-4  # the effect is real
        # and so the dense score cells are close to, not equal to, the net on each crop
        s = overfeat.convolutionize(m.layers(), (231, 231)).eval()(x)
        for i, j in ((0, 0), (2, 2)):
            want = m(x[:, :, 32 * i:32 * i + 231, 32 * j:32 * j + 231])
            diff = (s[:, :, i, j] - want).abs().max()
            assert 1e-6 < diff < want.abs().max()


def test_head_over_windows_equals_the_convolutionized_head_on_every_offset_map():
    # the dense path's classifier as one GEMM over all windows of all offsets == head(map)
    torch.manual_seed(0)
    m = overfeat.overfeat("fast", 10, width=0.125).eval()
    overfeat.init_weights(m, "kaiming")
    dense = overfeat.DenseNet(m).eval()
    with torch.no_grad():
        f = dense.body(torch.randn(2, 3, 330, 300))
        maps = list(overfeat.offset_max_pool(f, dense.kernel, dense.stride).values())
        got = overfeat.head_over_windows(dense.head, maps)
        for x, g in zip(maps, got):
            want = dense.head(x)
            assert g.shape == want.shape and torch.allclose(g, want, atol=1e-5)


def test_offset_max_pool_on_a_hand_built_map():
    # x[i, j] = 5 i + j: every 3x3 window's max is its bottom-right value.
    x = torch.arange(25.0).view(1, 1, 5, 5)
    maps = overfeat.offset_max_pool(x, 3, 3)
    assert sorted(maps) == [(a, b) for a in range(3) for b in range(3)]
    for (dy, dx), m in maps.items():  # 5 - d >= 3: one window per offset, at (d, d)
        assert m.shape == (1, 1, 1, 1) and m.item() == 5 * (dy + 2) + dx + 2
    assert overfeat.interleave(maps, 3)[0, 0].tolist() == [[12, 13, 14], [17, 18, 19],
                                                            [22, 23, 24]]
    # in general: interleaved offset pooling (kernel = stride) is max-pooling at stride 1
    y = torch.randn(2, 3, 11, 13)
    got = overfeat.interleave(overfeat.offset_max_pool(y, 3, 3), 3)
    assert got.shape[-2:] == (9, 9)  # 3 windows per offset in both directions (cropped)
    assert torch.equal(got, F.max_pool2d(y, 3, 1)[..., :9, :9])
    # an offset that leaves no whole window is skipped
    assert (2, 2) not in overfeat.offset_max_pool(torch.randn(1, 1, 4, 4), 3, 3)


def test_dense_net_offsets_and_dense_evaluate():
    torch.manual_seed(0)
    m = overfeat.overfeat("accurate", 4, width=0.125, input_size=113).eval()
    with torch.no_grad():
        m.classifier[-1].weight.mul_(300)  # spread the scores: softmax far from uniform
    dense = overfeat.DenseNet(m).eval()
    x = torch.randn(2, 3, 113, 113)
    with torch.no_grad():
        # on the training size, offset (0, 0) is the network itself
        maps = dense(x, offsets=True)
        assert torch.allclose(maps[0][:, :, 0, 0], m(x), atol=1e-5)
        # one scale, no mirror, no offsets: the net's posterior
        p = overfeat.dense_evaluate(dense, x, [113], flip=False, offsets=False)
        assert torch.allclose(p, m(x).softmax(1), atol=1e-5)
        # with offsets: per class, the max over offsets and locations of the posteriors
        p = overfeat.dense_evaluate(dense, x, [113], flip=False)
        want = torch.stack([s.softmax(1).amax(dim=(2, 3)) for s in maps]).amax(0)
        assert torch.allclose(p, want, atol=1e-6)
        # mirror: the mean of the image's and the mirror image's vectors
        pm = overfeat.dense_evaluate(dense, x.flip(-1), [113], flip=False)
        assert torch.allclose(overfeat.dense_evaluate(dense, x, [113]), (p + pm) / 2, atol=1e-6)


def test_dense_tests_run_without_cudnn_autotuning(monkeypatch):
    # Every scale of the dense tests (classification, §4's localisation, §5's detection) is a new
    # input shape: with cuDNN's autotuning each would be benchmarked once and never met again.
    # It is off while their convolutions run, and restored after.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    torch.manual_seed(0)
    m = overfeat.overfeat("alexnet", 4, 3, 0.125, 63, regressor=True).eval()
    dense = overfeat.DenseNet(m).eval()
    seen = []
    dense.body[0].register_forward_pre_hook(
        lambda mod, inp: seen.append(torch.backends.cudnn.benchmark))
    x = torch.randn(2, 3, 63, 63)
    overfeat.dense_evaluate(dense, x, [63, 80])
    overfeat.dense_evaluate(dense, [x[0], x[1, :, :60]], [63])  # whole images of any size
    overfeat.localise(m, dense, x, [63, 80], 0.5)
    overfeat.detect(m, dense, x, [63, 80], 3)
    assert len(seen) >= 12 and not any(seen)
    assert torch.backends.cudnn.benchmark is True


def test_regression_targets_and_greedy_merge_known_answers():
    # 2x2 map, stride 10, window 20: centres (10, 10), (20, 10), (10, 20), (20, 20)
    box = torch.tensor([[5.0, 5.0, 25.0, 15.0]])
    t = overfeat.regression_targets(box, 2, 2, 10, 20)
    assert t.shape == (1, 4, 2, 2)
    assert t[0, :, 0, 1].tolist() == [(5 - 20) / 20, (5 - 10) / 20, (25 - 20) / 20, (15 - 10) / 20]
    # two near boxes merge into their mean (confidence 0.9 + 0.5), the far one stays
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [40.0, 40.0, 60.0, 60.0]])
    # match score of the near pair: centre distance sqrt(2) / 64 + 1 - IoU (81 / 119)
    s = overfeat.match_scores(boxes, boxes, 64)
    assert float(s[0, 1]) == pytest.approx(2 ** 0.5 / 64 + 1 - 81 / 119, abs=1e-6)
    assert torch.allclose(s, s.T) and torch.allclose(s.diagonal(), torch.zeros(3))
    out, conf = overfeat.greedy_merge(boxes, torch.tensor([0.9, 0.5, 0.8]), 0.5, 64)
    assert out.tolist() == [[0.5, 0.5, 10.5, 10.5], [40.0, 40.0, 60.0, 60.0]]
    assert conf.tolist() == pytest.approx([1.4, 0.8])
    out, _ = overfeat.greedy_merge(boxes, torch.tensor([0.9, 0.5, 0.8]), 0.1, 64)
    assert len(out) == 3  # threshold below every score: nothing merges
    out, conf = overfeat.greedy_merge(boxes, torch.tensor([0.9, 0.5, 0.8]), 10.0, 64)
    assert out.tolist() == [[20.25, 20.25, 35.25, 35.25]] and conf.tolist() == pytest.approx([2.2])


def test_greedy_merge_gives_the_pair_loops_result():
    # the matrix version against the loop it replaced (kept in bench/), merge for merge
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_greedy_merge import localiser_boxes, reference_greedy_merge
    for n, seed, threshold in ((30, 0, 0.9), (30, 1, 0.5), (12, 2, 5.0), (1, 3, 0.9)):
        boxes, scores = localiser_boxes(n, seed=seed)
        ref = reference_greedy_merge(boxes, scores, threshold, 231)
        new = overfeat.greedy_merge(boxes, scores, threshold, 231)
        assert torch.equal(ref[0], new[0]), (n, seed, threshold)
        assert torch.allclose(ref[1], new[1])
    empty = overfeat.greedy_merge(torch.zeros(0, 4), torch.zeros(0), 0.9, 231)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)


def test_localise_merges_on_the_cpu_after_one_copy_per_batch():
    # §4.3's greedy merge reads the best pair's score at every merge: a host sync per merge on a
    # GPU. localise copies a batch's boxes and scores to the CPU once (4 reads per batch, however
    # many images and merges) and merges there; its figures are those of the same net on the
    # CPU, returned as CPU tensors.
    torch.manual_seed(0)
    m = overfeat.overfeat("alexnet", 5, 3, 0.125, 63, regressor=True).eval()
    overfeat.init_weights(m, "kaiming")
    dense = overfeat.DenseNet(m).eval()
    x = torch.randn(3, 3, 80, 80)
    want = overfeat.localise(m, dense, x, [63, 80, 100], 10.0, k=2)  # 10: every box merges
    for n in (1, 3):
        OnDevice.reads.clear()
        got = overfeat.localise(m, dense, on_device(x[:n]), [63, 80, 100], 10.0, k=2)
        assert OnDevice.reads == ["cpu"] * 4, (n, OnDevice.reads)
        for g, w in zip(got, want):
            assert g.keys() == w.keys() and g["label"] == w["label"]
            for key in ("boxes", "scores", "guess_labels", "guess_boxes", "probs"):
                assert type(g[key]) is torch.Tensor and torch.allclose(g[key], w[key]), key
    assert len(want[0]["boxes"]) == 1  # all merged: 1 + 4 + 9 locations -> one box


def test_lr_schedule_and_defaults():
    assert [overfeat.lr_factor(e) for e in (0, 29, 30, 50, 60, 70, 80, 89)] == \
        [1, 1, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125]
    args = overfeat.get_args_parser().parse_args(["--data", "imagenet", "--variant", "accurate"])
    overfeat.resolve_defaults(args)
    # Table 2's accurate row: 4 scales, Table 5's 1, 2, 4 and 6
    assert (args.img_size, args.scales, args.crop_scale) == (221, [245, 281, 389, 461], 256)
    assert (args.batch_size, args.lr, args.momentum, args.weight_decay, args.init) == \
        (128, 5e-2, 0.6, 1e-5, "paper")
    args = overfeat.get_args_parser().parse_args(["--data", "shapes", "--quick"])
    overfeat.resolve_defaults(args)
    assert (args.img_size, args.scales, args.crop_scale, args.width, args.epochs) == \
        (103, [103, 129, 154], 114, 0.125, 8)
    assert (args.lr, args.momentum, args.init, args.dropout) == (1e-2, 0.9, "kaiming", 0.5)
    # --quick localisation on shapes-det: its own recipe (QUICK_LOC), flags given still win
    args = overfeat.get_args_parser().parse_args(["--data", "shapes-det", "--quick"])
    overfeat.choose_task(args)
    overfeat.resolve_defaults(args)
    assert (args.task, args.epochs, args.dropout, args.loc_epochs, args.width) == \
        ("localisation", 20, 0.0, 6, 0.125)
    args = overfeat.get_args_parser().parse_args(["--data", "shapes-det", "--quick",
                                                  "--epochs", "3", "--dropout", "0.5"])
    overfeat.choose_task(args)
    overfeat.resolve_defaults(args)
    assert (args.epochs, args.dropout) == (3, 0.5)
    args = overfeat.get_args_parser().parse_args(["--data", "shapes", "--dropout", "1"])
    with pytest.raises(overfeat.data.DataError, match=r"--dropout 1 is a probability"):
        overfeat.resolve_defaults(args)


def test_each_variant_is_compared_with_its_own_table_2_row_at_that_rows_scales(tmp_path):
    # Table 2 (ILSVRC-2012 val, one model, fine stride): fast 38.12 / 16.27 % at 6 scales (Table
    # 5's 1-6: 245 ... 461), accurate 35.74 / 14.18 % at 4 scales (1, 2, 4, 6). A run of each
    # variant on ImageNet (4 tiny files; --epochs 0: the test alone) tests at its row's scales
    # and writes that row's figures in its `paper` record; the fast model at 4 scales is compared
    # with its own 4-scale row (38.57 / 16.39 %), alexnet and unlisted scales with none.
    write_imagenet_boxes(str(tmp_path))
    want = {"fast": ([245, 281, 317, 389, 425, 461], 0.3812, 0.1627),
            "accurate": ([245, 281, 389, 461], 0.3574, 0.1418)}
    for variant, (scales, top1, top5) in want.items():
        r = overfeat.main(["--data", "imagenet", "--data-dir", str(tmp_path), "--device", "cpu",
                           "--variant", variant, "--width", str(TINY), "--epochs", "0",
                           "--workers", "0", "--out", str(tmp_path / variant),
                           "--log-every", "100000"])
        assert r["config"]["scales"] == scales
        assert (r["paper"]["test_error"], r["paper"]["top5_error"]) == (top1, top5)
        assert "test_error" in r["metrics"]  # (top-5 needs more than the 2 classes here)
    rows = {}
    for argv in (["--variant", "fast", "--scales", "245", "281", "389", "461"],
                 ["--variant", "fast", "--scales", "245"], ["--variant", "alexnet"],
                 ["--variant", "accurate", "--scales", "245", "281"]):
        args = overfeat.get_args_parser().parse_args(["--data", "imagenet", *argv])
        overfeat.resolve_defaults(args)
        rec = overfeat.paper_record(args)
        rows[" ".join(argv)] = (rec.get("test_error"), rec.get("top5_error"))
        assert rec["loc_error_top5"] == 0.299
    assert list(rows.values()) == [(0.3857, 0.1639), (0.3901, 0.1697), (None, None),
                                   (None, None)]


def test_overfit_one_batch():
    # Quick runs on shapes leave chance only after ~10 epochs (25 epochs: 51 % dense error, more
    # than a CPU test allows), so learning is shown on one fixed batch: 20 SGD steps take the loss
    # (dropout off, measured 1.86 -> 0.96) down by more than 1.5x. lr 0.05 diverges here.
    torch.manual_seed(0)
    m = overfeat.overfeat("fast", 6, width=0.125, input_size=103)
    overfeat.init_weights(m, "kaiming")
    x, y = torch.randn(8, 3, 103, 103), torch.arange(8) % 6
    opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9)
    with torch.no_grad():
        first = F.cross_entropy(m.eval()(x), y).item()
    m.train()
    for _ in range(20):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = F.cross_entropy(m.eval()(x), y).item()
    assert last < first / 1.5


def run(tmp_path, name, *extra):
    # the tests' own budget (8 epochs, batch 128) unless extra says otherwise (the last flag
    # wins), not --quick's
    out = str(tmp_path / name)
    return overfeat.main(["--data", "shapes", "--quick", "--batch-size", "128", "--epochs", "8",
                          "--device", "cpu", "--out", out,
                          "--log-every", "100000", *extra]), out


def test_quick_run_writes_single_crop_and_dense_errors_and_eval_only_repeats_them(tmp_path,
                                                                                   monkeypatch):
    results, out = run(tmp_path, "a", "--epochs", "1", "--batch-size", "250")
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["metrics"] == results["metrics"] and saved["script"] == "overfeat.py"
    assert set(saved["metrics"]) == {"test_error", "test_accuracy", "balanced_error",
                                     "single_crop_error", "dense_error"}
    assert saved["metrics"]["test_error"] == saved["metrics"]["dense_error"]
    assert all(0 <= v <= 1 for v in saved["metrics"].values())
    assert saved["config"]["scales"] == [103, 129, 154] and len(saved["history"]) == 1
    arrays = data.classification_arrays  # --eval-only: the test split alone (the checkpoint's
    monkeypatch.setattr(data, "classification_arrays",  # normalisation), or this fails
                        lambda name, split, *a, **kw: arrays(name, split, *a, **kw)
                        if split == "test" else pytest.fail(f"--eval-only read {split}"))
    again, _ = run(tmp_path, "b", "--eval-only", "--weights", os.path.join(out, "checkpoint.pt"))
    assert again["metrics"] == results["metrics"]
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 500}
    assert again["config"]["normalisation"] == results["config"]["normalisation"]
    assert set(saved["per_class_error"]) == set(data.SHAPES_CLASSES)
    assert saved["confusion"]["classes"] == list(data.SHAPES_CLASSES)
    # --classify: a folder of 2 of the user's images through that checkpoint, no data set read
    mine = tmp_path / "mine"
    mine.mkdir()
    for i in range(2):
        image = data.render_shapes(0, i, 48, split="test")[0]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(mine / f"s{i}.png")
    rows = overfeat.main(["--classify", str(mine), "--weights", os.path.join(out, "checkpoint.pt"),
                          "--device", "cpu", "--out", str(tmp_path / "p")])
    assert [len(r["found"]) for r in rows] == [5, 5]
    assert {f["class"] for f in rows[0]["found"]} <= set(data.SHAPES_CLASSES)
    assert (tmp_path / "p" / "predictions.csv").is_file()
    assert (tmp_path / "p" / "s1_classes.png").is_file()


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    # --stop-after 2 skips the (slow) dense test: equal weights imply equal test figures.
    tiny = ["--variant", "alexnet", "--batch-size", "128", "--epochs", "2", "--lr-steps", "1",
            "--limit", "512"]
    assert run(tmp_path, "full", *tiny, "--stop-after", "2")[0] is None
    assert run(tmp_path, "cut", *tiny, "--stop-after", "1")[0] is None  # "killed" after 1
    assert run(tmp_path, "cut", *tiny, "--resume", "--stop-after", "2")[0] is None
    a = torch.load(str(tmp_path / "full" / "checkpoint.pt"), weights_only=True)
    b = torch.load(str(tmp_path / "cut" / "checkpoint.pt"), weights_only=True)
    assert a["history"] == b["history"] and len(a["history"]) == 2
    assert [r["lr"] for r in a["history"]] == [0.005, 0.005]  # 1e-2 halved after epoch 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][k]["momentum_buffer"],
                           b["optimizer"]["state"][k]["momentum_buffer"])
               for k in a["optimizer"]["state"])


def test_bad_input_is_a_one_line_error():
    for argv, message in ((["--data", "voc-seg"], "'voc-seg' is a segmentation data set"),
                          (["--data", "shapes", "--quick", "--weights", "/nonexistent.pt"],
                           "checkpoint /nonexistent.pt not found")):
        r = command("overfeat.py", ["--device", "cpu", *argv])
        assert r.returncode != 0
        assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
        assert r.stderr.startswith("overfeat.py: error: ")


@pytest.mark.slow
def test_localisation_regressor_beats_the_mean_box(tmp_path):
    # §4 on shapes-det: frozen features (here untrained, He-init: --epochs 0, for time: the
    # quick classifier needs 20 epochs), the class-agnostic regressor trained 2 epochs, each
    # step at one of the 3 scales, where a location sees >= 50 % of the box; boxes merged over
    # the 3 scales. Measured: iou50_rate 0.188 vs 0.130 for the mean training box and 0.0 for
    # the whole image.
    out = str(tmp_path / "loc")
    r = overfeat.main(["--data", "shapes-det", "--quick", "--device", "cpu", "--out", out,
                       "--log-every", "100000", "--epochs", "0", "--loc-epochs", "2",
                       "--lr", "0.01", "--momentum", "0.9", "--batch-size", "32"])
    m = r["metrics"]
    assert {"map", "iou50_rate", "test_error", "single_crop_error", "dense_error"} <= set(m)
    assert m["iou50_rate"] > m["baseline_mean_box_iou50"] + 0.03
    assert m["iou50_rate"] > m["baseline_whole_image_iou50"]
    assert 0 <= m["map"] <= 1
    # ILSVRC's measure: five (class, box) guesses can only hit more often than the top one
    assert 0 <= m["loc_error_top5"] <= m["loc_error"] <= 1
    assert [h["phase"] for h in r["history"]] == ["regress"] * 2
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["metrics"] == m


def test_torchrun_two_processes_equal_one_process_classifier_and_regressor(tmp_path):
    # ImageNet on 4 tiny files (write_imagenet_boxes): a classification epoch, then §4.2's
    # regression epoch on its checkpoint, of a tiny alexnet without dropout, in ONE torchrun of
    # 2 gloo processes (tests/ddp_driver.py runs both mains in each), each on half of the same
    # global batch of 2: the checkpoints of both runs must equal those of 1 process (the
    # regressor's gradients are all-reduced through DDP's forward; without that each rank's
    # regressor would follow its own half of the data; both ranks draw the same scale per step).
    write_imagenet_boxes(str(tmp_path))
    tiny = [*TINY_IMAGENET, "--data-dir", str(tmp_path), "--scales", "63", "--lr", "0.005",
            "--momentum", "0.9", "--dropout", "0", "--lr-steps", "--stop-after", "1"]

    def runs(name):
        out = tmp_path / name
        return [["overfeat", [*tiny, "--epochs", "1", "--out", str(out / "cls")]],
                ["overfeat", [*tiny, *TINY_LOC, "--weights", str(out / "cls" / "checkpoint.pt"),
                              "--out", str(out / "loc")]]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--standalone", os.path.join(ROOT, "tests", "ddp_driver.py"),
                        json.dumps(runs("two"))], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    errors = [str(p) for p in (tmp_path / "two").rglob("ERROR-rank*")]
    assert not errors, open(errors[0]).read()[-2000:]
    for _, argv in runs("one"):
        assert overfeat.main(argv) is None
    for run, phase in (("cls", "classify"), ("loc", "regress")):
        one = torch.load(str(tmp_path / "one" / run / "checkpoint.pt"), weights_only=True)
        two = torch.load(str(tmp_path / "two" / run / "checkpoint.pt"), weights_only=True)
        assert [h["phase"] for h in two["history"]] == [phase]
        for k in one["model"]:  # float round-off only
            assert torch.allclose(one["model"][k], two["model"][k], atol=1e-5, rtol=0), (run, k)
    torch.manual_seed(0)  # the initial weights (rank 0 and 1 process: seed 0): both heads moved
    init = overfeat.overfeat("alexnet", 2, 3, 0.125, 63, regressor=True, dropout=0)
    overfeat.init_weights(init, "kaiming")
    for k in ("classifier.6.weight", "regressor.4.weight"):
        assert (one["model"][k] - init.state_dict()[k]).abs().max() > 1e-3, k


def detection_args(**kw):
    args = overfeat.get_args_parser().parse_args(["--data", "shapes-det", "--task", "detection"])
    args.__dict__.update(img_size=63, num_classes=6, **kw)
    return args


def test_detection_windows_known_answers_and_rank_slices():
    # Two hand-built 64x64 scenes, one object each. Per scene a positive window around the
    # object (label = its class) and a background window (label C = 6). The object's box in
    # window pixels: a square 1.3-2 x the object's side, so the box spans 63 / 2 .. 63 / 1.3
    # pixels, its centre within 0.2 x 63 of the window's centre (31.5). Rank slices under
    # torchrun are exactly the rows of the global batch.
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    scene = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([2])},
             {"boxes": torch.tensor([[40.0, 40.0, 60.0, 56.0]]), "labels": torch.tensor([5])}]
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    args = detection_args(negatives="random")
    w, y, b = next(overfeat.window_batches(x, scene, 4, 0, 0, mean, std, args, None))
    assert w.shape == (4, 3, 63, 63) and sorted(y[:2].tolist()) == [2, 5]
    assert y[2:].tolist() == [6, 6]
    side = (b[:2, 2:] - b[:2, :2]).amax(1)
    assert ((side >= 63 / 2 - 1e-4) & (side <= 63 / 1.3 + 1e-4)).all()
    centre = (b[:2, :2] + b[:2, 2:]) / 2
    assert ((centre - 31.5).abs() <= 0.2 * 63 + 1e-4).all()
    parts = [next(overfeat.window_batches(x, scene, 4, 0, 0, mean, std, args, None, r, 2))
             for r in (0, 1)]
    for r, (wr, yr, br) in enumerate(parts):
        assert torch.equal(wr, w[[r, 2 + r]]) and torch.equal(yr, y[[r, 2 + r]])
        assert torch.equal(br[:1], b[r:r + 1])
    # hard negatives: the candidate the scorer rates highest on an object class is kept; with
    # a scorer whose object logit is 5 x the window's mean, the brightest candidate, which is
    # at least as bright as the random pick (the first candidate)
    class Bright(nn.Module):
        def forward(self, v):
            m = v.mean((1, 2, 3))
            return torch.stack([5 * m] + [torch.zeros_like(m)] * 6, 1)
    hard = next(overfeat.window_batches(x, scene, 4, 0, 0, mean, std,
                                        detection_args(negatives="hard"), Bright()))
    assert torch.equal(hard[0][:2], w[:2]) and hard[1][2:].tolist() == [6, 6]
    gain = hard[0][2:].mean((1, 2, 3)) - w[2:].mean((1, 2, 3))
    assert (gain >= -1e-6).all() and gain.max() > 1e-3


def test_dense_detection_decodes_location_windows_at_every_scale():
    # A net whose regressor outputs (-1/2, -1/2, 1/2, 1/2) everywhere (each location's box = its
    # own 63-pixel window) and whose classifier says class 1 (posterior e^8 / (e^8 + 6)).
    # Scene S = 63: at scale 63 one location, the whole scene; at scale 126 a 2x2 map at stride
    # 32, windows [32 k, 32 k + 63] halved back into the scene.
    torch.manual_seed(0)
    m = overfeat.overfeat("alexnet", 7, 3, 0.125, 63, regressor=True).eval()
    with torch.no_grad():
        m.regressor[-1].weight.zero_()
        m.regressor[-1].bias.copy_(torch.tensor([-0.5, -0.5, 0.5, 0.5]))
        m.classifier[-1].weight.zero_()
        m.classifier[-1].bias.copy_(torch.tensor([0.0, 8, 0, 0, 0, 0, 0]))
    d = overfeat.detect(m, overfeat.DenseNet(m).eval(), torch.randn(1, 3, 63, 63), [63, 126], 6,
                        nms_iou=0.99)[0]
    assert d["labels"].tolist() == [1] * 5
    e8 = 2.718281828459045 ** 8
    assert d["scores"].tolist() == pytest.approx([e8 / (e8 + 6)] * 5, abs=1e-5)
    want = {(0, 0, 63, 63)} | {(16 * i, 16 * j, 16 * i + 31.5, 16 * j + 31.5)
                               for i in (0, 1) for j in (0, 1)}
    assert {tuple(round(v, 3) for v in bx) for bx in d["boxes"].tolist()} == want


class StepLog:
    """metrics.Progress's interface, keeping what train_one_epoch hands it."""

    def __init__(self):
        self.steps = []

    def step(self, images, loss, lr, epoch, n=None):
        self.steps.append((images, loss, n))

    def epoch_loss(self):
        return 0.0


def test_training_steps_leave_the_loss_and_the_batches_on_the_device(monkeypatch):
    # No host sync in a training step: the loss goes to Progress as the device tensor (read once
    # per log line), and §5's windows, hard negatives included, are drawn on the host and chosen
    # on the device without reading anything back. Device tensors are OnDevice stand-ins: the
    # host transfers (host_batch, to_device) make them; every read on the host is logged.
    torch.manual_seed(0)
    args = detection_args(negatives="hard", amp=False, channels_last=False, task="detection",
                          world=1)
    m = overfeat.overfeat("alexnet", 7, 3, 0.125, 63, regressor=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    scaler = data.grad_scaler(torch.device("cpu"), False)
    x = on_device(torch.randn(4, 3, 63, 63))
    y = on_device(torch.tensor([0, 3, 6, 2]))
    boxes = on_device(torch.tensor([[4.0, 5, 40, 50]] * 4))
    OnDevice.reads.clear()
    for phase, batch in (("classify", (x, y, None)), ("regress", (x, y, boxes))):
        log = StepLog()
        overfeat.train_one_epoch(m, [batch] * 2, opt, scaler, args, torch.device("cpu"), 0, log,
                                 phase)
        assert [(i, type(loss), n) for i, loss, n in log.steps] == [(4, OnDevice, 4)] * 2
    assert OnDevice.reads == []
    # detection's windows from host scenes: what moves is this rank's scenes (uint8) and draws
    moved = []
    monkeypatch.setattr(overfeat, "to_device", lambda t, device: on_device(t))
    monkeypatch.setattr(overfeat, "host_batch", lambda x, rows, device: moved.append(
        (x.dtype, list(rows))) or on_device(x[list(rows)]))
    scenes = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    scene = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([k])}
             for k in range(4)]
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    for positives_only in (False, True):
        log = StepLog()
        batches = overfeat.window_batches(scenes, scene, 4, 0, 0, mean, std, args, m, 1, 2,
                                          positives_only=positives_only)
        overfeat.train_one_epoch(m, batches, opt, scaler, args, torch.device("cpu"), 0, log,
                                 "regress" if positives_only else "classify")
        assert len(log.steps) == 2 and all(type(loss) is OnDevice for _, loss, _ in log.steps)
    assert OnDevice.reads == []
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    assert moved == [(torch.uint8, [order[1]]), (torch.uint8, [order[3]])] * 2  # rank 1 of 2


def test_channel_stats_in_chunks_equal_the_whole_set():
    # VOC 07+12's training scenes at S = 462 are 10.6 GB as uint8 and would be 85 GB in
    # float64 (data.channel_stats): overfeat.channel_stats adds exact integer sums a chunk at a
    # time, and gives the whole set's float64 figures.
    torch.manual_seed(0)
    x = torch.randint(0, 256, (13, 3, 7, 9), dtype=torch.uint8)
    want = data.channel_stats(x)
    for chunk in (1, 100, 189 * 5, 10**9):  # one image per chunk, 5 images, all at once
        mean, std = overfeat.channel_stats(x, chunk)
        assert mean == pytest.approx(want[0], rel=1e-14) and std == pytest.approx(want[1],
                                                                                    rel=1e-14)
    x[:, 1] = 255  # a constant channel: std 0 exactly
    assert overfeat.channel_stats(x, 100)[1][1] == 0.0


def test_scenes_stay_on_the_host_and_each_rank_reads_its_share(monkeypatch):
    # §5's scenes are uint8 arrays in host memory; under torchrun each rank reads only its share
    # of the test split (r, r + W, ...); the test moves them a batch of DET_TEST_BATCH at a time.
    # A split that would not fit in the host's memory is a one-line error naming the set, the
    # bytes and the flag.
    monkeypatch.setattr(overfeat.data, "shapes_size",
                        lambda split, quick=False: {"train": 6, "test": 5}[split])
    args = detection_args(workers=0)
    x, scene, gts, sizes, ds = overfeat.scene_arrays("test", args)
    assert x.dtype == torch.uint8 and x.device.type == "cpu" and x.shape == (5, 3, 64, 64)
    for rank in (0, 1):  # of 2
        monkeypatch.setattr(data, "distributed_info", lambda: (rank, 2))
        mine, _, gts1, sizes1, _ = overfeat.scene_arrays("test", args, share=True)
        assert torch.equal(mine, x[rank::2]) and sizes1 == sizes[rank::2] and len(ds) == 5
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(gts1, gts[rank::2]))
    assert len(overfeat.scene_arrays("test", args, share=True, first=1)[0]) == 1
    monkeypatch.setattr(data, "distributed_info", lambda: (0, 2))
    mine, _, gts1, sizes1, _ = overfeat.scene_arrays("test", args, share=True)  # 0, 2, 4
    moved = []
    host_batch = overfeat.host_batch
    monkeypatch.setattr(overfeat, "host_batch", lambda s, rows, device: moved.append(
        len(rows)) or host_batch(s, rows, device))
    monkeypatch.setattr(overfeat, "DET_TEST_BATCH", 2)
    monkeypatch.setattr(data, "gather_shards", lambda *parts: parts)  # one rank's share
    model = overfeat.overfeat("alexnet", 7, 3, 0.125, 63, regressor=True)
    args.__dict__.update(det_scales=[63], nms_iou=0.3)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    r, dets = overfeat.evaluate_detection(model, mine, gts1, sizes1, ds.classes, args, zero,
                                          one)
    assert moved == [2, 1] and r["samples"] == len(dets) == 3
    monkeypatch.setattr(overfeat, "available_host_memory", lambda: 10**4)
    with pytest.raises(data.DataError, match=r"the shapes-det test scenes \(3 of 64x64 pixels\) "
                       r"need 0.0 GB of host memory .* use a smaller --img-size") as e:
        overfeat.scene_arrays("test", args, share=True)
    assert "\n" not in str(e.value)


@pytest.fixture
def tiny_voc(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import write_voc
    ims = {"000001": (64, 48, [("dog", 5, 6, 30, 40, 0), ("person", 33, 2, 60, 47, 1)]),
           "000002": (50, 40, [("car", 1, 1, 50, 40, 0)])}
    write_voc(tmp_path / "voc", "2007", "test", ims)
    write_voc(tmp_path / "voc", "2007", "trainval", {"000003": ims["000001"],
                                                     "000004": ims["000002"]})
    write_voc(tmp_path / "voc", "2012", "trainval", {"000005": ims["000002"]})
    return str(tmp_path / "voc")


def test_voc_detection_on_real_files_then_detect_draws_the_boxes(tmp_path, tiny_voc, capsys):
    # The real VOC path (XML, JPEG): 3 training scenes, 2 test ones; per-class AP over all 20
    # VOC classes (NaN -> None for the classes without objects), then --detect on a PNG with
    # the checkpoint: the drawn file, one printed line per box, boxes in the image's pixels.
    out = str(tmp_path / "det")
    r = overfeat.main(["--data", "voc", "--data-dir", tiny_voc, "--no-download", "--device",
                       "cpu", "--variant", "alexnet", "--img-size", "63", "--width", "0.125",
                       "--epochs", "1", "--loc-epochs", "1", "--batch-size", "2", "--out", out,
                       "--log-every", "100000", "--eval-every", "2"])
    ap = r["metrics"]["ap"]
    # --eval-every 2: the test after epoch 2 (the regressor's) only, the final test's figure
    assert ["test_map" in h for h in r["history"]] == [False, True]
    assert r["history"][-1]["test_map"] == r["metrics"]["map"]
    assert list(ap) == list(overfeat.data.VOC_CLASSES)
    assert ap["aeroplane"] is None and ap["dog"] is not None and ap["car"] is not None
    assert 0 <= r["metrics"]["map"] <= 1 and r["config"]["det_scales"] == [63, 89, 126, 178, 252]
    # --eval-only reads VOC2007 test alone: the training annotations and images are gone
    shutil.rmtree(os.path.join(tiny_voc, "VOCdevkit", "VOC2012"))
    os.remove(os.path.join(tiny_voc, "VOCdevkit", "VOC2007", "ImageSets", "Main", "trainval.txt"))
    again = overfeat.main(["--data-dir", tiny_voc, "--no-download", "--device", "cpu",
                           "--eval-only", "--weights", os.path.join(out, "checkpoint.pt"),
                           "--out", str(tmp_path / "again"), "--log-every", "100000"])
    assert again["metrics"] == r["metrics"] and again["data"] == "voc"
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 2}
    assert {"dog", "car"} <= set(r["pr"]) <= set(overfeat.data.VOC_CLASSES)  # the PR curves
    assert len(r["pr"]["dog"]["recall"]) == len(r["pr"]["dog"]["precision"])
    # --detect on a folder: 2 pictures, one row per image with its boxes in the image's pixels,
    # the non-image reported and skipped
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, (h, w) in (("street", (40, 70)), ("yard", (50, 30))):
        Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy()).save(
            mine / f"{name}.png")
    (mine / "notes.jpg").write_text("not an image")
    capsys.readouterr()
    rows = overfeat.main(["--detect", str(mine), "--weights", os.path.join(out, "checkpoint.pt"),
                          "--out", str(tmp_path / "drawn"), "--device", "cpu",
                          "--score-threshold", "0"])
    printed = capsys.readouterr().out
    assert [os.path.basename(r["image"]) for r in rows] == ["notes.jpg", "street.png", "yard.png"]
    assert "is not an image" in rows[0]["error"] and "skipped" in printed
    for r, (w, h) in zip(rows[1:], ((70, 40), (30, 50))):
        assert os.path.isfile(r["picture"]) and r["found"]
        assert set(r["found"][0]) == {"class", "score", "xmin", "ymin", "xmax", "ymax"}
        assert all(f["class"] in overfeat.data.VOC_CLASSES and f["xmax"] <= w + 1e-4 and
                   f["ymax"] <= h + 1e-4 for f in r["found"])
    assert " box " in printed
    with open(tmp_path / "drawn" / "predictions.json") as f:
        assert len(json.load(f)) == 3
    with pytest.raises(overfeat.data.DataError, match="nothere.png does not exist") as e:
        overfeat.main(["--detect", str(tmp_path / "nothere.png"), "--weights",
                       os.path.join(out, "checkpoint.pt"), "--out", str(tmp_path / "x"),
                       "--device", "cpu"])
    assert "\n" not in str(e.value)
    loc = str(tmp_path / "loc.pt")  # a localisation checkpoint: a one-line error naming it
    torch.save({"model": {}, "args": {"task": "localisation"}}, loc)
    with pytest.raises(overfeat.data.DataError, match="not a checkpoint of overfeat.py --task"):
        overfeat.main(["--detect", str(mine), "--weights", loc])


def write_imagenet_boxes(root, flat_val=True):
    """DIR/imagenet/{train,val}/<wnid>/*.JPEG and the ILSVRC box XML in DIR/imagenet/bbox/
    {train/<wnid>,val}/<stem>.xml (VOC's format: 1-based corners, names are wnids)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import voc_xml
    wnids = ["n01440764", "n01443537"]
    for split in ("train", "val"):
        for k, wnid in enumerate(wnids):
            for j in range(2):
                stem = f"{wnid}_{split}{j}"
                folder = os.path.join(root, "imagenet", split, wnid)
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(torch.randint(0, 256, (40, 60, 3), dtype=torch.uint8).numpy()
                                ).save(os.path.join(folder, stem + ".JPEG"))
                box_dir = os.path.join(root, "imagenet", "bbox", split,
                                       "" if split == "val" and flat_val else wnid)
                os.makedirs(box_dir, exist_ok=True)
                objs = [(wnid, 11, 5, 40, 30, 0), (wnid, 1, 1, 10, 10, 0)]
                with open(os.path.join(box_dir, stem + ".xml"), "w") as f:
                    f.write(voc_xml(stem + ".JPEG", 60, 40, objs[::-1]))
    return wnids


# A tiny alexnet on write_imagenet_boxes' files: classification, then §4.2's localisation from its
# checkpoint (--weights; the network's flags are the checkpoint's)
TINY_IMAGENET = ["--data", "imagenet", "--device", "cpu", "--variant", "alexnet", "--width",
                 "0.125", "--img-size", "63", "--scales", "63", "80", "--batch-size", "2",
                 "--init", "kaiming", "--workers", "0", "--log-every", "100000"]
TINY_LOC = ["--task", "localisation", "--loc-scales", "63", "80", "--loc-epochs", "1"]


@pytest.fixture(scope="module")
def imagenet_classifier(tmp_path_factory):
    """(data dir, checkpoint) of a §3 classification run (1 epoch) on the tiny ImageNet files."""
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet_boxes(str(root))
    r = overfeat.main([*TINY_IMAGENET, "--data-dir", str(root), "--epochs", "1", "--out",
                       str(root / "cls")])
    assert r["config"]["task"] == "classification"
    return str(root), str(root / "cls" / "checkpoint.pt")


def test_imagenet_box_xml_loader_and_statistics(tmp_path):
    # The XML boxes (1-based corners -> continuous: xmin - 1, ymin - 1), names -> the sorted-wnid
    # class index of data.imagenet_dataset; the target of localisation = the LARGEST box (here
    # written second); the test images at their own size (a list: one size each); the mean
    # target box, as a fraction of the width and height, from the XML files alone; corrupt /
    # missing XML -> a one-line DataError.
    wnids = write_imagenet_boxes(str(tmp_path))
    ds = data.ImageNetBoxes("test", str(tmp_path))
    assert ds.classes == wnids and len(ds) == 4
    image, target = ds[2]  # val, second class
    assert image.shape == (3, 40, 60) and target["labels"].tolist() == [1, 1]
    assert target["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0], [10.0, 4.0, 40.0, 30.0]]
    args = overfeat.get_args_parser().parse_args(["--data", "imagenet", "--data-dir",
                                                  str(tmp_path), "--loc-scales", "63", "80"])
    test = overfeat.localisation_set("test", args)
    x, y, box, gts = overfeat.images_collate([test[i] for i in range(len(test))])
    assert [im.shape for im in x] == [(3, 40, 60)] * 4 and x[0].dtype == torch.uint8
    assert y.tolist() == [0, 0, 1, 1] and box[0].tolist() == [10.0, 4.0, 40.0, 30.0]
    (mean, std), mean_box = overfeat.localisation_statistics(
        overfeat.localisation_set("train", args, train=True), args)
    assert (mean, std) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert mean_box.tolist() == pytest.approx([10 / 60, 4 / 40, 40 / 60, 30 / 40])
    bad = os.path.join(str(tmp_path), "imagenet", "bbox", "val", f"{wnids[0]}_val0.xml")
    with open(bad, "w") as f:
        f.write("<annotation><size>")
    with pytest.raises(overfeat.data.DataError, match="corrupt annotation"):
        data.ImageNetBoxes("test", str(tmp_path))[0]
    os.remove(bad)
    with pytest.raises(overfeat.data.DataError, match="no bounding-box file for .*val0.JPEG"):
        data.ImageNetBoxes("test", str(tmp_path))


def test_localisation_trains_the_regressor_alone_on_a_classification_checkpoint(
        tmp_path, imagenet_classifier, monkeypatch):
    # §4.2 on ImageNet's files: --weights, the checkpoint of a classification run, loads into the
    # localisation network with only the regressor's keys fresh; the features and classifier
    # stay bitwise as they were through the regressor's training; results.json carries §4.6's
    # 29.9 % beside the localisation error. Then --eval-only of that run without the training
    # folders (the checkpoint holds the normalisation and the mean box), and classification's
    # --pretrained --eval-only (torchvision's weights stubbed out: no download here).
    src, cls = imagenet_classifier
    root = str(tmp_path / "data")
    shutil.copytree(os.path.join(src, "imagenet"), os.path.join(root, "imagenet"))
    r = overfeat.main([*TINY_IMAGENET, *TINY_LOC, "--data-dir", root, "--weights", cls,
                       "--out", str(tmp_path / "loc"), "--eval-every", "1"])
    assert {"loc_error", "loc_error_top5", "iou50_rate", "map"} <= set(r["metrics"])
    assert r["paper"]["loc_error_top5"] == 0.299 and r["config"]["epochs"] == 0
    assert [h["phase"] for h in r["history"]] == ["regress"]
    curves = ("test_error", "test_loc_error", "test_loc_error_top5")
    assert [r["history"][-1][k] for k in curves] == \
        [r["metrics"][k] for k in ("test_error", "loc_error", "loc_error_top5")]
    before = torch.load(cls, weights_only=True)["model"]
    after = torch.load(str(tmp_path / "loc" / "checkpoint.pt"), weights_only=True)["model"]
    assert set(after) - set(before) == {f"regressor.{i}.{p}" for i in (0, 2, 4)
                                        for p in ("weight", "bias")}
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen: bitwise the same
    # the regressor started fresh (the init of seed 0) and moved
    torch.manual_seed(0)
    init = overfeat.overfeat("alexnet", 2, 3, 0.125, 63, regressor=True)
    overfeat.init_weights(init, "kaiming")
    assert (after["regressor.4.weight"] - init.state_dict()["regressor.4.weight"]).abs().max() \
        > 1e-4
    for part in ("train", os.path.join("bbox", "train")):
        shutil.rmtree(os.path.join(root, "imagenet", part))
    again = overfeat.main(["--data-dir", root, "--device", "cpu", "--scales", "63", "80",
                           "--workers", "0", "--eval-only", "--weights",
                           str(tmp_path / "loc" / "checkpoint.pt"),
                           "--out", str(tmp_path / "again"), "--log-every", "100000"])
    assert again["metrics"] == r["metrics"] and again["config"]["task"] == "localisation"
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 4}
    monkeypatch.setattr(overfeat, "load_pretrained", lambda model, width: None)  # offline
    c = overfeat.main(["--data", "imagenet", "--data-dir", root, "--device", "cpu",
                       "--variant", "alexnet", "--width", "0.125", "--img-size", "63", "--scales",
                       "63", "--workers", "0", "--pretrained", "--eval-only", "--out",
                       str(tmp_path / "cls"), "--log-every", "100000"])
    assert c["config"]["sizes"] == {"train": 0, "val": 0, "test": 4}
    assert "dense_error" in c["metrics"]


def test_imagenet_localisation_reads_its_training_images_a_batch_at_a_time(tmp_path,
                                                                           monkeypatch):
    # The boxed training images stay on disk: building the set decodes nothing and holds no
    # tensor (file paths only); each sample decodes its own file when asked for, so a loader's
    # batch reads its own images and no others.
    write_imagenet_boxes(str(tmp_path))
    reads = []
    load_image = data.load_image
    monkeypatch.setattr(data, "load_image", lambda path, *a, **kw: reads.append(
        os.path.basename(path)) or load_image(path, *a, **kw))
    args = overfeat.get_args_parser().parse_args(["--data", "imagenet", "--data-dir",
                                                  str(tmp_path), "--loc-scales", "63", "80"])
    ds = overfeat.localisation_set("train", args, train=True)
    assert reads == [] and len(ds) == 4 and ds.side == 80
    assert not [v for v in vars(ds).values() if isinstance(v, torch.Tensor)]
    assert all(isinstance(p, str) and p.endswith(".xml") for _, p in ds.boxes.samples)
    image, target = ds[1]
    assert reads == ["n01440764_train1.JPEG"] and image.shape == (3, 80, 80)
    assert image.dtype == torch.uint8 and target["boxes"].shape == (2, 4)
    reads.clear()
    loader = data.make_loader(ds, 2, True, 0, "cpu", collate_fn=overfeat.localisation_collate)
    x, y, box, _ = next(iter(loader))
    assert len(reads) == 2 and x.shape == (2, 3, 80, 80) and box.shape == (2, 4)


def test_box_squares_and_the_targets_at_a_scale_known_answers():
    # A 40 x 60 (H x W) image, its box (10, 4, 40, 30), at side 80: resized x2 to 80 x 120, the
    # square at u of the 41 free columns; the box follows, kept whole where it leaves the square
    # (u ~ 1: x from -20); mirrored, x -> 80 - x. A portrait image moves along its rows.
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    box = torch.tensor([[10.0, 4.0, 40.0, 30.0]])
    big = torchvision.transforms.v2.functional.resize(image, [80, 120], antialias=True)
    x, b = overfeat.square_crop(image, box, 80, 0.5, False)  # offset int(0.5 * 41) = 20
    assert torch.equal(x, big[:, :, 20:100]) and b.tolist() == [[0.0, 8.0, 60.0, 60.0]]
    x, b = overfeat.square_crop(image, box, 80, 0.999, False)  # offset 40
    assert torch.equal(x, big[:, :, 40:]) and b.tolist() == [[-20.0, 8.0, 40.0, 60.0]]
    x, b = overfeat.square_crop(image, box, 80, 0.5, True)
    assert torch.equal(x, big[:, :, 20:100].flip(-1)) and b.tolist() == [[20.0, 8.0, 80.0, 60.0]]
    x, b = overfeat.square_crop(image.transpose(1, 2), box[:, [1, 0, 3, 2]], 80, 0.5, False)
    assert x.shape == (3, 80, 80) and b.tolist() == [[8.0, 0.0, 60.0, 60.0]]
    # the batch at one of --loc-scales (here 40: half the side), on the device, boxes following
    x, b = overfeat.square_crop(image, box, 80, 0.5, False)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    xs, y, bs = overfeat.localisation_batch(x[None], torch.tensor([1]), b, 40, zero, one)
    assert xs.shape == (1, 3, 40, 40) and bs.tolist() == [[0.0, 4.0, 30.0, 30.0]]
    assert xs.dtype == torch.float32 and 0 <= xs.min() and xs.max() <= 1


def test_field_of_view_rule_and_the_regression_loss_known_answers():
    # §4.2: no training where the field of view holds < 50 % of the box. 2x2 map, stride 10,
    # window 20: windows [0, 20] and [10, 30] across and down. Box (5, 5, 25, 15), area 200:
    # the top windows hold 15 x 10 = 150 of it (0.75), the bottom ones 15 x 5 = 75 (0.375).
    box = torch.tensor([[5.0, 5.0, 25.0, 15.0]])
    assert overfeat.in_view(box, 2, 2, 10, 20).tolist() == [[[0.75, 0.75], [0.375, 0.375]]]
    assert overfeat.in_view(torch.tensor([[0.0, 0.0, 20.0, 20.0]]), 1, 1, 10, 20).tolist() == \
        [[[1.0]]]

    class Zero(nn.Module):  # a net of total stride 10 whose regressor says 0 everywhere
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 1, 1, stride=10))

        def forward(self, x, regress=False):
            return torch.zeros(len(x), 4, 2, 2)
    # targets (regression_targets): top-left centre (10, 10): (-1/4, -1/4, 3/4, 1/4), squares
    # summing to 3/4; top-right (20, 10): (-3/4, -1/4, 1/4, 1/4), 3/4 too; the bottom row (in
    # view < 50 %) counts 0: half the mean over 4 locations x 4 edges = 1.5 / 32
    args = overfeat.get_args_parser().parse_args(["--data", "shapes-det"])
    args.img_size = 20
    loss = overfeat.regression_loss(Zero(), torch.zeros(1, 3, 30, 30), torch.tensor([0]), box,
                                    args)
    assert float(loss) == pytest.approx(1.5 / 32)


def test_class_specific_localisation_takes_each_guessed_class_box():
    # --class-specific (§4.2's one regressor per class): each of the k guessed classes gets the
    # box of its own regressor, merged over locations and scales. Regressor constant per class
    # c: the whole 63-pixel window shrunk by 4 c pixels on every side; classifier: class 2 then 0.
    torch.manual_seed(0)
    m = overfeat.overfeat("alexnet", 3, 3, 0.125, 63, regressor=True, box_classes=3).eval()
    with torch.no_grad():
        m.regressor[-1].weight.zero_()
        m.regressor[-1].bias.copy_(torch.tensor([[-0.5 + 4 * c / 63, -0.5 + 4 * c / 63,
                                                  0.5 - 4 * c / 63, 0.5 - 4 * c / 63]
                                                 for c in range(3)]).flatten())
        m.classifier[-1].weight.zero_()
        m.classifier[-1].bias.copy_(torch.tensor([2.0, 0.0, 4.0]))
    out = overfeat.localise(m, overfeat.DenseNet(m).eval(), torch.randn(1, 3, 63, 63), [63],
                            0.5, k=2)[0]
    assert out["guess_labels"].tolist() == [2, 0] and out["label"] == 2
    assert out["guess_boxes"].flatten().tolist() == pytest.approx([8.0, 8.0, 55.0, 55.0,
                                                                   0.0, 0.0, 63.0, 63.0], abs=1e-4)


def test_localisation_start_errors_are_one_line(tmp_path, imagenet_classifier):
    # ImageNet localisation without --weights; a checkpoint of another kind (a detection run)
    # or of another network (--variant); a checkpoint whose keys do not fit; --eval-only on a
    # classification checkpoint (no trained regressor); --epochs (no classifier trains here).
    root, cls = imagenet_classifier
    base = [*TINY_IMAGENET, *TINY_LOC, "--data-dir", root, "--out", str(tmp_path / "x")]
    state = torch.load(cls, weights_only=True)
    det = {**state, "arch": state["arch"] + "-det", "args": {**state["args"], "task": "detection"}}
    torch.save(det, tmp_path / "det.pt")
    bad = {**state, "model": dict(state["model"])}
    bad["model"]["features.99.weight"] = bad["model"].pop("classifier.6.bias")
    torch.save(bad, tmp_path / "bad.pt")
    for argv, message in (
            ([], r"run `overfeat.py --data imagenet` \(§3\) first and pass its checkpoint with "
                 r"--weights"),
            (["--weights", str(tmp_path / "det.pt")], r"det.pt is the checkpoint of a --task "
             r"detection run of 'overfeat-alexnet-w0.125-63-det', not of a classification run"),
            (["--weights", cls, "--variant", "fast"], "--variant fast contradicts"),
            (["--weights", str(tmp_path / "bad.pt")], r"bad.pt \(a classification checkpoint\) "
             r"does not fit the localisation network: missing \['classifier.6.bias'\], "
             r"unexpected \['features.99.weight'\]"),
            (["--weights", cls, "--eval-only"], "is a classification checkpoint: its regressor "
             "is untrained"),
            (["--weights", cls, "--epochs", "2"], "--epochs 2: ImageNet localisation trains no "
             "classifier")):
        with pytest.raises(overfeat.data.DataError, match=message) as e:
            overfeat.main([*base, *argv])
        assert "\n" not in str(e.value)


def test_detection_flags_bad_input_is_a_data_error():
    for argv, message in ((["--data", "voc", "--task", "localisation"], "does not fit --data voc"),
                          (["--data", "shapes", "--task", "detection"], "does not fit"),
                          (["--data", "shapes-det", "--task", "detection", "--batch-size", "3"],
                           "positive multiple of the 1 processes x 2"),
                          (["--data", "shapes-det", "--batch-size", "0"],
                           "must be a positive number"),
                          (["--detect", "x.png"], "--detect needs --weights")):
        with pytest.raises(overfeat.data.DataError, match=message):
            overfeat.main([*argv, "--device", "cpu", "--out", "/nonexistent/out"])


def test_detection_kill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_voc):
    # hard negatives (scored by the restored net), dropout (the restored RNG), both phases
    tiny = ["--data", "voc", "--data-dir", tiny_voc, "--no-download", "--device", "cpu",
            "--variant", "alexnet", "--img-size", "63", "--width", "0.125", "--epochs", "2",
            "--loc-epochs", "1", "--batch-size", "2", "--log-every", "100000", "--class-specific"]
    assert overfeat.main([*tiny, "--out", str(tmp_path / "full"), "--stop-after", "3"]) is None
    cut = ["--out", str(tmp_path / "cut")]
    assert overfeat.main([*tiny, *cut, "--stop-after", "1"]) is None
    assert overfeat.main([*tiny, *cut, "--resume", "--stop-after", "3"]) is None
    a = torch.load(str(tmp_path / "full" / "checkpoint.pt"), weights_only=True)
    b = torch.load(str(tmp_path / "cut" / "checkpoint.pt"), weights_only=True)
    assert a["history"] == b["history"] and len(a["history"]) == 3
    assert a["model"]["regressor.4.weight"].shape[0] == 4 * 20  # one box per VOC class
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_at_init_output_depends_on_input_and_eval_mode_learns():
    from conftest import assert_learns_in_eval_mode, shapes_batch
    x, y = shapes_batch(16, overfeat.SMALL_INPUT["fast"])
    torch.manual_seed(0)
    model = overfeat.overfeat("fast", 6, 3, 0.125, overfeat.SMALL_INPUT["fast"])
    overfeat.init_weights(model, "kaiming")
    assert_learns_in_eval_mode(model, x, y, 40, 0.01, 0.6)


def test_dry_run_takes_two_steps_checks_the_checkpoint_and_writes_results(tmp_path, capsys,
                                                                          monkeypatch):
    # The paper's settings (the fast net at full width, 41M parameters at 103 pixels; 90 epochs
    # of batch 128: cut to 1 epoch of 2 steps of the batch 2 asked for) on shapes. Stand-ins for
    # time: --limit 16 (rendering the set's 12,000 images takes longer here than the test's
    # budget), test batches of 1 image instead of 250 and the first 2 of the 3 test scales (the
    # full-width net's dense test, mirrors and 4 pooling offsets, costs ~1 s per image and scale
    # on this CPU): 2 batches, 2 of the 16 test images.
    monkeypatch.setattr(overfeat, "TEST_BATCH", 1)
    out = tmp_path / "dry"
    r = overfeat.main(["--data", "shapes", "--device", "cpu", "--dry-run", "--batch-size", "2",
                       "--limit", "16", "--scales", "103", "129", "--out", str(out),
                       "--log-every", "1"])
    said = capsys.readouterr().out
    assert re.findall(r"^epoch 1/1 step (\d+)/(\d+) ", said, re.M) == [("1", "2"), ("2", "2")]
    assert re.search(r"^test_error .* on 2 test images$", said, re.M)
    assert r["config"]["dry_run"] is True and r["config"]["width"] == 1.0
    assert r["config"]["epochs"] == 1 and [h["phase"] for h in r["history"]] == ["classify"]
    assert overfeat.data.load_checkpoint(str(out / "checkpoint.pt"),
                                         "overfeat-fast-103")["epoch"] == 0
    assert json.loads((out / "results.json").read_text())["config"]["dry_run"] is True


def test_dry_run_of_localisation_classifies_at_img_size_and_regresses_at_loc_scales(
        tmp_path, monkeypatch):
    # §4 on shapes-det (--quick): the classification epochs feed the classifier at --img-size
    # (its fc window: any other size is a shape error in its Linear layers), the regression
    # epochs at --loc-scales (here both above --img-size). 16 training / 10 test scenes.
    monkeypatch.setattr(overfeat.data, "shapes_size",
                        lambda split, quick=False: {"train": 16, "test": 10}[split])
    seen, batch = [], overfeat.localisation_batch

    def spy(x, y, box, scale, mean, std):
        seen.append(scale)
        return batch(x, y, box, scale, mean, std)
    monkeypatch.setattr(overfeat, "localisation_batch", spy)
    r = overfeat.main(["--data", "shapes-det", "--quick", "--device", "cpu", "--dry-run",
                       "--batch-size", "4", "--loc-scales", "129", "154", "--log-every", "100",
                       "--out", str(tmp_path / "loc")])
    assert [h["phase"] for h in r["history"]] == ["classify", "regress"]
    assert seen[:2] == [103, 103] and set(seen[2:]) <= {129, 154} and len(seen) == 4
    assert 0 <= r["metrics"]["loc_error_top5"] <= r["metrics"]["loc_error"] <= 1


def test_dry_run_of_detection_takes_two_steps_per_stage(tmp_path, capsys, monkeypatch):
    # §5 on shapes-det with the paper's settings (the fast net at full width, hard negatives):
    # each stage, the classifier with its background windows then the regressor, 1 epoch of 2
    # steps, and 2 test batches. Stand-ins for time: 16 training / 10 test scenes instead of
    # 9,000 / 2,000 (rendering them takes longer here than the test's budget; --limit is
    # classification's), test batches of 1 scene instead of 50, and the first 2 of the 5 test
    # scales (the largest, 412 pixels, costs ~9 GMAC per scene at full width).
    monkeypatch.setattr(overfeat.data, "shapes_size",
                        lambda split, quick=False: {"train": 16, "test": 10}[split])
    monkeypatch.setattr(overfeat, "DET_TEST_BATCH", 1)
    out = tmp_path / "dry"
    r = overfeat.main(["--data", "shapes-det", "--task", "detection", "--device", "cpu",
                       "--dry-run", "--batch-size", "2", "--det-scales", "103", "146",
                       "--out", str(out), "--log-every", "1"])
    said = capsys.readouterr().out
    assert re.findall(r"^epoch (\d)/2 step (\d+)/(\d+) ", said, re.M) == \
        [("1", "1", "2"), ("1", "2", "2"), ("2", "1", "2"), ("2", "2", "2")]
    assert re.search(r"^map .* on 2 test images$", said, re.M)
    assert [h["phase"] for h in r["history"]] == ["classify", "regress"]
    assert (r["config"]["epochs"], r["config"]["loc_epochs"], r["config"]["negatives"],
            r["config"]["width"], r["config"]["dry_run"]) == (1, 1, "hard", 1.0, True)
    state = overfeat.data.load_checkpoint(str(out / "checkpoint.pt"), "overfeat-fast-103-det")
    assert state["epoch"] == 1 and state["classes"] == list(overfeat.data.SHAPES_CLASSES)
    assert set(json.loads((out / "results.json").read_text())["metrics"]) == \
        {"map", "detections_per_image", "ap"}
