"""``robustdeq demo``: classify CIFAR-10 test images and show the neural dynamics.

Prints, per image, the prediction read from the last-but-one state, the prediction
entropy at every state z[1..N] (paper 1, Eq. 6), the solver residuals, and what the
entropy-reduction defense (Algorithm 1) changes.
"""

from __future__ import annotations

import argparse
import time

import torch

from .data import CLASSES, load_cifar10
from .defense import entropy_reduction
from .models import create_model
from .training import train_clean


def _row(values) -> str:
    return " ".join(f"{v:5.2f}" for v in values)


def run_demo(args: argparse.Namespace) -> int:
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
