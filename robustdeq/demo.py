"""``robustdeq demo``: classify CIFAR-10 test images and show the neural dynamics.

Prints, per image, the prediction read from the last-but-one state, the prediction
entropy at every state z[1..N] (paper 1, Eq. 6), the solver residuals, and what the
entropy-reduction defense (Algorithm 1) changes. With ``--plot`` it draws the README's
picture instead: the dynamics of a trained checkpoint on PGD inputs, with and without
Algorithm 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .data import CLASSES, load_cifar10
from .defense import entropy_reduction
from .models import create_model
from .training import train_clean


def _row(values) -> str:
    return " ".join(f"{v:5.2f}" for v in values)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Classify a few CIFAR-10 test images, print the prediction entropy at every "
        "state z[1..N] with and without the entropy-reduction defense."
    )
    p.add_argument("--model", default="deq-tiny", help="registered model name (see 'robustdeq models')")
    p.add_argument("--n", type=int, default=8, help="number of test images (default 8)")
    p.add_argument(
        "--train-steps",
        type=int,
        default=300,
        help="clean training steps before classifying (0 = random weights; default 300, ~30 s on 2 cores)",
    )
    p.add_argument("--T_f", type=int, default=2, help="defense: input update every T_f solver steps (default 2)")
    p.add_argument("--R", type=int, default=10, help="defense: entropy-descent steps per update (default 10)")
    p.add_argument(
        "--data",
        default=None,
        help="CIFAR-10 source: JPEG archive, cifar-10-batches-py folder, or "
        "'torchvision' (default: ../shared/data archive if present)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="draw the dynamics of --checkpoint on PGD-10 inputs with and without the defense into PNG "
        "(the README's picture: robustdeq demo --checkpoint "
        "training/shipped/deq-small-nfgsm-rs-long/model.pt --n 256 --plot docs/img/dynamics.png)",
    )
    p.add_argument("--checkpoint", default=None, help="with --plot: a model.pt written by 'robustdeq train'")


def run_demo(args: argparse.Namespace) -> int:
    if args.plot:
        return plot_dynamics(args)
    torch.manual_seed(args.seed)
    model = create_model(args.model)
    print(f"model {args.model}: {model.num_parameters():,} parameters, solver {model.solver_name}, N = {model.n_steps}")
    if args.train_steps > 0:
        train = load_cifar10("train", source=args.data)
        print(f"training {args.train_steps} clean steps on CIFAR-10 ({train.source}) so predictions mean something...")
        t0 = time.perf_counter()
        losses = train_clean(model, train.images, train.labels, args.train_steps, seed=args.seed, progress=True)
        print(f"  done in {time.perf_counter() - t0:.1f} s, final loss {sum(losses[-10:]) / min(10, len(losses)):.3f}")
    else:
        print("untrained (randomly initialised) model: predictions are arbitrary, the dynamics are real")
    model.eval()
    test = load_cifar10("test", source=args.data)
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(test), generator=gen)[: args.n]
    x, y = test.float_images(idx), test.labels[idx]
    with torch.no_grad():
        traj = model.trajectory(x)
        H = traj.entropies()
        pred = traj.predict()
    res = entropy_reduction(model, x, T_f=args.T_f, R=args.R)
    pred_def = res.trajectory.predict()
    H_def = res.entropy_after()
    N = traj.n_steps
    print(f"\nentropy H(z[t]) for t = 1..{N} (ln 10 = 2.30 is a uniform guess); readout state z[{N - 1}]")
    for i in range(args.n):
        print(f"#{int(idx[i]):5d} true {CLASSES[y[i]]:<10} plain -> {CLASSES[pred[i]]:<10} H: {_row(H[i].tolist())}")
        print(
            f"{'':24} defended -> {CLASSES[pred_def[i]]:<10} H: {_row(H_def[i].tolist())}"
            f"  |dx|inf {float(res.perturbation[i]) * 255:.1f}/255"
        )
    acc = (pred == y).float().mean().item()
    acc_def = (pred_def == y).float().mean().item()
    print(f"\nresidual ||f(z)-z||/||f(z)|| at z[{N - 1}]: median {traj.residuals[:, -2].median():.2e}")
    print(f"accuracy on these {args.n} images: plain {acc:.2f}, defended (T_f={args.T_f}, R={args.R}) {acc_def:.2f}")
    print(f"mean final-state entropy: plain {H[:, -1].mean():.3f}, defended {H_def[:, -1].mean():.3f}")
    return 0


def plot_dynamics(args: argparse.Namespace) -> int:
    """The README's picture: a checkpoint's dynamics z[1..N] on ready-made PGD-10 inputs (eps 8/255),
    plain and with Algorithm 1 (paper 1), beside the clean dynamics. Accuracy and entropy (Eq. 6)
    are read at every state of the same solves; one image shows the three inputs."""
    from .attacks import ready_made_pgd
    from .checkpoint import load_checkpoint
    from .defense import entropy_reduction

    if not args.checkpoint:
        raise ValueError("--plot needs --checkpoint (e.g. training/shipped/deq-tiny-trades-rs/model.pt)")
    model = load_checkpoint(args.checkpoint).build_model()
    test = load_cifar10("test", source=args.data, progress=False)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    x, y = test.float_images(idx), test.labels[idx]
    print(f"{model.name}: PGD-10 on {args.n} test images, then Algorithm 1 (T_f={args.T_f}, R={args.R})...")
    x_adv = ready_made_pgd(model, x, y, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        clean, attacked = model.trajectory(x), model.trajectory(x_adv)
    defended = entropy_reduction(model, x_adv, T_f=args.T_f, R=args.R)
    runs = {"clean": clean, "PGD": attacked, "PGD + Algorithm 1": defended.trajectory}
    k = model.readout_index()
    correct = {name: t.predict(k) == y for name, t in runs.items()}
    rescued = correct["clean"] & ~correct["PGD"] & correct["PGD + Algorithm 1"]
    example = int(rescued.nonzero()[0]) if bool(rescued.any()) else 0
    out = _draw_dynamics(model, runs, y, k, example, x, x_adv, defended.x_defended, args)
    acc = {name: float(c.float().mean()) for name, c in correct.items()}
    print(f"accuracy at z[{k}]: " + ", ".join(f"{name} {100 * a:.1f}%" for name, a in acc.items()))
    print(f"wrote {out}")
    return 0


def _draw_dynamics(model, runs, y, k, example, x, x_adv, x_def, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"clean": "tab:blue", "PGD": "tab:red", "PGD + Algorithm 1": "tab:green"}
    steps = torch.arange(1, model.n_steps + 1)
    fig = plt.figure(figsize=(13, 3.6))
    grid = fig.add_gridspec(1, 4, width_ratios=[1.1, 1, 1, 1], wspace=0.35)
    pics = grid[0].subgridspec(3, 1, hspace=0.45)
    for row, (name, images) in enumerate((("clean", x), ("PGD", x_adv), ("PGD + Algorithm 1", x_def))):
        ax = fig.add_subplot(pics[row])
        ax.imshow(images[example].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        label = CLASSES[int(runs[name].predict(k)[example])]
        ax.set_title(f"{name}: {label}", fontsize=8, color=colors[name])
        ax.axis("off")
    panels = [fig.add_subplot(grid[i]) for i in (1, 2, 3)]
    for name, traj in runs.items():
        probs = torch.stack([traj.probabilities(t)[example, y[example]] for t in steps.tolist()])
        acc = torch.stack([(traj.predict(t) == y).float().mean() for t in steps.tolist()])
        panels[0].plot(steps, probs.detach(), "o-", color=colors[name], label=name, ms=3)
        panels[1].plot(steps, 100 * acc, "o-", color=colors[name], label=name, ms=3)
        panels[2].plot(steps, traj.entropies().mean(0).detach(), "o-", color=colors[name], label=name, ms=3)
    titles = (
        f"this image: p(true class = {CLASSES[int(y[example])]})",
        f"accuracy at each state ({len(y)} images)",
        "mean prediction entropy (Eq. 6)",
    )
    for ax, title in zip(panels, titles):
        ax.axvline(k, color="grey", ls=":", lw=1)
        for t in range(args.T_f, model.n_steps + 1, args.T_f):  # z[t] is recomputed from the updated input
            ax.axvline(t - 0.5, color="tab:green", alpha=0.12, lw=6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("solver state z[t]")
        ax.set_xticks(steps.tolist())
    panels[1].set_ylabel("%")
    panels[0].legend(fontsize=7, loc="best")
    fig.suptitle(
        f"{model.name} on ready-made PGD-10 inputs (eps 8/255, not adaptive): readout state z[{k}] (dotted), "
        f"Algorithm 1's input updates before z[{args.T_f}], z[{2 * args.T_f}], ... (green bands; T_f = {args.T_f}, "
        f"R = {args.R})",
        fontsize=10,
    )
    out = Path(args.plot)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
