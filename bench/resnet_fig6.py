"""Fig. 6 of He et al. 2015 (arXiv:1512.03385) on this CPU: plain-20/56 (the figure's left panel)
and ResNet-20/56 (its middle panel) trained on real CIFAR-10 photographs, training error dashed,
test error bold, and the paper's claim checked: the deeper plain net trains worse, the deeper
ResNet does not.

    python bench/resnet_fig6.py                    # 4 nets, seed 0, 12 epochs: ~65 min
    python bench/resnet_fig6.py --seeds 0 1        # two seeds (the curves are their mean)
    python bench/resnet_fig6.py --resume           # continue killed runs, skip finished ones
    python bench/resnet_fig6.py --plot-only        # the picture and table from the records
    python bench/resnet_fig6.py --epochs 1 --limit 256 --out /tmp/fig6   # smoke test, ~30 s

Each network is a normal resnet.py run (resnet.main), in its own folder OUT/<net>-seed<S>/
(default results/resnet-fig6/plain20-seed0/ ...), whose results.json records the equivalent
`python resnet.py ...` command, the code's provenance and the per-epoch history (train_error: the
running error of the augmented batches as they are trained on; test_error: --eval-every 1). A
folder holding a results.json of the same settings is skipped; one holding only a checkpoint is
continued with --resume (without it the bench stops and says so). Then OUT/fig6.png (drawn with
PIL: matplotlib is not a dependency) and OUT/fig6.json (the table and the verdict).

Recipe: §4.2's, as resnet.py runs it: SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1
divided by 10 at 1/2 and 3/4 of the run (the paper's 32k and 48k of 64k iterations), 4-pixel
zero padding + random 32x32 crop + horizontal flip, option-A shortcuts, no warm-up (the paper
warms up ResNet-110 only). Departures: the data and the length. Data: `cifar10-jpg`, the 10,000
CIFAR-10 test photographs as JPEG (../shared/data/cifar10_test_jpg), which data.py splits per
class into 8,000 training / 2,000 test images (the paper: 50,000 / 10,000; these figures are not
comparable with Table 6). `--data fashion-mnist` (60,000 / 10,000 greyscale 28x28, 7.5x the
images per epoch) also works.

Budget: 12 epochs of 62 iterations (744 iterations, lr / 10 at 372 and 558), 1.2 % of the
paper's 64k: about 65 minutes for the four nets and one seed on this machine's 2 cores (AMD EPYC,
torch 2.14.1, fp32). Measured with the bench itself at `--epochs 1` while other jobs ran (load
average 3-5), one torch thread: the runs' records give plain-20 45.7 s, ResNet-20 48.9 s, plain-56
131.2 s, ResNet-56 128.6 s, each with ~5-8 s of reading the 10,000 JPEGs and a final test. The
20-layer nets train at ~205 images/s, the 56-layer ones at ~71, so an epoch (7,936 images, then
the 2,000 test images) costs ~41 s and ~120 s: 322 s for the four, 12 epochs 64 minutes plus a
minute of reading. One thread (--threads 1, the default) because under that load two threads
trained 4.6-5x slower (ResNet-20 41-45 images/s, ResNet-56 14) than one: the threads wait for each
other whenever another job holds a core; on an idle machine --threads 2 may be faster (measure
before choosing). Each extra seed adds as much again.

The verdict is read on the final training error (the last epoch's running error, mean over the
seeds): plain-56's above plain-20's (the degradation problem, §4.1/§4.2), ResNet-56's at most
ResNet-20's. So short a run shows only the start of Fig. 6's curves (the paper's x axis ends at
64k iterations), and its errors are not the paper's.
"""
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import resnet  # noqa: E402

NETS = ("plain20", "plain56", "resnet20", "resnet56")
EPOCHS = 12  # the default budget: see the docstring
COLOURS = {20: (230, 140, 20), 56: (200, 30, 30)}  # as the paper's 20 (orange) and 56 (red)


# ---------------------------------------------------------------------------------------------
# Runs

def net_flags(net):
    """plainD / resnetD as resnet.py's flags (the CIFAR default, option A, for the ResNets)."""
    for prefix, flags in (("plain", ["--plain"]), ("resnet", [])):
        if net.startswith(prefix) and net[len(prefix):].isdigit():
            depth = int(net[len(prefix):])
            if resnet.is_cifar_depth(depth):
                return ["--depth", str(depth), *flags]
    raise data.DataError(f"--nets {net}: give plainD or resnetD with a CIFAR depth D = 6n+2 "
                         f"(e.g. {' '.join(NETS)})")


def run_argv(args, net, seed, out, resume):
    argv = [*net_flags(net), "--data", args.data, "--data-dir", args.data_dir, "--epochs",
            str(args.epochs), "--eval-every", "1", "--seed", str(seed), "--device", args.device,
            "--log-every", str(args.log_every), "--out", out]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    return argv + (["--resume"] if resume else [])


def same_settings(record, args, seed):
    c = record.get("config", {})
    return (c.get("epochs"), c.get("data"), c.get("seed"), c.get("limit")) == \
        (args.epochs, args.data, seed, args.limit)


def train(args, net, seed):
    """One network's run: skipped when finished with these settings, resumed when killed."""
    out = os.path.join(args.out, f"{net}-seed{seed}")
    record = os.path.join(out, "results.json")
    if os.path.isfile(record):
        with open(record) as f:
            if same_settings(json.load(f), args, seed):
                print(f"resnet_fig6: {out} is finished, skipped", flush=True)
                return
        raise data.DataError(f"{record} is a run of other settings (--epochs, --data, --limit); "
                             f"choose another --out or remove {out}")
    resume = os.path.isfile(os.path.join(out, "checkpoint.pt"))
    if resume and not args.resume:
        raise data.DataError(f"{out} holds an unfinished run (checkpoint.pt): pass --resume to "
                             f"continue it, or choose another --out")
    argv = run_argv(args, net, seed, out, resume)
    print(f"resnet_fig6: python resnet.py {' '.join(argv)}", flush=True)
    saved, sys.argv = sys.argv, ["resnet.py", *argv]  # results.json records this command
    try:
        resnet.main(argv)
    finally:
        sys.argv = saved


# ---------------------------------------------------------------------------------------------
# Curves, table, verdict

def read_curves(args):
    """{net: {"iteration": [...], "train_error": [...], "test_error": [...], "seeds": n,
    "per_seed": [(final train, final test), ...]}}, the errors averaged over the seeds' runs."""
    curves = {}
    for net in args.nets:
        runs = []
        for seed in args.seeds:
            path = os.path.join(args.out, f"{net}-seed{seed}", "results.json")
            if os.path.isfile(path):
                with open(path) as f:
                    runs.append(json.load(f))
        if not runs:
            continue
        n = min(len(r["history"]) for r in runs)
        rows = [[r["history"][i] for r in runs] for i in range(n)]
        mean = lambda key, rs: sum(x[key] for x in rs) / len(rs)  # noqa: E731
        curves[net] = {"iteration": [rs[0]["iteration"] for rs in rows],
                       "train_error": [mean("train_error", rs) for rs in rows],
                       "test_error": [mean("test_error", rs) for rs in rows],
                       "seeds": len(runs),
                       "per_seed": [(r["history"][-1]["train_error"], r["metrics"]["test_error"])
                                    for r in runs]}
    return curves


def verdict(curves):
    """§4.2 / Fig. 6: "the deeper plain net has higher training error" (plain-56 > plain-20) and
    the deeper ResNet is no worse (ResNet-56 <= ResNet-20), on the final training error."""
    final = {net: c["train_error"][-1] for net, c in curves.items()}
    claims = []
    for shallow, deep, holds, said in (
            ("plain20", "plain56", lambda s, d: d > s, "plain-56 trains worse than plain-20"),
            ("resnet20", "resnet56", lambda s, d: d <= s,
             "ResNet-56 trains no worse than ResNet-20")):
        if shallow in final and deep in final:
            claims.append({"claim": said, "holds": holds(final[shallow], final[deep]),
                           shallow: final[shallow], deep: final[deep]})
    return claims


def dashed(draw, points, fill, width, dash=8, gap=6):
    """A polyline drawn as dashes of `dash` pixels separated by `gap`, the pattern carried on
    across vertices."""
    on, left = True, dash
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length, t = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 0.0
        while t < length - 1e-9:
            step = min(left, length - t)
            if on:
                a, b = t / length, (t + step) / length
                draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)),
                           (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=fill, width=width)
            t, left = t + step, left - step
            if left <= 1e-9:
                on = not on
                left = dash if on else gap


def nice_step(span, ticks=6):
    """A tick step of 1, 2 or 5 x 10^k giving about `ticks` ticks over `span`."""
    raw = max(span, 1e-12) / ticks
    k = 10 ** math.floor(math.log10(raw))
    return next(m * k for m in (1, 2, 5, 10) if m * k >= raw)


def draw_figure(curves, path, title):
    """Two panels (plain | ResNet), error (%) against iterations: training error dashed, test
    error bold, one colour per depth; a PNG written with PIL."""
    from PIL import Image, ImageDraw, ImageFont
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    pw, ph, ml, mr, mt, mb = 420, 300, 50, 30, 56, 44  # panel size and margins
    img = Image.new("RGB", (2 * (ml + pw + mr), mt + ph + mb), "white")
    d = ImageDraw.Draw(img)
    d.text((ml, 8), title, fill="black", font=font)
    key_x = ml + pw + mr + ml  # the line styles' key, top right
    dashed(d, [(key_x, 17), (key_x + 30, 17)], "black", 2)
    d.text((key_x + 36, 10), "training error", fill="black", font=small)
    d.line([(key_x + 150, 17), (key_x + 180, 17)], fill="black", width=4)
    d.text((key_x + 186, 10), "test error", fill="black", font=small)
    xmax = max((c["iteration"][-1] for c in curves.values()), default=1)
    ymax = max((max(c["train_error"] + c["test_error"]) for c in curves.values()), default=0.1)
    ystep = nice_step(100 * ymax, 5) / 100
    ymax = ystep * math.ceil(ymax / ystep - 1e-9)
    xstep = nice_step(xmax, 5)
    for k, (family, name) in enumerate((("plain", "plain"), ("resnet", "ResNet"))):
        x0, y0 = ml + k * (ml + pw + mr), mt
        for i in range(round(ymax / ystep) + 1):  # horizontal grid and the error ticks
            y = y0 + ph - ph * i * ystep / ymax
            d.line([(x0, y), (x0 + pw, y)], fill=(225, 225, 225))
            d.text((x0 - 6, y), f"{100 * i * ystep:g}", fill="black", font=small, anchor="rm")
        for i in range(int(xmax // xstep) + 1):  # the iteration ticks
            x = x0 + pw * i * xstep / xmax
            d.line([(x, y0 + ph), (x, y0 + ph + 4)], fill="black")
            d.text((x, y0 + ph + 6), f"{i * xstep:g}", fill="black", font=small, anchor="mt")
        d.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")
        d.text((x0 + pw / 2, y0 + ph + 24), "iterations", fill="black", font=small, anchor="mt")
        d.text((x0, y0 - 6), "error (%)", fill="black", font=small, anchor="lb")
        d.text((x0 + 8, y0 + 8), name, fill="black", font=font)
        legend_y = y0 + 8
        for net, c in curves.items():
            if not net.startswith(family):
                continue
            depth = int(net[len(family):])
            colour = COLOURS.get(depth, (40, 90, 200))

            def xy(key, c=c):
                return [(x0 + pw * it / xmax, y0 + ph - ph * min(e, ymax) / ymax)
                        for it, e in zip(c["iteration"], c[key])]
            if len(c["iteration"]) > 1:
                dashed(d, xy("train_error"), colour, 2)
                d.line(xy("test_error"), fill=colour, width=4, joint="curve")
            for (x, y), w in ((xy("train_error")[-1], 2), (xy("test_error")[-1], 3)):
                d.ellipse([x - w, y - w, x + w, y + w], fill=colour)  # the last epoch's
            d.line([(x0 + pw - 110, legend_y + 7), (x0 + pw - 86, legend_y + 7)], fill=colour,
                   width=4)
            d.text((x0 + pw - 80, legend_y), f"{name}-{depth}", fill="black", font=small)
            legend_y += 18
    img.save(path)
    return path


def report(args):
    curves = read_curves(args)
    if not curves:
        raise data.DataError(f"no finished run in {args.out}; run the bench first")
    print(f"\n{'net':<10} {'seeds':>5} {'train error':>12} {'test error':>11}   per seed "
          f"(train / test)")
    for net, c in curves.items():
        per_seed = ", ".join(f"{100 * a:.2f} / {100 * b:.2f}" for a, b in c["per_seed"])
        print(f"{net:<10} {c['seeds']:>5} {100 * c['train_error'][-1]:>11.2f}% "
              f"{100 * c['test_error'][-1]:>10.2f}%   {per_seed}")
    claims = verdict(curves)
    for c in claims:
        print(f"paper's claim: {c['claim']}: {'holds' if c['holds'] else 'does NOT hold'} here")
    png = draw_figure(curves, os.path.join(args.out, "fig6.png"),
                      f"He et al. Fig. 6 on {args.data}: {args.epochs} epoch"
                      f"{'s' if args.epochs != 1 else ''}, seeds "
                      f"{' '.join(map(str, args.seeds))}")
    summary = {"figure": png, "data": args.data, "epochs": args.epochs, "seeds": args.seeds,
               "limit": args.limit, "threads": args.threads,
               "command": " ".join(["python", *sys.argv]),
               "final": {net: {"train_error": c["train_error"][-1],
                               "test_error": c["test_error"][-1], "per_seed": c["per_seed"]}
                         for net, c in curves.items()},
               "verdict": claims}
    with open(os.path.join(args.out, "fig6.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"figure: {png}  table: {os.path.join(args.out, 'fig6.json')}")
    return summary


# ---------------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    p = data.ArgumentParser(description="He et al. 2015, Fig. 6: plain-20/56 and ResNet-20/56 "
                            "on real CIFAR-10 photographs, training and test error curves.")
    p.add_argument("--nets", nargs="+", default=list(NETS),
                   help=f"plainD / resnetD, CIFAR depths (default: {' '.join(NETS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="(default: 0)")
    p.add_argument("--epochs", type=int, default=EPOCHS,
                   help=f"each run's length; the lr steps keep §4.2's fractions (default: "
                   f"{EPOCHS})")
    p.add_argument("--data", default="cifar10-jpg",
                   help="cifar10-jpg (default) or any small set of resnet.py: fashion-mnist, "
                   "cifar10, ...")
    p.add_argument("--data-dir", default="../shared/data",
                   help="where the data set is (default: ../shared/data, from the repository root)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N images of each split (smoke tests)")
    p.add_argument("--device", default="cpu", help="(default: cpu, the machine measured)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; see the docstring: on this shared 2-core "
                   "machine 2 threads trained ~5x slower than 1)")
    p.add_argument("--log-every", type=int, default=20, help="resnet.py's progress lines")
    p.add_argument("--out", default=os.path.join("results", "resnet-fig6"),
                   help="the runs' parent folder (default: results/resnet-fig6)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs a kill left unfinished (finished ones are skipped)")
    p.add_argument("--plot-only", action="store_true",
                   help="no training: the figure, table and verdict from the runs in --out")
    p.add_argument("--init-stats", action="store_true",
                   help="no training: how much each net's logits at initialisation depend on "
                   "the input (a batch of 128 N(0, 1) images, training mode, per seed)")
    return p


def init_stats(args):
    """At initialisation (training mode, as the first step sees it): the logits' spread between
    inputs (std over the batch, mean over classes) against their input-independent part (std over
    classes of the batch-mean logit). A net whose outputs barely depend on its input starts with
    little to learn from."""
    rows = {}
    for net in args.nets:
        depth, plain = int(net[-2:]), net.startswith("plain")
        for seed in args.seeds:
            torch.manual_seed(seed)
            x = torch.randn(128, 3, 32, 32)
            with torch.no_grad():
                y = resnet.resnet(depth, 10, plain=plain).train()(x)
            between, common = y.std(0).mean().item(), y.mean(0).std().item()
            rows[f"{net}-seed{seed}"] = {"between_inputs": between, "input_independent": common}
            print(f"{net} seed {seed}: logits' std between inputs {between:.3f}, "
                  f"input-independent {common:.3f} ({common / between:.1f}:1)")
    return rows


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    data.check_positive(args, "epochs", "limit", "threads")
    for net in args.nets:
        net_flags(net)  # a bad name is refused before anything runs
    if args.init_stats:
        return init_stats(args)
    t0 = time.time()
    if not args.plot_only:
        torch.set_num_threads(args.threads)
        for seed in args.seeds:
            for net in args.nets:
                train(args, net, seed)
        print(f"resnet_fig6: trained in {(time.time() - t0) / 60:.1f} min", flush=True)
    return report(args)


if __name__ == "__main__":
    data.run_main(main, "resnet_fig6.py")
