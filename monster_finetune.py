"""The lecture's fine-tuning example ("Monster"): the first layer of a trained AlexNet, a converter,
16 residual blocks, channel-wise average pooling and one linear layer, on CIFAR-10; the AlexNet
layer is frozen for the first half of training and fine-tuned after.

    python monster_finetune.py --pretrained                       # torchvision's AlexNet layer
    python monster_finetune.py --alexnet-weights runs/alexnet-imagenet/checkpoint.pt   # alexnet.py's
    python monster_finetune.py --pretrained --compare             # + never frozen + from scratch
    python monster_finetune.py --data shapes --quick --scratch    # offline smoke run
    torchrun --nproc_per_node=2 monster_finetune.py --pretrained  # data-parallel, same global batch

No paper figure: the lecture prints `test_error X% (errors/samples)` without a number to compare
with. Ours: see the README's results table (the command and hardware of every figure are there).

How a 32x32 image reaches the lecture's 7x7 final map: AlexNet's first layer is an 11x11
convolution with stride 4 and padding 2, so (32 + 2*2 - 11) // 4 + 1 = 7; no upscaling is needed,
and the rest of the network keeps 7x7 (3x3 convolutions with padding 1). The average pooling
window is computed from the input size, so other sizes work too.

Freezing (the lecture's freeze_features): the AlexNet layer's parameters get requires_grad=False
for the first --frozen-epochs epochs. They then have no gradient, so SGD leaves them untouched
(no weight decay or momentum moves a parameter without a gradient), and no memory or time is spent
on their gradients. After the frozen epochs they are trained with everything else.
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
import metrics

# ---------------------------------------------------------------------------------------------
# The lecture's defaults

EPOCHS, BATCH_SIZE, LR = 100, 64, 1e-2        # nb_epochs, batch_size, optim.SGD(lr=1e-2)
NB_RESIDUAL_BLOCKS, NB_CHANNELS = 16, 64
# --quick: the first 2,000 / 500 images, a smaller net and 10 epochs (310 steps at batch 64).
QUICK = {"blocks": 4, "channels": 16, "epochs": 20}
PAPER = {"reference": "EE-559 lecture, fine-tuning example (Monster)", "data": "cifar10",
         "test_error": None, "note": "the lecture gives no figure"}


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "inputs normalised with ImageNet's mean and deviation, which the trained AlexNet layer "
    "expects (the lecture feeds [0, 1] images)",
    "no AlexNet download at import: the layer comes from --pretrained or --alexnet-weights, and "
    "without either the script stops unless --scratch asks for a random first layer",
    "with --quick: 4 blocks of 16 channels on a small subset (CPU smoke runs only); without "
    "--pretrained or --alexnet-weights it trains the first layer from scratch",
    "grey images (MNIST, Fashion-MNIST) are replicated to 3 channels for the AlexNet layer; "
    "28x28 inputs give a 6x6 final map where 32x32 give 7x7",
]


# ---------------------------------------------------------------------------------------------
# Model

def make_resnet_block(nb_channels, kernel_size=3):
    """conv-BN-ReLU-conv-BN; the identity is added in Monster.forward (x + block(x))."""
    pad = (kernel_size - 1) // 2
    return nn.Sequential(nn.Conv2d(nb_channels, nb_channels, kernel_size, padding=pad),
                         nn.BatchNorm2d(nb_channels), nn.ReLU(inplace=True),
                         nn.Conv2d(nb_channels, nb_channels, kernel_size, padding=pad),
                         nn.BatchNorm2d(nb_channels))


class Monster(nn.Module):
    """features (AlexNet's conv1 + ReLU) -> converter (3x3 to nb_channels + ReLU) -> residual
    blocks in an nn.ModuleList -> average over the final map -> fc to the classes."""

    def __init__(self, nb_residual_blocks=NB_RESIDUAL_BLOCKS, nb_channels=NB_CHANNELS,
                 num_classes=10, alexnet_channels=64, image_size=32):
        super().__init__()
        # torchvision's AlexNet features[0]: Conv2d(3, 64, kernel_size=11, stride=4, padding=2)
        self.features = nn.Sequential(nn.Conv2d(3, alexnet_channels, 11, stride=4, padding=2),
                                      nn.ReLU(inplace=True))
        self.converter = nn.Sequential(nn.Conv2d(alexnet_channels, nb_channels, 3, padding=1),
                                       nn.ReLU(inplace=True))
        self.resnet_blocks = nn.ModuleList(make_resnet_block(nb_channels, 3)
                                           for _ in range(nb_residual_blocks))
        self.feature_map_size = (image_size + 2 * 2 - 11) // 4 + 1  # 7 for 32x32 (CIFAR)
        self.final_average = nn.AvgPool2d(self.feature_map_size)
        self.fc = nn.Linear(nb_channels, num_classes)

    def freeze_features(self, q):
        for p in self.features.parameters():
            p.requires_grad = not q  # frozen (q True): no gradient is needed

    def forward(self, x):
        x = self.converter(self.features(x))
        for b in self.resnet_blocks:
            x = x + b(x)
        return self.fc(self.final_average(x).flatten(1))


def alexnet_first_layer(args):
    """(weight, bias) of a trained AlexNet's first convolution: torchvision's weights
    (--pretrained) or a checkpoint (--alexnet-weights: torchvision's state_dict, or one written by
    alexnet.py, either variant). None with --scratch."""
    if args.pretrained:
        weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
        state = data.torchvision_weights(weights)
    elif args.alexnet_weights:
        state = data.load_checkpoint(args.alexnet_weights)
        state = state.get("model", state)
    else:
        return None
    for prefix in ("features.0.", "features.conv1."):  # torchvision layout, alexnet.py paper
        w, b = state.get(prefix + "weight"), state.get(prefix + "bias")
        if w is not None and b is not None:
            break
    else:
        raise data.DataError(f"{args.alexnet_weights or 'the weights'} hold no AlexNet first "
                             f"layer (features.0 or features.conv1); give an AlexNet checkpoint")
    if w.dim() != 4 or tuple(w.shape[1:]) != (3, 11, 11):
        raise data.DataError(f"the first layer in {args.alexnet_weights} is {tuple(w.shape)}, not "
                             f"AlexNet's (C, 3, 11, 11)")
    return w, b


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(net, loader, optimizer, scaler, args, device, epoch, progress):
    net.train()
    for x, y in loader:
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with data.autocast(device, args.amp):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # parameters without a gradient (frozen) are skipped
        scaler.update()
        progress.step(len(y) * args.world, loss, optimizer.param_groups[0]["lr"], epoch, n=len(y))
    return progress.epoch_loss()  # the losses read here, over every rank's samples


@torch.no_grad()
def evaluate(model, loader, args, device, num_classes):
    """The (unwrapped) model's figures on the whole set: under torchrun each rank evaluates its
    share and the outputs are gathered."""
    model.eval()
    probs, targets = [], []
    for x, y in loader:
        with data.autocast(device, args.amp):
            probs.append(model(x).float().softmax(1).cpu())
        targets.append(y.cpu())
    out, y = data.gather_shards(torch.cat(probs), torch.cat(targets))
    return metrics.classification_report(out, y, num_classes)


def classify(args, state, device):
    """--classify PATH (an image or a folder): the likeliest classes of each image through the
    checkpoint's network (its classes, ImageNet normalisation and 32x32 input; grey sets' images
    made grey, then replicated to the 3 channels as in training), the view of `evaluate`."""
    data.load_checkpoint(args.weights, "monster")  # a checkpoint of another network
    classes, (mean, std), shape = data.prediction_settings(state, args.weights)
    weights = state.get("model", state)
    model = Monster(args.blocks, args.channels, len(classes),
                    weights["features.0.weight"].shape[0], shape[1])
    data.load_weights(model, state, args.weights)
    model.to(device).eval()
    return data.classify_images(args.classify, args.out,
                                lambda x: model(x.to(device).expand(-1, 3, -1, -1)), classes,
                                mean, std, shape)


# ---------------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    p = data.ArgumentParser(description="The lecture's fine-tuning example: a trained AlexNet's "
                                "first layer, frozen then fine-tuned, under residual blocks.")
    data.add_data_args(p, "cifar10", "cifar10 | cifar100 | cifar10-jpg | shapes | folder:DIR "
                       "(your own DIR/train/<class>/*, DIR/val/<class>/* images, held at 32x32)")
    data.add_holdout_arg(p)
    data.add_limit_arg(p)
    p.add_argument("--alexnet-weights", default=None, metavar="PATH",
                   help="a trained AlexNet: torchvision's state_dict or an alexnet.py checkpoint")
    p.add_argument("--scratch", action="store_true",
                   help="no trained AlexNet: the first layer starts from a random init")
    p.add_argument("--frozen-epochs", type=int, default=None,
                   help="epochs with the AlexNet layer frozen (default: half of --epochs; 0: "
                   "never frozen)")
    p.add_argument("--compare", action="store_true",
                   help="also run the same recipe never frozen and from scratch, each in "
                   "OUT/<name>, and write OUT/comparison.json")
    p.add_argument("--blocks", type=int, default=None,
                   help=f"nb_residual_blocks (default: {NB_RESIDUAL_BLOCKS})")
    p.add_argument("--channels", type=int, default=None,
                   help=f"nb_channels (default: {NB_CHANNELS})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"(default: the lecture's {EPOCHS})")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"global batch size (default: {BATCH_SIZE})")
    p.add_argument("--lr", type=float, default=LR, help=f"SGD learning rate (default: {LR})")
    p.add_argument("--momentum", type=float, default=0.0, help="(default: 0, as the lecture)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="(default: 0, as the lecture)")
    data.add_classify_arg(p, needs="--weights")
    data.add_runtime_args(p, data.quick_help(QUICK) + "; without --pretrained or "
                          "--alexnet-weights, the first layer from scratch", workers=0,
                          workers_help="unused: the set is held on the device",
                          weights_help="a monster_finetune.py checkpoint to start from",
                          pretrained_help="torchvision's ImageNet AlexNet (IMAGENET1K_V1) for "
                          "the first layer (a base network: --eval-only needs --weights)")
    return p


def run(args):
    """One training run of the recipe in `args`; returns the results dict."""
    t0 = time.time()
    # the stages of the run (frozen, then fine-tuned), before --dry-run cuts --epochs to 1
    stages = (args.frozen_epochs > 0) + (args.frozen_epochs < args.epochs)
    device, rank, world, is_main = data.setup(args, "monster_finetune.py",
                                              pretrained_is_the_model=False)
    if args.dry_run:  # one epoch of 2 steps per stage the real run has
        args.epochs, args.frozen_epochs = stages, min(args.frozen_epochs, 1)
    if args.batch_size % args.world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the "
                             f"{args.world} processes")
    first = alexnet_first_layer(args)
    if first is None and not (args.scratch or args.weights):
        raise data.DataError("no trained AlexNet given: pass --alexnet-weights PATH (torchvision's "
                             "or alexnet.py's checkpoint) or --pretrained, or --scratch to train "
                             "the first layer from scratch")

    # Data: the whole set on the device. A trained AlexNet layer expects ImageNet's normalisation,
    # so its statistics are used (the lecture feeds ToTensor's [0, 1] images unnormalised).
    kw = dict(data_dir=args.data_dir, download=not args.no_download, quick=args.quick, size=32,
              limit=args.limit)
    # The lecture trains on the whole CIFAR-10 training set (50k); --holdout leaves its 5k val
    # split out (unused here: the script reports the test set only). --eval-only reads the test
    # split alone (no training image; the normalisation is ImageNet's, not the set's).
    x_test, y_test, classes = data.classification_arrays(args.data, "test", **kw)
    channels = x_test.shape[1]  # the set's own (1: grey), as a test input is made (checkpoint)
    x, y = x_test[:0], y_test[:0]  # --eval-only: an empty training split
    if not args.eval_only:
        x, y, _ = data.classification_arrays(args.data, data.train_split(args), **kw)
    if x.shape[1] == 1:  # grey images (MNIST, Fashion-MNIST) replicated to AlexNet's 3 channels
        x, x_test = x.expand(-1, 3, -1, -1).contiguous(), x_test.expand(-1, 3, -1, -1).contiguous()
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    info = {"classes": classes, "mean": mean, "std": std, "in_channels": channels,
            "image_size": x_test.shape[-1]}
    train_loader = None if args.eval_only else data.DeviceLoader(
        x, y, args.batch_size // args.world, True, device, mean, std, seed=args.seed,
        name=f"{args.data}'s training images")
    test_loader = data.DeviceLoader(x_test, y_test, 500, False, device, mean, std,
                                    name=f"{args.data}'s test images")
    train_loader, test_loader = data.dry_run_batches(args, train_loader, test_loader)

    # The first layer's width is the AlexNet's (torchvision's 64, the paper variant's 96), or with
    # --weights alone the checkpoint's own.
    saved = data.load_checkpoint(args.weights, "monster") if args.weights else None
    width = 64
    if first is not None:
        width = first[0].shape[0]
    elif saved is not None:
        conv1 = saved.get("model", saved).get("features.0.weight")
        if conv1 is None:
            raise data.DataError(f"{args.weights} holds no features.0 layer: not a network of "
                                 f"this script; pass a checkpoint monster_finetune.py wrote")
        width = conv1.shape[0]
    model = Monster(args.blocks, args.channels, len(classes), width, x.shape[-1])
    if first is not None:
        with torch.no_grad():
            model.features[0].weight.copy_(first[0])
            model.features[0].bias.copy_(first[1])
    if saved is not None:
        data.load_weights(model, saved, args.weights)
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Every parameter is in the optimizer from the start; while frozen the AlexNet layer has no
    # gradient, and SGD skips parameters whose .grad is None.
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)  # constant, as lecture
    scaler = data.grad_scaler(device, args.amp)
    source = ("torchvision's ImageNet AlexNet" if args.pretrained else args.alexnet_weights
              if args.alexnet_weights else "random init (--scratch)")
    config = {**vars(args), "sizes": {"train": len(y), "val": 0, "test": len(y_test)},
              "parameters": count_parameters(model), "alexnet_layer": source,
              "feature_map_size": model.feature_map_size, "departures": DEPARTURES}
    if is_main:
        print(f"monster_finetune.py: {args.blocks} blocks x {args.channels} channels on "
              f"{args.data} ({len(y)} train / {len(y_test)} test), first layer from {source}, "
              f"frozen for {args.frozen_epochs} of {args.epochs} epochs, "
              f"{config['parameters']:,} parameters, device {device}, {args.world} process(es)")
        for d in DEPARTURES:
            print(f"  departure from the lecture: {d}")

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, history = 0, []
    if args.resume:
        start_epoch, history = data.resume_training_state(ckpt_path, "monster", model, optimizer,
                                                          scheduler, scaler)

    if not args.eval_only:
        progress = metrics.Progress(len(train_loader), args.epochs, args.log_every,
                                    start_epoch=start_epoch, enabled=is_main, model=model)
        for epoch in range(start_epoch, args.epochs):
            frozen = epoch < args.frozen_epochs
            model.freeze_features(frozen)
            if epoch == start_epoch or (args.world > 1 and epoch == args.frozen_epochs):
                net = data.wrap(model, args)  # DDP registers the parameters that get gradients
            train_loader.set_epoch(epoch)
            loss = train_one_epoch(net, train_loader, optimizer, scaler, args, device, epoch,
                                   progress)
            scheduler.step()
            row = {"epoch": epoch + 1, "lr": progress.lr, "train_loss": loss, "frozen": frozen}
            if data.eval_due(args, epoch):  # --eval-every: as the final test; curves only
                row["test_error"] = evaluate(model, test_loader, args, device,
                                             len(classes))["test_error"]
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{args.epochs} train_loss {loss:.4f}"
                      f"{' (AlexNet layer frozen)' if frozen else ''}" +
                      (f" test_error {100 * row['test_error']:.2f}%" if "test_error" in row
                       else ""))
            data.save_training_state(ckpt_path, "monster", model, optimizer, scheduler, scaler,
                                     epoch, vars(args), history, **data.test_settings(info))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    test = evaluate(model, test_loader, args, device, len(classes))
    if is_main:  # the lecture's line
        print(f"test_error {100 * test['test_error']:.02f}% ({test['errors']}/{test['samples']})")
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "monster_finetune.py", args.data,
        {k: test[k] for k in ("test_error", "test_accuracy", "balanced_error")}, paper=PAPER,
        config=config, device=str(device), seconds=time.time() - t0, history=history,
        **metrics.class_records(test, classes)) if is_main else None
    return results


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = data.adopt_checkpoint(args, "monster_finetune.py", ("blocks", "channels"))
    data.check_positive(args, "batch_size", "epochs", "lr", "width", "img_size")
    data.check_task(args.data, "classification")
    if args.data == "imagenet":
        raise data.DataError("imagenet: the lecture's network takes small images held in memory; "
                             "use cifar10, cifar100, mnist, fashion-mnist or shapes")
    data.apply_quick(args, QUICK)
    args.blocks = args.blocks or NB_RESIDUAL_BLOCKS
    args.channels = args.channels or NB_CHANNELS
    args.epochs = args.epochs or EPOCHS
    if args.quick and not (args.pretrained or args.alexnet_weights or args.weights):
        args.scratch = True  # a smoke run needs no download; said in the first printed line
    if args.frozen_epochs is None:  # nb_epochs_frozen_features = nb_epochs // 2; nothing to
        args.frozen_epochs = 0 if args.scratch else args.epochs // 2  # keep from a random layer
    if args.pretrained and args.alexnet_weights:
        raise data.DataError("give either --pretrained or --alexnet-weights, not both")
    if args.classify:  # the user's images through the checkpoint's network: no data set read
        device = data.setup(args, "monster_finetune.py", pretrained_is_the_model=False).device
        return classify(args, state, device)
    if not args.compare:
        return run(args)
    # The comparison: the same recipe frozen-then-fine-tuned, never frozen, and from scratch,
    # each in its own folder under --out (default: data.setup's, runs/monster_finetune-DATA).
    out = args.out = args.out or data.default_out("monster_finetune.py", args.data)
    base = vars(args).copy()
    results = {}
    for name, change in (("finetune", {}), ("never_frozen", {"frozen_epochs": 0}),
                         ("scratch", {"scratch": True, "pretrained": False,
                                      "alexnet_weights": None, "frozen_epochs": 0})):
        a = argparse.Namespace(**{**base, **change, "out": os.path.join(out, name),
                                  "compare": False})
        r = run(a)
        if r is not None:
            results[name] = r["metrics"]["test_error"]
    if results:
        print("comparison (test error): " + ", ".join(f"{k} {100 * v:.2f}%"
                                                      for k, v in results.items()))
        metrics.write_results(os.path.join(out, "comparison.json"), "monster_finetune.py",
                              args.data, {f"{k}_test_error": v for k, v in results.items()},
                              paper=PAPER, config=base)
    return results


if __name__ == "__main__":
    data.run_main(main, "monster_finetune.py")
