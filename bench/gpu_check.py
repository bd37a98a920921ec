"""The GPU pre-flight: every CUDA path of the repository once, one PASS/FAIL/SKIP line each.

    python bench/gpu_check.py                  # on a GPU box (its time there: not measured yet;
                                               # a 2-core CPU takes 11 minutes, CUDA skipped)
    python bench/gpu_check.py --only dry-run   # the checks whose name starts with a prefix
    python bench/gpu_check.py --device cpu     # the same harness on the CPU (what needs CUDA
                                               # is skipped, saying so)

What it runs, on tiny data trees in the papers' real formats written on the fly (MNIST idx
files, CIFAR-10 batches, ImageNet class folders, VOC2007/2012 with masks) and torchvision-layout
weights of random values for the --pretrained runs (no network needed):
  dry-run NAME        every paper run of `bash run_all.sh --dry-run`, as listed there, with
                      --cuda: 2 training steps per stage, 2 test batches, checkpoint, results.json
  deterministic ...   every script's first paper run with --deterministic (plus the variants
                      with LRN or adaptive pools: AlexNet's and GoogLeNet's paper nets,
                      OverFeat's AlexNet)
  amp ...             --amp (the dtype chosen and why), on the nets with LRN, BN, and the three
                      detection/segmentation losses
  channels-last ...   --channels-last; compile ...: --compile (two scripts)
  gpu-decode files    nvJPEG against the CPU decoder on RGB, grey, CMYK, progressive and
                      PNG-named-.jpg files (the pixels' mean and largest differences)
  gpu-decode ...      training dry runs with --gpu-decode (ImageNet, VOC boxes, VOC masks)
  resume cuda-cpu-cuda  a GPU checkpoint resumed on the CPU and back on the GPU
  host-syncs SCRIPT   the host syncs inside train_one_epoch of the small in-memory nets
                      (torch.cuda.set_sync_debug_mode): at most the per-line reads
  torchrun ...        2 NCCL processes equal to one process (2+ GPUs), and DDP + --compile
Writes OUT/gpu_check.json (device, date, every line); the exit code is 1 if a check failed.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
from conftest import command  # noqa: E402  (runs a script in process, as the tests do)
from test_run_all import paper_trees  # noqa: E402

SMALL = ["--batch-size", "2", "--log-every", "1", "--no-download"]
# Extra --deterministic runs: the variants whose layers have no deterministic CUDA kernel of
# their own (LRN's avg_pool3d, adaptive pools), as the paper runs do not all take them.
VARIANTS = [("alexnet-paper", "alexnet.py", ["--data", "imagenet", "--variant", "paper"]),
            ("googlenet-paper", "googlenet.py", ["--data", "imagenet", "--variant", "paper"]),
            ("overfeat-alexnet", "overfeat.py", ["--data", "imagenet", "--variant", "alexnet"])]


def paper_runs(out):
    """(name, script, argv) of `bash run_all.sh --dry-run --list`: the commands a GPU box runs."""
    listed = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--dry-run", "--list",
                             "--out", out], capture_output=True, text=True, check=True,
                            env={**os.environ, "RUN_ALL_GPUS": "1"})
    runs = []
    for line in listed.stdout.strip().splitlines():
        name, cmd = line.split(": ", 1)
        _, script, *argv = shlex.split(cmd)
        runs.append((name, script, argv))
    return runs


class Checker:
    def __init__(self, device, only, tree, out):
        self.device, self.only, self.tree, self.out, self.lines = device, only, tree, out, []
        self.cuda = device.type == "cuda"

    def wanted(self, name):
        return not self.only or any(name.startswith(p) for p in self.only)

    def say(self, status, name, detail=""):
        line = f"{status:4} {name}" + (f": {detail}" if detail else "")
        print(line, flush=True)
        self.lines.append({"status": status, "check": name, "detail": detail})

    def check(self, name, fn, needs_cuda=False, needs=None):
        """Run fn() -> detail; PASS, FAIL (its error's last line) or SKIP (why)."""
        if not self.wanted(name):
            return
        if needs_cuda and not self.cuda:
            return self.say("SKIP", name, "needs a CUDA GPU")
        if needs:
            return self.say("SKIP", name, needs)
        start = time.time()
        try:
            detail = fn() or ""
            self.say("PASS", name, f"{detail} ({time.time() - start:.1f} s)".strip())
        except Exception as e:  # noqa: BLE001 (every failure is one line, the next check goes on)
            lines = str(e).strip().splitlines() or [type(e).__name__]
            self.say("FAIL", name, lines[-1][:300])
            traceback.print_exc(file=sys.stderr)

    def run(self, name, script, argv, extra=()):
        """One script run in this process on the trees; its output folder checked."""
        out = os.path.join(self.out, re.sub(r"\W+", "-", name))
        dev = ["--cuda"] if self.cuda else ["--device", "cpu"]
        argv = [*argv, "--data-dir", self.tree, *SMALL, *dev, "--out", out, "--overwrite",
                *extra]
        if script == "fcn.py":
            argv += ["--batch-size", "1"]  # the paper's
        r = command(script, argv)
        if r.returncode != 0:
            raise RuntimeError((r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1])
        if not os.path.isfile(os.path.join(out, "results.json")):
            raise RuntimeError(f"no results.json in {out}")
        return json.load(open(os.path.join(out, "results.json")))


def decode_files(folder):
    """RGB, grey, CMYK, progressive JPEGs and a PNG named .jpg, from one smooth picture."""
    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([xx * 2 % 256, yy * 2 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    im = Image.fromarray(rgb)
    paths = {}
    for kind, save in (("rgb", lambda p: im.save(p, quality=90)),
                       ("grey", lambda p: im.convert("L").save(p, quality=90)),
                       ("cmyk", lambda p: im.convert("CMYK").save(p, quality=90)),
                       ("progressive", lambda p: im.save(p, quality=90, progressive=True)),
                       ("png-named-jpg", lambda p: im.save(p, format="PNG"))):
        paths[kind] = os.path.join(folder, f"{kind}.jpg")
        save(paths[kind])
    return paths


def check_decoders(device, folder):
    files = decode_files(folder)
    decoder = data.DecodeOnDevice(type("L", (), {"sampler": None, "dataset": None, "seed": 0})(),
                                  None, None, device)
    said = []
    raws = [(data.read_bytes(p), p) for p in files.values()]
    for (kind, path), x in zip(files.items(), decoder.decode(raws)):
        ref = data.load_image(path).as_subclass(torch.Tensor)
        x = x.as_subclass(torch.Tensor).cpu()
        if x.shape != ref.shape:
            raise RuntimeError(f"{kind}: shape {tuple(x.shape)} on the GPU, {tuple(ref.shape)} "
                               f"on the CPU")
        d = (x.float() - ref.float()).abs()
        if d.mean() > 3:  # nvJPEG's chroma upsampling differs from libjpeg's by a few levels
            raise RuntimeError(f"{kind}: mean difference {d.mean():.2f} levels from the CPU's")
        said.append(f"{kind} {d.mean():.2f}/{d.max():.0f}")
    return "mean/largest difference from the CPU decoder: " + ", ".join(said)


def count_syncs(c, script, argv, steps):
    """Host syncs inside train_one_epoch (torch.cuda.set_sync_debug_mode warns at each; the
    Python stack at that moment says where)."""
    hits = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message) and any(f.name == "train_one_epoch"
                                                 for f in traceback.extract_stack()):
            hits.append(str(message))
    saved = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            c.run(f"host-syncs {script}", script, argv, ["--log-every", "1000"])
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = saved
    if len(hits) > 4:  # the epoch's end: one read of the losses, one of the weights' norms
        raise RuntimeError(f"{len(hits)} host syncs in {steps} training steps")
    return f"{len(hits)} host syncs in {steps} training steps (the epoch's end)"


def torchrun(c, name, argv, n=2):
    out = os.path.join(c.out, name)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                        "--standalone", os.path.join(ROOT, "lenet5.py"), *argv, "--out", out,
                        "--overwrite"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed")
    return json.load(open(os.path.join(out, "results.json")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--only", nargs="*", default=[], metavar="PREFIX",
                   help="only the checks whose name starts with one of these")
    p.add_argument("--out", default=None, help="a folder for the runs (default: a temporary one)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: --device cuda but no CUDA GPU is visible (nvidia-smi?)")
    out = args.out or tempfile.mkdtemp(prefix="gpu-check-")
    tree, hub = os.path.join(out, "data"), os.path.join(out, "hub")
    if not os.path.isdir(tree):
        import pathlib
        paper_trees(pathlib.Path(tree))
    # --pretrained: torchvision-layout weights of random values in a private hub cache
    os.environ["TORCH_HOME"] = hub
    os.makedirs(os.path.join(hub, "hub", "checkpoints"), exist_ok=True)
    for build, weights in ((torchvision.models.vgg16, torchvision.models.VGG16_Weights),
                           (torchvision.models.alexnet, torchvision.models.AlexNet_Weights)):
        path = os.path.join(hub, "hub", "checkpoints", os.path.basename(weights.IMAGENET1K_V1.url))
        if not os.path.isfile(path):
            torch.save(build().state_dict(), path)
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True  # our CIFAR files' md5s
    ngpu = torch.cuda.device_count() if device.type == "cuda" else 0
    where = torch.cuda.get_device_name(device) if ngpu else "the CPU"
    print(f"gpu_check: {where}, {ngpu} GPU(s), torch {torch.__version__}, runs in {out}")
    c = Checker(device, args.only, tree, os.path.join(out, "runs"))
    runs = paper_runs(out)  # fcn-16s starts from OUT/runs/fcn-32s/checkpoint.pt, as listed

    for name, script, argv in runs:
        c.check(f"dry-run {name}", lambda s=script, a=argv, n=name: c.run(n, s, a)
                and "results.json written")
    firsts = {}
    for name, script, argv in runs:
        firsts.setdefault(script, (name, argv))
    det = [(n, s, a) for s, (n, a) in firsts.items()] + VARIANTS
    for name, script, argv in det:
        c.check(f"deterministic {name}",
                lambda s=script, a=argv, n=name: c.run(f"det-{n}", s, [*a, "--dry-run"],
                                                       ["--deterministic"]) and "ran", )
    dtype, why = data.amp_dtype(device)
    for name, script, argv in [VARIANTS[0]] + [r for r in runs if r[0] in (
            "resnet-20", "googlenet", "yolo", "ssd", "fcn-32s")]:
        c.check(f"amp {name}", lambda s=script, a=argv, n=name: c.run(
            f"amp-{n}", s, [*a, "--dry-run"], ["--amp"]) and why, needs_cuda=True)
    for name, script, argv in [r for r in runs if r[0] in ("resnet-20", "vgg19", "ssd")]:
        c.check(f"channels-last {name}", lambda s=script, a=argv, n=name: c.run(
            f"cl-{n}", s, [*a, "--dry-run"], ["--channels-last"]) and "ran")
    for name, script, argv in [r for r in runs if r[0] in ("lenet5", "resnet-20")]:
        c.check(f"compile {name}", lambda s=script, a=argv, n=name: c.run(
            f"compile-{n}", s, [*a, "--dry-run"], ["--compile"]) and "ran", needs_cuda=True)

    c.check("gpu-decode files", lambda: check_decoders(device, out), needs_cuda=True)
    for name, script, argv in [r for r in runs if r[0] in ("alexnet", "ssd", "fcn-32s")]:
        c.check(f"gpu-decode {name}", lambda s=script, a=argv, n=name: c.run(
            f"gd-{n}", s, [*a, "--dry-run"], ["--gpu-decode", "--workers", "2"]) and "ran",
            needs_cuda=True)

    def resume():
        base = ["--data", "mnist", "--epochs", "3", "--batch-size", "16"]
        out = os.path.join(c.out, "resume")
        common = ["--data-dir", tree, "--no-download", "--out", out, "--log-every", "1000"]
        steps = [["--cuda", "--stop-after", "1", "--overwrite"],
                 ["--resume", "--device", "cpu", "--stop-after", "2"], ["--resume", "--cuda"]]
        for extra in steps:
            r = command("lenet5.py", [*base, *common, *extra])
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(extra)}: {r.stderr.strip()[-200:]}")
        res = json.load(open(os.path.join(out, "results.json")))
        return f"3 epochs over cuda, cpu, cuda; test error {res['metrics']['test_error']:.3f}"
    c.check("resume cuda-cpu-cuda", resume, needs_cuda=True)

    for script, argv, steps in (("lenet5.py", ["--data", "mnist", "--batch-size", "4",
                                               "--epochs", "1"], 15),
                                ("resnet.py", ["--data", "cifar10", "--depth", "20",
                                               "--batch-size", "2", "--epochs", "1"], 4)):
        c.check(f"host-syncs {script[:-3]}", lambda s=script, a=argv, n=steps: count_syncs(
            c, s, [*a, "--no-download"], n), needs_cuda=True)

    def nccl():
        base = ["--data", "mnist", "--data-dir", tree, "--no-download", "--epochs", "2",
                "--batch-size", "8", "--deterministic", "--cuda", "--log-every", "1000"]
        one = c.run("torchrun-1", "lenet5.py", base[:2], base[2:])
        two = torchrun(c, "torchrun-2", base)
        a = [h["train_loss"] for h in one["history"]]
        b = [h["train_loss"] for h in two["history"]]
        if not np.allclose(a, b, rtol=1e-4) or one["metrics"]["test_error"] != \
                two["metrics"]["test_error"]:
            raise RuntimeError(f"2 processes {b} / {two['metrics']['test_error']}, 1 process "
                               f"{a} / {one['metrics']['test_error']}")
        return f"train losses {b} as one process's"
    c.check("torchrun nccl-2 = one process", nccl, needs_cuda=True,
            needs=None if ngpu >= 2 or not c.cuda else "needs 2 GPUs")
    c.check("torchrun ddp+compile", lambda: torchrun(
        c, "torchrun-compile", ["--data", "mnist", "--data-dir", tree, "--no-download",
                                "--dry-run", "--cuda", "--compile", "--batch-size", "4"])
        and "ran", needs_cuda=True, needs=None if ngpu >= 2 or not c.cuda else "needs 2 GPUs")

    if not c.lines:
        sys.exit(f"gpu_check.py: error: no check's name starts with {' or '.join(args.only)}; "
                 f"the names are those of the PASS/FAIL/SKIP lines of a run without --only")
    failed = [l for l in c.lines if l["status"] == "FAIL"]
    record = {"device": where, "gpus": ngpu, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "checks": c.lines}
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(record, f, indent=1)
    counts = {s: sum(l["status"] == s for l in c.lines) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} "
          f"skipped; {os.path.join(out, 'gpu_check.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
