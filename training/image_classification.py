"""Train the classic MNIST CNN and write it to the model repository as ONNX.

    python -m training.image_classification --data-dir ../shared/data/image_classification/mnist

The network is the one from pytorch/examples (two 3x3 convolutions, max pooling, dropout, two
dense layers). Input normalisation and the softmax live inside the exported graph, so the served
model takes pixels in [0, 1] (light ink on a dark background, as MNIST) and returns probabilities:
clients of the raw v2 endpoint never need to know MNIST's mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training import common
from training.idx import load_mnist

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
LABELS = [str(d) for d in range(10)]


@dataclasses.dataclass
class Config:
    data_dir: Path = field(
        default=Path("../shared/data/image_classification/mnist"), metadata={"help": "folder with the IDX .gz files"}
    )
    output_dir: Path = field(default=Path("models"), metadata={"help": "model repository root"})
    name: str = field(default="mnist", metadata={"help": "model name in the repository"})
    version: int = field(default=1, metadata={"help": "version folder to write"})
    epochs: int = 8
    batch_size: int = 128
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (one-cycle)"})
    weight_decay: float = 1e-4
    augment: bool = field(
        default=True, metadata={"help": "random affine warps (--no-augment: train on raw digits only)"}
    )
    seed: int = 1
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    ood: str = field(
        default="mnist-ood",
        metadata={"help": "the out-of-distribution companion named in model.json ('' for none; training/digit_ood.py)"},
    )
    smoke: bool = field(default=False, metadata={"help": "tiny subset, one epoch: checks the pipeline end to end"})


class Net(nn.Module):
    """pytorch/examples' MNIST CNN, with MNIST normalisation in front and softmax at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MNIST_MEAN) / MNIST_STD
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist(data_dir, split)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random affine warps (rotation, scale, shift, shear).

    Real client images go through a crop-and-centre step whose result is close to, but never exactly,
    MNIST's; training on slightly perturbed digits makes the model tolerant of that difference.
    """
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(-12, 12) * math.pi / 180
    scale = uniform(0.9, 1.1)
    shear = uniform(-0.15, 0.15)
    tx, ty = uniform(-0.1, 0.1), uniform(-0.1, 0.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def evaluate(model: Net, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            pred = model.logits(x[i : i + 1000].to(device)).argmax(1).cpu()
            correct += int((pred == y[i : i + 1000]).sum())
    return correct / len(x)


def onnx_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the exported artefact itself, the figure the service will actually deliver."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), 500):
        probs = session.run(None, {name: x[i : i + 500].numpy()})[0]
        correct += int((probs.argmax(1) == y[i : i + 500].numpy()).sum())
    return correct / len(x)


def model_config(cfg: Config) -> dict:
    return {
        "name": cfg.name,
        "task": "image-classification",
        "default": True,
        "description": "Handwritten digit classifier (classic MNIST CNN). Input: 28x28 grey pixels in "
        "[0, 1], light ink on dark, digit fitted in 20x20 and centred by centre of mass. "
        "Output: probabilities of the digits 0-9.",
        "platform": "onnx_onnxv1",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
        "max_batch_size": 64,
        # Measured with bench/run.py on 2 CPU cores: no fixed wait beats 2 ms at every concurrency.
        "dynamic_batching": {"max_queue_delay_ms": 0.0},
        "labels": LABELS,
        "parameters": {"preprocessing": "mnist", **({"ood": cfg.ood} if cfg.ood else {})},
    }


def train(cfg: Config, command: str = "") -> dict:
    common.seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    x_train, y_train = load_split(cfg.data_dir, "train")
    x_test, y_test = load_split(cfg.data_dir, "test")
    epochs = cfg.epochs
    if cfg.smoke:
        x_train, y_train, x_test, y_test = x_train[:1024], y_train[:1024], x_test[:512], y_test[:512]
        epochs = 1

    model = Net().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", unit="batch")
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb = x_train[idx]
            if cfg.augment:
                xb = augment(xb, generator)
            xb, yb = xb.to(device), y_train[idx].to(device)
            loss = F.cross_entropy(model.logits(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        acc = evaluate(model, x_test, y_test, device)
        tqdm.write(f"epoch {epoch}: test accuracy {acc:.4%}")
    train_seconds = time.perf_counter() - started

    model = model.cpu().eval()
    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    onnx_path = version_dir / "model.onnx"
    common.export_onnx(
        model,
        (x_test[:2],),
        onnx_path,
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
    )
    parity = common.check_parity(model, onnx_path, {"image": x_test[:16]})
    accuracy = onnx_accuracy(onnx_path, x_test, y_test)
    common.write_model_json(cfg.output_dir / cfg.name, model_config(cfg))
    meta = common.write_version_metadata(
        version_dir,
        metrics={
            "test_accuracy": round(accuracy, 4),
            "test_examples": len(x_test),
            "measured_on": "exported ONNX model in onnxruntime (CPU)",
            "onnx_vs_torch_max_abs_diff": parity,
        },
        dataset={
            "name": "MNIST",
            "train_examples": len(x_train),
            "test_examples": len(x_test),
            "source": "../shared/data/image_classification/mnist (IDX files, see its SOURCE.md)",
        },
        training={
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "device": str(device),
            "seconds": round(train_seconds, 1),
        },
        command=command,
    )
    print(f"wrote {onnx_path}: test accuracy {accuracy:.4%} (onnxruntime), parity {parity:.2e}")
    return meta


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return train(parse_args(argv), command=common.command_line("training.image_classification", argv))


if __name__ == "__main__":
    main()
