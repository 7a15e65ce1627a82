"""Training equivalence: a small SaE-ResNet trained with FusedSaE and with the reference.

The data set is scikit-learn's handwritten digits (1797 8x8 images, shipped inside the
package). Both runs start from the same weights, see the same batches in the same order,
and differ only in the SaE blocks' implementation; the script prints both loss curves
and test accuracies and plots them. In fp32 any two runs that round differently drift
apart as training goes on, so a third run, the reference with every initial weight
nudged by one rounding (a relative 2^-24), shows how far apart rounding alone takes them.

    python examples/train_digits.py --epochs 8 --plot digits.png
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from sae_kernels.models import senetv2_resnet


@dataclasses.dataclass
class History:
    """Mean training loss per epoch, and the test accuracy after each epoch."""

    loss: list[float] = dataclasses.field(default_factory=list)
    accuracy: list[float] = dataclasses.field(default_factory=list)


def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): images scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(len(x) * (1 - test_fraction))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def train(fused: bool, epochs: int = 8, batch_size: int = 64, base_width: int = 32,
          limit: int | None = None, dtype: torch.dtype = torch.float32,
          nudge: float = 0.0, seed: int = 0) -> History:
    """Trains a depth-18 SaE-ResNet (CIFAR stem, 1 input channel) with SGD + momentum.

    ``limit`` keeps only the first ``limit`` training images (for a quick run); ``nudge``
    multiplies each initial weight by ``1 + nudge * noise`` (standard normal noise).
    """
    x_train, y_train, x_test, y_test = digits()
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    torch.manual_seed(seed)
    model = senetv2_resnet(18, num_classes=10, cifar=True, fused=fused, in_channels=1,
                           base_width=base_width, reduction=8).to(dtype)
    noise = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + nudge * torch.randn(p.shape, generator=noise, dtype=dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = torch.Generator().manual_seed(seed)
    history = History()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=batches)
        total = 0.0
        for start in range(0, len(order) - batch_size + 1, batch_size):  # whole batches
            index = order[start:start + batch_size]
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.loss.append(total / (len(order) // batch_size * batch_size))
        model.eval()
        with torch.no_grad():
            predicted = model(x_test).argmax(1)
        history.accuracy.append((predicted == y_test).float().mean().item())
    return history


def plot(runs: dict[str, History], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for (label, history), style in zip(runs.items(), ("-", "--", ":"), strict=True):
        epochs = range(1, len(history.loss) + 1)
        left.plot(epochs, history.loss, style, marker="o", label=label)
        right.plot(epochs, history.accuracy, style, marker="o", label=label)
    left.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log")
    right.set(xlabel="epoch", ylabel="test accuracy")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle("SaE-ResNet-18 on scikit-learn digits: fused vs reference, same seed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--plot", metavar="FILE.png", help="write the two curves as a PNG")
    args = parser.parse_args()
    runs = {"reference SaE": train(False, args.epochs),
            "FusedSaE": train(True, args.epochs),
            "reference SaE, weights nudged": train(False, args.epochs, nudge=2.0**-24)}
    names = list(runs)
    print(f"{'epoch':>5}" + "".join(f"  loss / acc: {name:<30}" for name in names))
    for e in range(args.epochs):
        print(f"{e + 1:>5}" + "".join(f"  {runs[n].loss[e]:>8.5f} / {runs[n].accuracy[e]:.3f}"
                                      f"{'':<25}" for n in names))
    reference = runs[names[0]]
    for name in names[1:]:
        drift = max(abs(a - b) / b for a, b in zip(runs[name].loss, reference.loss, strict=True))
        print(f"largest relative loss difference, {name} vs reference: {drift:.3f}")
    if args.plot:
        plot(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
