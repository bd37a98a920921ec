"""The offline FCN figure: `python fcn.py --data shapes-seg --quick` (FCN-8s at width 1/8 with
batch norm, from scratch on the synthetic shapes-seg set, 2,000 training / 500 test images of
64x64, 7 classes), timed, with its mean IU against the all-background baseline and the
training images/s.

    OMP_NUM_THREADS=2 python bench/bench_fcn_shapes.py [extra fcn.py flags]
"""
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fcn  # noqa: E402


def main(argv=None):
    extra = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        r = fcn.main(["--data", "shapes-seg", "--quick", "--device", "cpu", "--out", out,
                      "--log-every", "1000", *extra])
        wall = time.time() - t0
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu.ru_utime + cpu.ru_stime
    cfg, m = r["config"], r["metrics"]
    images = cfg["epochs"] * min(cfg["limit"] or 2000, 2000)
    print(f"fcn{cfg['arch']} width {cfg['width']:g} on shapes-seg --quick: mean IU "
          f"{100 * m['mean_iou']:.2f}% (all-background {100 * m['baseline_mean_iou']:.2f}%), "
          f"pixel acc {100 * m['pixel_acc']:.2f}%, {wall:.0f} s wall, {cpu:.0f} s CPU, "
          f"{images / wall:.1f} training images/s (wall, evaluation included), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    return r


if __name__ == "__main__":
    main()
