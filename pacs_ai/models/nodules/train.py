"""Train the ``lung-nodule-demo`` network on freshly generated phantoms, in one command::

    python -m pacs_ai.models.nodules.train --out pacs_ai/models/weights/lung_nodule_demo.pt

Each step draws new random patches (:func:`~pacs_ai.models.nodules.phantom.training_patch`,
seeds ``(1, --seed, n)``), so there is no data set to store and nothing is seen twice. The
loss is soft Dice, which ignores the imbalance of a few nodule voxels among many, plus binary
cross-entropy, which keeps gradients useful on patches without any nodule. At the end the
checkpoint goes through the shipped model's own ``predict`` on held-out phantoms (integer
seeds VALIDATION_SEEDS) and the Dice it reaches is written beside it, with what is needed
to reproduce the run, in ``<out>.json``.

The checkpoint is a plain state_dict (tensors only), loadable with ``weights_only=True``.
With the defaults the run takes 6-8 minutes on 2 CPU cores (1000 steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from pacs_ai.models.builtin.lung_nodule_demo import LungNoduleDemo
from pacs_ai.models.nodules import BASE_CHANNELS, HU_RANGE, SPACING_MM
from pacs_ai.models.nodules.phantom import as_volume, chest_phantom, training_patch
from pacs_ai.models.nodules.unet import UNet3D, channels_last, normalise, parameter_count

TRAINING_STREAM = 1
"""First element of every training seed tuple: keeps training phantoms apart from the
integer seeds used for validation and tests."""
VALIDATION_SEEDS = tuple(range(1000, 1008))
PATCH = (32, 64, 64)
DEFAULT_OUT = Path("pacs_ai/models/weights/lung_nodule_demo.pt")


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """Dice of two masks; 1.0 when both are empty (nothing to find, nothing found)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
    probability = torch.sigmoid(logits)
    # Over the whole batch, not per patch: a patch without a nodule has no Dice of its own.
    overlap = (probability * target).sum()
    soft_dice = 1 - (2 * overlap + 1) / (probability.sum() + target.sum() + 1)
    return soft_dice + F.binary_cross_entropy_with_logits(logits, target)


def batch(seed: int, first: int, size: int) -> tuple[Tensor, Tensor]:
    patches = [training_patch((TRAINING_STREAM, seed, first + i), PATCH) for i in range(size)]
    hu = torch.from_numpy(np.stack([p.hu for p in patches]))[:, None]
    mask = torch.from_numpy(np.stack([p.mask for p in patches]))[:, None].float()
    channels_last = torch.channels_last_3d
    return normalise(hu).contiguous(memory_format=channels_last), mask.contiguous(
        memory_format=channels_last
    )


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5 %, then cosine decay to 2 % of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def validate(weights: Path, seeds: Sequence[int] = VALIDATION_SEEDS) -> dict[str, float]:
    """Mean Dice of the model as shipped (resampling, windows, threshold) on held-out phantoms."""
    model = LungNoduleDemo(weights=weights)
    model.load("cpu")
    scores, found, true, false_positive = [], 0, 0, 0
    for seed in seeds:
        phantom = chest_phantom(seed)
        prediction = model.predict(as_volume(phantom))
        scores.append(dice(prediction.labelmap > 0, phantom.mask > 0))
        for nodule in phantom.nodules:
            true += 1
            centre = tuple(round(c) for c in nodule.center)
            found += int(prediction.labelmap[centre] > 0)
        for finding in prediction.findings:
            assert finding.center is not None
            false_positive += int(phantom.mask[finding.center] == 0)
    return {
        "dice": float(np.mean(scores)),
        "sensitivity": found / max(1, true),
        "false_positives_per_volume": false_positive / len(seeds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint path (.pt)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--held-out",
        type=int,
        choices=range(1, len(VALIDATION_SEEDS) + 1),
        default=len(VALIDATION_SEEDS),
        metavar=f"1..{len(VALIDATION_SEEDS)}",
        help="held-out phantoms scored after training (each ~5 s on a CPU)",
    )
    args = parser.parse_args(argv)
    held_out = VALIDATION_SEEDS[: args.held_out]

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net = channels_last(UNet3D(BASE_CHANNELS))
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    print(f"U-Net: {parameter_count(net)} parameters; {args.steps} steps of {args.batch}")
    started = time.perf_counter()
    running = 0.0
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        x, y = batch(args.seed, step * args.batch, args.batch)
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        running = 0.95 * running + 0.05 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1:5d}  loss {running:.3f}  {elapsed:.0f} s", flush=True)
    training_s = time.perf_counter() - started

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Plain tensors only: the file then loads with weights_only=True, no pickled code.
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, args.out)
    scores = validate(args.out, held_out)
    print(
        f"held-out Dice {scores['dice']:.3f} on seeds {held_out[0]}-"
        f"{held_out[-1]}; sensitivity {scores['sensitivity']:.2f}, "
        f"false positives per volume {scores['false_positives_per_volume']:.2f}"
    )
    metadata = {
        "model": "lung-nodule-demo",
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "training_seed": args.seed,
        "training_seeds": f"({TRAINING_STREAM}, {args.seed}, 0..{args.steps * args.batch - 1})",
        "steps": args.steps,
        "batch": args.batch,
        "patch": list(PATCH),
        "learning_rate": args.lr,
        "training_seconds": round(training_s),
        "held_out_seeds": list(held_out),
        "held_out": {k: round(v, 4) for k, v in scores.items()},
        "spacing_mm": list(SPACING_MM),
        "hu_range": list(HU_RANGE),
        "normalisation": "clip to hu_range, then map linearly to [-1, 1]",
        "base_channels": BASE_CHANNELS,
        "parameters": parameter_count(net),
        "torch": torch.__version__,
    }
    args.out.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} in {training_s:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
