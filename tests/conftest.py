"""Writers of small data sets in their real on-disk formats, so the real loading code is tested."""
import copy
import os
import pathlib
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The runs the tests make draw no curves.png/confusion.png (~0.3 s a figure here, ~100 runs):
# the tests of those pictures turn them back on (monkeypatch.delenv). Subprocesses inherit it.
os.environ["REPRO_NO_PLOTS"] = "1"
# `pytest -n 2` (pytest-xdist, as the README's test command runs): one thread per worker, so
# that the two workers share the two cores instead of four threads fighting over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "ddp(name, script, argv): the test reads the run of "
                            "`script argv` under torchrun with 2 gloo processes (ddp_runs)")
    config.addinivalue_line("markers", "xdist_group(name): pytest -n N --dist loadgroup runs "
                            "a group's tests in one worker")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items):
    # The torchrun tests read one shared torchrun (ddp_runs, once per process that needs it):
    # under pytest-xdist they all go to one worker, or each worker would run it again.
    for item in items:
        if item.get_closest_marker("ddp"):
            item.add_marker(pytest.mark.xdist_group("ddp"))
    # The slow learning tests first (a stable sort): the workers start on the long tests and
    # share out the short ones at the end, instead of one long test finishing alone.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def ddp_runs(request, tmp_path_factory):
    """The torchrun runs of every selected test marked `ddp(name, script, argv)`, all in ONE
    torchrun of 2 gloo processes (tests/ddp_driver.py): each process imports torch once for all
    of them, not once per test. Returns {name: its --out folder}; a run that failed has an
    ERROR-rank<r> file there with its traceback (see `ddp_result`). A test may carry several
    marks, run in the order written; `out=NAME` runs in run NAME's folder (to --resume it)."""
    import json
    import subprocess
    plan, base = {}, tmp_path_factory.mktemp("ddp")
    for item in request.session.items:  # a test's marks run in the order written, top first
        for marker in reversed(list(item.iter_markers("ddp"))):
            name, script, argv = marker.args
            out = base / marker.kwargs.get("out", name)  # out=: another run's folder (--resume)
            plan[name] = [script, [*argv, "--out", str(out)]]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--standalone", os.path.join(ROOT, "tests", "ddp_driver.py"),
                        json.dumps(list(plan.values()))], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return {name: pathlib.Path(argv[-1]) for name, (_, argv) in plan.items()}


def command(script, argv):
    """`python SCRIPT ARGV` from the repository root as the interpreter runs it, but in this
    process (runpy, as __main__): a SimpleNamespace(returncode, stdout, stderr). Each script's
    __main__ turns its errors into `sys.exit(one line)`, which the interpreter prints to stderr
    with exit status 1, as here. A new python costs ~6 s on this CPU (importing torchvision
    imports torch._dynamo); the real command line is tested once, in test_runtime.py."""
    import contextlib
    import io
    import runpy
    import types
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, os.getcwd()
    sys.argv = [script, *map(str, argv)]
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            err.write(e.code + "\n")
            code = 1
        else:
            code = e.code or 0
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def ddp_results_json(ddp_runs, name):
    """The results.json of the torchrun run `name`, checked to come from 2 processes."""
    import json
    with open(ddp_result(ddp_runs, name) / "results.json") as f:
        results = json.load(f)
    assert results["config"]["world"] == 2
    return results


def ddp_result(ddp_runs, name):
    """The folder of the torchrun run `name`, after checking that neither process failed."""
    out = ddp_runs[name]
    for rank in (0, 1):
        error = out / f"ERROR-rank{rank}"
        assert not error.exists(), f"rank {rank} of the torchrun run '{name}' failed:\n" + \
            error.read_text()[-3000:]
    return out


@pytest.fixture(autouse=True)
def no_system_datasets(monkeypatch):
    """Every test sees a machine without Debian's dataset packages (as a fresh clone in CI may
    be); tests of that lookup put their own folder in data.SYSTEM_DATA_DIRS."""
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {})


def write_idx(path, array):
    """MNIST's idx format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_mnist(root, n_train=60, n_test=10, folder="MNIST", seed=0, labels=None):
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n) if labels is None else np.asarray(labels)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), y)
        out[prefix] = images, y
    return out


def write_cifar10(root, n_per_batch=4, seed=0):
    """cifar-10-batches-py: pickled dicts with 'data' (N, 3072: R, G, B planes) and 'labels'."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)  # str keys, as py2 pickles read with latin1
        out[name] = data, labels
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"]}, f)
    return out


def voc_xml(filename, width, height, objects):
    """objects: (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based pixel corners."""
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(d)}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
        # a part with its own box, as VOC's person layout has: must not be read as an object box
        f"<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
        f"<ymax>2</ymax></bndbox></part></object>"
        for n, x0, y0, x1, y1, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{filename}</filename><size>"
            f"<width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objs}</annotation>")


def write_voc(root, year="2007", image_set="test", images=None, seg=False):
    """A VOCdevkit/VOC<year> tree. images: {id: (w, h, objects)}; with seg, palette PNG masks
    (class index = rectangle of the first object, 255 border) and ImageSets/Segmentation."""
    base = os.path.join(root, "VOCdevkit", f"VOC{year}")
    for d in ("Annotations", "JPEGImages", "ImageSets/Main", "ImageSets/Segmentation",
              "SegmentationClass"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h, objects) in images.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(base, "JPEGImages", f"{i}.jpg"), quality=95)
        with open(os.path.join(base, "Annotations", f"{i}.xml"), "w") as f:
            f.write(voc_xml(f"{i}.jpg", w, h, objects))
        if seg:
            mask = np.zeros((h, w), np.uint8)
            name, x0, y0, x1, y1, _ = objects[0]
            mask[y0 - 1:y1, x0 - 1:x1] = data.VOC_SEG_CLASSES.index(name)
            mask[0, :] = 255
            png = Image.frombytes("P", (w, h), mask.tobytes())
            png.putpalette(data.voc_palette())
            png.save(os.path.join(base, "SegmentationClass", f"{i}.png"))
    sub = "Segmentation" if seg else "Main"
    with open(os.path.join(base, "ImageSets", sub, f"{image_set}.txt"), "w") as f:
        f.write("\n".join(images) + "\n")
    return base


def write_sbd(base, images, image_set="train"):
    """SBD's dataset folder (benchmark.tgz's benchmark_RELEASE/dataset, which torchvision's
    SBDataset moves into its root): img/<id>.jpg; cls/<id>.mat, the MATLAB struct GTcls with
    Segmentation (class indices 0-20, no void: here the first object's rectangle), Boundaries (a
    20x1 cell of sparse edge maps) and CategoriesPresent; <image_set>.txt. images: {id: (w, h,
    objects)} as write_voc's. Returns {id: mask}."""
    import scipy.io
    import scipy.sparse
    for d in ("img", "cls"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    rng, masks = np.random.default_rng(1), {}
    for i, (w, h, objects) in images.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(base, "img", f"{i}.jpg"), quality=95)
        name, x0, y0, x1, y1, _ = objects[0]
        k = data.VOC_SEG_CLASSES.index(name)
        mask = np.zeros((h, w), np.uint8)
        mask[y0 - 1:y1, x0 - 1:x1] = k
        edges = np.empty((20, 1), dtype=object)
        for c in range(20):
            edges[c, 0] = scipy.sparse.csc_matrix((h, w), dtype=np.float64)
        scipy.io.savemat(os.path.join(base, "cls", f"{i}.mat"), {"GTcls": {
            "Segmentation": mask, "Boundaries": edges,
            "CategoriesPresent": np.array([[k]], dtype=np.uint8)}})
        masks[i] = mask
    with open(os.path.join(base, f"{image_set}.txt"), "w") as f:
        f.write("\n".join(images) + "\n")
    return masks


@pytest.fixture
def voc_images():
    return {"000001": (64, 48, [("dog", 5, 6, 30, 40, 0), ("person", 33, 2, 60, 47, 1)]),
            "000002": (50, 40, [("car", 1, 1, 50, 40, 0)])}


# ---------------------------------------------------------------------------------------------
# Health checks of a freshly initialised classifier (the defects a synthetic set cannot show)

def output_spread(model, x):
    """How much a model's eval-mode output depends on its input: the spread of the logits across
    the batch over their mean magnitude. ~0 when every image gets the same output (NIN at
    PyTorch's default init: 1e-3; at the released init: 0.2)."""
    import torch
    model.eval()
    with torch.no_grad():
        out = model(x)
    return float(out.std(0).mean() / (out.abs().mean() + 1e-12))


def fit_fixed_batch(model, x, y, steps, lr, params=None, momentum=0.9):
    """`steps` SGD steps on one fixed batch in training mode; returns the loss at the first step,
    the training-mode loss after the last and the eval-mode loss on the same batch. Stale BN
    statistics show as an eval-mode loss far above the training-mode one (GoogLeNet at
    torchvision's tiny init: 142 against 0.5)."""
    import torch
    import torch.nn.functional as F

    def main_logits(out):
        return out[0] if isinstance(out, tuple) else out

    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=lr,
                          momentum=momentum)
    model.train()
    for i in range(steps):
        loss = F.cross_entropy(main_logits(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if i == 0 else first
    with torch.no_grad():
        train = F.cross_entropy(main_logits(model(x)), y).item()
        model.eval()
        evaluation = F.cross_entropy(model(x), y).item()
    return first, train, evaluation


def shapes_batch(n=16, size=32, channels=3, seed=0):
    """A fixed batch of n shapes images (float, normalised per channel) and their labels."""
    import torch
    ds = data.ShapesDataset("shapes", "train", size=size, seed=seed, quick=True)
    x = torch.stack([ds.render(i)[0] for i in range(n)]).float().div(255)
    y = torch.tensor([ds.render(i)[4] for i in range(n)])
    if channels == 1:
        x = x.mean(1, keepdim=True)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, y


def assert_learns_in_eval_mode(model, x, y, steps, lr, factor, params=None, gap=0.3):
    """At init the output depends on the input, and after `steps` SGD steps on one fixed batch
    the eval-mode loss has fallen below `factor` x the first loss and follows the training-mode
    loss (within `gap`)."""
    spread = output_spread(model, x)
    assert spread > 0.05, f"at init the output hardly depends on the input (spread {spread:.4f})"
    first, train, evaluation = fit_fixed_batch(model, x, y, steps, lr, params)
    assert evaluation < factor * first, (first, train, evaluation)
    assert evaluation < train + gap, f"eval-mode loss {evaluation:.3f} does not follow the " \
                                     f"training-mode loss {train:.3f}"
    return first, train, evaluation


def only_the_test_split(monkeypatch):
    """Reading any split but the test split fails: --eval-only must not touch training data."""
    arrays = data.classification_arrays

    def test_split_only(name, split, *a, **kw):
        assert split == "test", f"--eval-only read the {split} split"
        return arrays(name, split, *a, **kw)
    monkeypatch.setattr(data, "classification_arrays", test_split_only)


def shapes_pictures(folder, n=2):
    """A folder of `n` shapes test images as the user's PNG files (--classify)."""
    from PIL import Image
    folder.mkdir()
    for i in range(n):
        image = data.render_shapes(0, i, 48, split="test")[0]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"s{i}.png")
    return str(folder)


def assert_shapes_class_records(results):
    """A classifier's results on the shapes test split: per-class errors and the confusion matrix
    over the 6 classes, counting every test image once."""
    assert set(results["per_class_error"]) == set(data.SHAPES_CLASSES)
    assert results["confusion"]["classes"] == list(data.SHAPES_CLASSES)
    assert sum(map(sum, results["confusion"]["counts"])) == results["config"]["sizes"]["test"]


def assert_classified(rows, out, k=5):
    """--classify's rows for the two `shapes_pictures`: the top k shapes classes of each, most
    likely first, probabilities summing to at most 1; predictions.csv and a picture per image."""
    assert [len(r["found"]) for r in rows] == [k, k]
    for r in rows:
        p = [f["probability"] for f in r["found"]]
        assert p == sorted(p, reverse=True) and sum(p) <= 1 + 1e-6
        assert {f["class"] for f in r["found"]} <= set(data.SHAPES_CLASSES)
    assert (out / "predictions.csv").is_file() and (out / "s1_classes.png").is_file()


def image_tree(root, train=8, val=4):
    """DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg: dark and light noise images (--data
    folder:DIR reads them at 32x32, the class names the folders')."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c, level in (("dark", 40), ("light", 200)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = (level + 30 * torch.randn(20, 26, 3, generator=g)).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / split / c / f"{i}.jpg")
    return f"folder:{root}"


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU, checked on this CPU: --deterministic's kernels and host syncs

# Backward nodes of what torch.use_deterministic_algorithms(True) refuses on CUDA (its docs'
# list): none may be in a training graph (a CPU run does not raise for them).
NONDETERMINISTIC_ON_CUDA = ("AdaptiveAvgPool2DBackward", "AdaptiveAvgPool3DBackward",
                            "AvgPool3DBackward", "AdaptiveMaxPool2DBackward", "FractionalMaxPool",
                            "UpsampleLinear1DBackward", "UpsampleBilinear2DBackward",
                            "UpsampleBicubic2DBackward", "UpsampleTrilinear3DBackward",
                            "ReflectionPad", "NllLoss2DBackward", "GridSampler")


def nondeterministic_nodes(t):
    """The names of t's autograd graph nodes that have no deterministic CUDA kernel."""
    seen, stack, found = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith(NONDETERMINISTIC_ON_CUDA):
            found.add(type(fn).__name__)
        stack += [g for g, _ in fn.next_functions]
    return found


def refuse_nondeterministic_kernels(monkeypatch, script):
    """The path --deterministic takes on CUDA, on this CPU: data's helpers take their deterministic
    branch (data.deterministic_cuda true), and torch's functions without a deterministic CUDA
    backward raise when called (adaptive pooling; local_response_norm and the avg_pool3d it sums
    with). The scripts call them as F.* (torch.nn.functional itself), nn modules the same."""
    assert script.F is torch.nn.functional
    monkeypatch.setattr(data, "deterministic_cuda", lambda x: True)
    for name in ("adaptive_avg_pool2d", "local_response_norm", "avg_pool3d"):
        def refuse(*args, _name=name, **kwargs):
            raise RuntimeError(f"F.{_name}: no deterministic CUDA backward")
        monkeypatch.setattr(torch.nn.functional, name, refuse)


def old_kernels(model):
    """A copy of `model` computing as the script did before: torch's nn.LocalResponseNorm (whose
    avg_pool3d has no deterministic CUDA backward) in place of data.LocalResponseNorm; data's
    adaptive pools take torch's kernel while data.deterministic_cuda is false (on a CPU)."""
    old = copy.deepcopy(model)
    for parent in list(old.modules()):
        for name, m in parent.named_children():
            if isinstance(m, data.LocalResponseNorm):
                setattr(parent, name, torch.nn.LocalResponseNorm(m.size, m.alpha, m.beta, m.k))
    return old


def deterministic_step(model, x, y, deterministic=True, loss_fn=None):
    """A training forward and backward (dropout's masks from seed 0) with `loss_fn` (default:
    cross-entropy): the outputs (a list: the logits, or the main and aux logits) and gradients; the
    graph checked free of CUDA-nondeterministic backward nodes unless `deterministic` is false
    (the old kernels' reference)."""
    model.zero_grad()
    torch.manual_seed(0)
    out = model.train()(x)
    loss = (loss_fn or torch.nn.functional.cross_entropy)(out, y)
    assert not (deterministic and nondeterministic_nodes(loss))
    loss.backward()
    out = [o.detach() for o in (out if isinstance(out, tuple) else (out,))]
    return out, [p.grad.clone() for p in model.parameters()]


def host_reads(monkeypatch, script):
    """Record every read of a floating-point or bool tensor's value into Python (.item(),
    .tolist(), float(), int(), bool() and `if t:`, f-strings) made by `script`'s own code: on CUDA
    each is a host sync. Reads made inside metrics.py (Progress's once per line) are not its own."""
    reads, torch_dir = [], os.path.dirname(torch.__file__)
    for name in ("item", "tolist", "__float__", "__int__", "__index__", "__bool__"):
        def spy(t, *args, _real=getattr(torch.Tensor, name), _name=name):
            f = sys._getframe(1)
            while f is not None and f.f_code.co_filename.startswith(torch_dir):
                f = f.f_back  # torch's own Python (e.g. Tensor.__format__ calling .item())
            if f is not None and f.f_code.co_filename == script.__file__ and \
                    (t.is_floating_point() or t.dtype == torch.bool):
                reads.append(f"{_name} at line {f.f_lineno}")
            return _real(t, *args)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


def any_host_reads(monkeypatch):
    """Record every read of a tensor's values into Python (each a host sync on CUDA): .item(),
    .tolist(), .cpu(), .numpy(), bool(), int(), float() and index use. Returns the list."""
    reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
                 "__index__"):
        def read(t, *a, _original=getattr(torch.Tensor, name), _name=name, **kw):
            reads.append(_name)
            return _original(t, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, read)
    return reads


def no_loss_reduced_in_nll_loss2d(monkeypatch):
    """F.cross_entropy / F.nll_loss on inputs of more than 2 dims run nll_loss2d, whose reducing
    CUDA kernel --deterministic refuses: raise on it here, on the CPU."""
    for name in ("cross_entropy", "nll_loss"):
        def guarded(input, target, *a, _original=getattr(torch.nn.functional, name), **kw):
            assert input.dim() <= 2 or kw.get("reduction", "mean") == "none", \
                "nll_loss2d with a reduction: no deterministic CUDA kernel"
            return _original(input, target, *a, **kw)
        monkeypatch.setattr(torch.nn.functional, name, guarded)
