"""Train the bundled default model (edgeprune.zoo) on Fashion-MNIST and save safetensors.

    python scripts/train_bundled.py --arch fmnist_cnn --epochs 15 --out edgeprune/assets/fmnist_cnn.safetensors

Recipe: SGD momentum 0.9, nesterov, lr 0.05 cosine with one warm-up epoch, weight decay 5e-4,
label smoothing 0.1, random crop (pad 2) + horizontal flip, batch 128, seed 0. Needs the Debian
package dataset-fashion-mnist. Prints test top-1 after every epoch.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from edgeprune import zoo
from edgeprune.config import Preprocessing
from edgeprune.data import load_fashion_mnist
from edgeprune.models import save_safetensors


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with 2-pixel padding and horizontal flip; x is (B, C, H, W)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
    x = xp[:, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(b, generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


@torch.no_grad()
def evaluate(model, x, y, bs=1000) -> float:
    model.eval()
    correct = sum((model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum().item() for i in range(0, len(y), bs))
    return correct / len(y)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="fmnist_cnn")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a busy machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    pre = Preprocessing()
    train = load_fashion_mnist(None, "train", pre)
    test = load_fashion_mnist(None, "eval", pre)
    model = getattr(zoo, args.arch)()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warm = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    best = 0.0
    for epoch in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            x = augment(train.images[idx], g)
            loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, test.images, test.labels)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  test top-1 {acc:.4f}  {time.time() - t0:.0f}s", flush=True)
        best = max(best, acc)
    save_safetensors(model.eval(), args.out, metadata={"arch": f"edgeprune.zoo:{args.arch}", "test_top1": f"{acc:.4f}",
                                                       "epochs": str(args.epochs), "seed": str(args.seed)})
    print(f"saved {args.out}  final test top-1 {acc:.4f}")


if __name__ == "__main__":
    main()
