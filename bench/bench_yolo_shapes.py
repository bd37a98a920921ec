"""The offline YOLO figure: `python yolo.py --data shapes-det --quick` (extra flags are passed on),
timed (its 30 epochs of shapes pretraining included); prints the VOC07 mAP@0.5 on the shapes-det
quick test set (500 images), the wall time and the detection training images/s (data loading
included).

    OMP_NUM_THREADS=2 python bench/bench_yolo_shapes.py [--out runs/bench-yolo] [yolo.py flags]
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import yolo  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv:
        argv += ["--out", "runs/bench-yolo"]
    t0 = time.time()
    r = yolo.main(["--data", "shapes-det", "--quick", "--device", "cpu", *argv])
    wall = time.time() - t0
    m = r["metrics"]
    print(f"bench_yolo_shapes: mAP@0.5 (VOC07 11-point) {m['map']:.4f}  per class "
          + " ".join(f"{c} {a:.3f}" for c, a in zip(r["config"]["classes"], m["ap"]))
          + f"  wall {wall:.1f} s  train {m['train_images_per_s']:.0f} img/s  "
          f"threads {os.environ.get('OMP_NUM_THREADS', 'unset')}  args {' '.join(argv)}")
    return r


if __name__ == "__main__":
    main()
