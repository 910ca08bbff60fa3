"""Train a class-conditional GAN on MNIST and write its generator to the model repository as ONNX.

    python -m training.image_generation --arch dcgan --threads 2

Two generators, one training loop. ``--arch mlp`` is the seeds' GAN: a generator 100-256-512-1024-784
(LeakyReLU, Tanh at the end) and a discriminator 784-1024-512-256 (LeakyReLU, dropout), both made
class-conditional: the generator takes a label embedding concatenated to ``z``, the discriminator
scores (image, digit) pairs with a projection head and also classifies real digits (an auxiliary
classifier, as in AC-GAN), whose loss the generator minimises on its own samples. ``--arch dcgan``
swaps both networks for small convolutional ones (transposed convolutions 7 -> 14 -> 28 in the
generator, strided convolutions in the discriminator), same conditioning, same losses. The generator
kept is an exponential moving average of the trained one; the epoch kept is the one with the lowest
Frechet distance on the validation digits (carved out of MNIST train, never trained on).

The exported graph takes ``z`` FP32 [batch, 100] (standard normal noise) and ``digit`` INT64 [batch]
(0-9) and returns ``image`` FP32 [batch, 1, 28, 28] in [0, 1], light ink on dark as MNIST.

It is scored on the exported graph with a classifier it never saw during training, the committed
digit classifier ``models/mnist/1/model.onnx`` (its 128-wide penultimate layer is exposed as an extra
output, in memory, for the features): the share of generated digits that read back as the asked
digit (1,000 per digit), the Frechet distance in that feature space against the MNIST test set, and
diversity (mean pairwise L2 distance of one digit's samples against the same for real test digits).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from training import common
from training.image_classification import load_split

LATENT_DIM = 100
EMBED_DIM = 50


@dataclasses.dataclass
class Config:
    data_dir: Path = field(
        default=Path("../shared/data/image_classification/mnist"), metadata={"help": "folder with the IDX .gz files"}
    )
    output_dir: Path = field(default=Path("models"), metadata={"help": "model repository root"})
    name: str = field(default="digit-generator", metadata={"help": "model name in the repository"})
    version: int = field(default=1, metadata={"help": "version folder to write"})
    arch: Literal["dcgan", "mlp"] = field(
        default="dcgan", metadata={"help": "mlp: the seeds' MLP GAN (conditioned); dcgan: small conditional conv GAN"}
    )
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = field(default=0.5, metadata={"help": "Adam beta1 (DCGAN's 0.5)"})
    aux_weight: float = field(
        default=1.0, metadata={"help": "weight of the auxiliary digit-classification loss (0: projection only)"}
    )
    ema: float = field(default=0.999, metadata={"help": "decay of the generator's weight average (0: off)"})
    validation: int = field(default=5000, metadata={"help": "MNIST train digits held out for choosing the epoch"})
    samples_per_digit: int = field(default=1000, metadata={"help": "generated digits per class for the test metrics"})
    evaluator: Path = field(
        default=Path("models/mnist/1/model.onnx"),
        metadata={"help": "classifier ONNX the GAN never trained with: readback and features"},
    )
    baseline: Path | None = field(
        default=None,
        metadata={"help": "metadata.json of a run of the other arch: compared with, recorded in this metadata"},
    )
    seed: int = 1
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    smoke: bool = field(
        default=False, metadata={"help": "tiny subset, one short epoch: checks the pipeline end to end"}
    )


# ---------------------------------------------------------------------------------------------- model


class MLPGenerator(nn.Module):
    """The seeds' generator 100-256-512-1024-784, with a label embedding concatenated to z."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, EMBED_DIM)
        self.net = nn.Sequential(
            nn.Linear(LATENT_DIM + EMBED_DIM, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, 512),
            nn.LeakyReLU(0.2),
            nn.Linear(512, 1024),
            nn.LeakyReLU(0.2),
            nn.Linear(1024, 784),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, self.embed(digit)], 1)).view(-1, 1, 28, 28)


class ConvGenerator(nn.Module):
    """DCGAN-style: z + label embedding -> 128x7x7 -> 64x14x14 -> 1x28x28 (batch norm, ReLU, Tanh)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.width = width
        self.embed = nn.Embedding(10, EMBED_DIM)
        self.fc = nn.Sequential(
            nn.Linear(LATENT_DIM + EMBED_DIM, 2 * width * 49, bias=False), nn.BatchNorm1d(2 * width * 49), nn.ReLU()
        )
        self.up = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, 1, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(digit)], 1)).view(-1, 2 * self.width, 7, 7)
        return self.up(h)


class Discriminator(nn.Module):
    """A trunk to features ``h``; a projection head for (image, digit) realness and a digit classifier."""

    def __init__(self, trunk: nn.Module, features: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.real = nn.Linear(features, 1)
        self.project = nn.Embedding(10, features)
        self.classify = nn.Linear(features, 10)

    def forward(self, x: torch.Tensor, digit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        realness = self.real(h).squeeze(1) + (self.project(digit) * h).sum(1)
        return realness, self.classify(h)


def mlp_discriminator() -> Discriminator:
    """The seeds' discriminator 784-1024-512-256 (LeakyReLU 0.2, dropout 0.3)."""
    trunk = nn.Sequential(nn.Flatten())
    for n_in, n_out in ((784, 1024), (1024, 512), (512, 256)):
        trunk.extend([nn.Linear(n_in, n_out), nn.LeakyReLU(0.2), nn.Dropout(0.3)])
    return Discriminator(trunk, 256)


def conv_discriminator(width: int = 64) -> Discriminator:
    trunk = nn.Sequential(
        nn.Conv2d(1, width, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Dropout(0.3),
        nn.Conv2d(width, 2 * width, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(2 * width * 49, 256),
        nn.LeakyReLU(0.2),
    )
    return Discriminator(trunk, 256)


def build(arch: str) -> tuple[nn.Module, Discriminator]:
    if arch == "mlp":
        return MLPGenerator(), mlp_discriminator()
    return ConvGenerator(), conv_discriminator()


class ExportGraph(nn.Module):
    """The served graph: Tanh's [-1, 1] mapped to pixels in [0, 1]."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        return (self.generator(z, digit) + 1.0) * 0.5


# ------------------------------------------------------------------------------------------ evaluator


class Evaluator:
    """The committed digit classifier in onnxruntime, with its penultimate layer as a second output."""

    def __init__(self, path: Path) -> None:
        model = onnx.load(str(path))
        nodes = {o: n for n in model.graph.node for o in n.output}
        # probabilities <- Softmax <- Gemm(fc2) <- features (the last hidden layer, after its ReLU)
        softmax = nodes[model.graph.output[0].name]
        last_dense = nodes[softmax.input[0]]
        self.feature_name = last_dense.input[0]
        model.graph.output.append(onnx.helper.make_tensor_value_info(self.feature_name, onnx.TensorProto.FLOAT, None))
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.path = path

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(predicted digits [n], features [n, d])`` for images [n, 1, 28, 28] in [0, 1]."""
        preds, feats = [], []
        for i in range(0, len(images), 1000):
            probs, f = self.session.run(None, {self.input: images[i : i + 1000].astype(np.float32)})
            preds.append(probs.argmax(1))
            feats.append(f.reshape(len(f), -1))
        return np.concatenate(preds), np.concatenate(feats).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets: |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = float(np.sqrt(np.clip(cross, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean L2 distance over all pairs of rows (pixels in [0, 1], flattened)."""
    x = x.reshape(len(x), -1).astype(np.float64)
    sq = (x**2).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None)
    upper = np.triu_indices(len(x), 1)
    return float(np.sqrt(d2[upper]).mean())


def diversity(generated: np.ndarray, gen_digits: np.ndarray, real: np.ndarray, real_digits: np.ndarray) -> dict:
    per_digit = {}
    for d in range(10):
        g = mean_pairwise_distance(generated[gen_digits == d])
        r = mean_pairwise_distance(real[real_digits == d])
        per_digit[str(d)] = {"generated": round(g, 3), "real": round(r, 3)}
    gen = float(np.mean([v["generated"] for v in per_digit.values()]))
    real_mean = float(np.mean([v["real"] for v in per_digit.values()]))
    return {
        "generated_mean_pairwise_l2": round(gen, 3),
        "real_test_mean_pairwise_l2": round(real_mean, 3),
        "ratio": round(gen / real_mean, 4),
        "per_digit": per_digit,
    }


def request_batch(samples_per_digit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``samples_per_digit`` requests for each digit, z drawn as the server draws it (numpy, standard normal)."""
    digits = np.repeat(np.arange(10, dtype=np.int64), samples_per_digit)
    z = np.random.default_rng(seed).standard_normal((len(digits), LATENT_DIM)).astype(np.float32)
    return z, digits


def generate_torch(generator: nn.Module, z: np.ndarray, digits: np.ndarray) -> np.ndarray:
    graph = ExportGraph(generator).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(z), 1000):
            out.append(graph(torch.from_numpy(z[i : i + 1000]), torch.from_numpy(digits[i : i + 1000])).numpy())
    return np.concatenate(out)


def generate_onnx(path: Path, z: np.ndarray, digits: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [session.run(None, {"z": z[i : i + 1000], "digit": digits[i : i + 1000]})[0] for i in range(0, len(z), 1000)]
    return np.concatenate(out)


def score(
    images: np.ndarray, digits: np.ndarray, evaluator: Evaluator, real_features: np.ndarray
) -> tuple[float, float, np.ndarray]:
    preds, feats = evaluator(images)
    return float((preds == digits).mean()), frechet_distance(feats, real_features), preds


# ------------------------------------------------------------------------------------------- training


def recalibrate_batch_norm(generator: nn.Module, batches: int, batch_size: int, seed: int) -> None:
    """Batch-norm statistics of the averaged generator measured on its own activations (the running
    statistics of the trained one belong to other weights)."""
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    g = torch.Generator().manual_seed(seed)
    generator.train()
    with torch.no_grad():
        for _ in range(batches):
            z = torch.randn(batch_size, LATENT_DIM, generator=g)
            generator(z, torch.randint(0, 10, (batch_size,), generator=g))
    generator.eval()


def fit(
    cfg: Config, x_fit: torch.Tensor, y_fit: torch.Tensor, x_val: torch.Tensor, evaluator: Evaluator, device
) -> tuple[nn.Module, list[dict]]:
    generator, discriminator = build(cfg.arch)
    generator, discriminator = generator.to(device), discriminator.to(device)
    average = copy.deepcopy(generator).eval()
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    rng = torch.Generator().manual_seed(cfg.seed)
    epochs = 1 if cfg.smoke else cfg.epochs
    steps = math.ceil(len(x_fit) / cfg.batch_size)
    _, val_features = evaluator(x_val.numpy())
    z_val, d_val = request_batch(max(20, len(x_val) // 20), cfg.seed + 1)  # 250 per digit
    history, best, best_fid = [], None, math.inf
    x_fit = x_fit * 2 - 1  # Tanh's range
    for epoch in range(1, epochs + 1):
        generator.train()
        discriminator.train()
        order = torch.randperm(len(x_fit), generator=rng)
        started, sums = time.perf_counter(), np.zeros(3)
        for step in range(steps):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            real, digits = x_fit[idx].to(device), y_fit[idx].to(device)
            n = len(idx)
            z = torch.randn(n, LATENT_DIM, generator=rng).to(device)
            asked = torch.randint(0, 10, (n,), generator=rng).to(device)
            fake = generator(z, asked)

            real_logit, real_class = discriminator(real, digits)
            fake_logit, _ = discriminator(fake.detach(), asked)
            loss_d = (
                F.binary_cross_entropy_with_logits(real_logit, torch.full_like(real_logit, 0.9))  # one-sided smoothing
                + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
                + cfg.aux_weight * F.cross_entropy(real_class, digits)
            )
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

            fake_logit, fake_class = discriminator(fake, asked)
            loss_adv = F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
            loss_cls = F.cross_entropy(fake_class, asked)
            loss_g = loss_adv + cfg.aux_weight * loss_cls
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()

            decay = min(cfg.ema, (1 + step + (epoch - 1) * steps) / (10 + step + (epoch - 1) * steps))
            with torch.no_grad():
                for p_avg, p in zip(average.parameters(), generator.parameters(), strict=True):
                    p_avg.lerp_(p, 1 - decay)
            sums += (loss_d.item(), loss_adv.item(), loss_cls.item())
            if step % 100 == 0:
                print(f"epoch {epoch} step {step}/{steps}: loss_d {loss_d.item():.3f} loss_g {loss_g.item():.3f}")
        seconds = time.perf_counter() - started

        candidate = copy.deepcopy(average).cpu()
        recalibrate_batch_norm(candidate, 20, 256, cfg.seed)
        images = generate_torch(candidate, z_val, d_val)
        readback, fid, _ = score(images, d_val, evaluator, val_features)
        sums /= steps
        record = {
            "epoch": epoch,
            "seconds": round(seconds, 1),
            "loss_d": round(float(sums[0]), 4),
            "loss_g_adversarial": round(float(sums[1]), 4),
            "loss_g_classification": round(float(sums[2]), 4),
            "validation_readback": round(readback, 4),
            "validation_fid": round(fid, 3),
        }
        history.append(record)
        print(json.dumps(record))
        if fid < best_fid:
            best, best_fid = candidate, fid
    return best, history


# ------------------------------------------------------------------------------------------ artefacts


def model_config(cfg: Config) -> dict:
    return {
        "name": cfg.name,
        "task": "image-generation",
        "default": True,
        "description": "Class-conditional GAN trained on MNIST: draws a handwritten digit. Inputs: z, standard "
        "normal noise [batch, 100]; digit, the class to draw (0-9). Output: a 28x28 grey image in [0, 1], "
        "light ink on dark (MNIST's polarity).",
        "platform": "onnx_onnxv1",
        "inputs": [
            {"name": "z", "datatype": "FP32", "shape": [-1, LATENT_DIM], "value_range": [-100.0, 100.0]},
            {"name": "digit", "datatype": "INT64", "shape": [-1], "value_range": [0, 9]},
        ],
        "outputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "max_batch_size": 64,
        "dynamic_batching": {"max_queue_delay_ms": 0.0},
        "parameters": {"latent_dim": LATENT_DIM},
    }


def headline(metrics: dict) -> dict:
    """The figures two runs are compared on."""
    return {
        "readback_accuracy": metrics["readback_accuracy"],
        "fid_test": metrics["fid_test"],
        "diversity_ratio": metrics["diversity"]["ratio"],
    }


def compare(cfg: Config, metrics: dict) -> dict:
    """This run against ``--baseline`` (the other arch): which measures better and why, with its figures."""
    other = json.loads(cfg.baseline.read_text())
    theirs, ours = headline(other["metrics"]), headline(metrics)
    other_arch = other["training"]["config"].get("arch", "?")
    better_readback = ours["readback_accuracy"] >= theirs["readback_accuracy"]
    better_fid = ours["fid_test"] <= theirs["fid_test"]
    if better_readback and better_fid:
        verdict = (
            f"{cfg.arch} measures better than {other_arch} on both headline figures: readback "
            f"{ours['readback_accuracy']:.4f} vs {theirs['readback_accuracy']:.4f}, FID {ours['fid_test']:.2f} vs "
            f"{theirs['fid_test']:.2f} (diversity ratio {ours['diversity_ratio']:.3f} vs "
            f"{theirs['diversity_ratio']:.3f})"
        )
    else:
        verdict = (
            f"{cfg.arch} does NOT measure better than {other_arch} on both figures (readback "
            f"{ours['readback_accuracy']:.4f} vs {theirs['readback_accuracy']:.4f}, FID {ours['fid_test']:.2f} vs "
            f"{theirs['fid_test']:.2f})"
        )
    return {
        "chosen_because": verdict,
        "this_arch_measures_better": better_readback and better_fid,
        "alternative": {
            "arch": other_arch,
            "metrics": {k: v for k, v in other["metrics"].items() if k != "history"},
            "command": other["training"]["command"],
            "seconds": other["training"].get("seconds"),
        },
    }


def train(cfg: Config, command: str = "") -> dict:
    common.seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    x_train, y_train = load_split(cfg.data_dir, "train")
    x_test, y_test = load_split(cfg.data_dir, "test")
    # Validation: a fixed random share of MNIST train, for choosing the epoch; never trained on.
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    val_idx, fit_idx = order[: cfg.validation], order[cfg.validation :]
    x_val, x_fit, y_fit = x_train[val_idx], x_train[fit_idx], y_train[fit_idx]
    samples_per_digit = cfg.samples_per_digit
    if cfg.smoke:
        x_fit, y_fit, x_val = x_fit[:512], y_fit[:512], x_val[:500]
        x_test, y_test = x_test[:1000], y_test[:1000]
        samples_per_digit = min(samples_per_digit, 50)
    evaluator = Evaluator(cfg.evaluator)

    started = time.perf_counter()
    generator, history = fit(cfg, x_fit, y_fit, x_val, evaluator, device)
    train_seconds = time.perf_counter() - started

    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    onnx_path = version_dir / "model.onnx"
    graph = ExportGraph(generator.cpu()).eval()
    z, digits = request_batch(samples_per_digit, cfg.seed + 2)
    example = (torch.from_numpy(z[:2]), torch.from_numpy(digits[:2]))
    common.export_onnx(
        graph,
        example,
        onnx_path,
        input_names=["z", "digit"],
        output_names=["image"],
        dynamic_axes={"z": {0: "batch"}, "digit": {0: "batch"}, "image": {0: "batch"}},
    )
    pick = np.arange(0, len(z), max(1, len(z) // 16))[:16]  # 16 rows over every digit
    parity = common.check_parity(
        graph, onnx_path, {"z": torch.from_numpy(z[pick]), "digit": torch.from_numpy(digits[pick])}
    )

    # Test metrics on the exported graph, against MNIST test (never used above).
    images = generate_onnx(onnx_path, z, digits)
    _, test_features = evaluator(x_test.numpy())
    readback, fid, preds = score(images, digits, evaluator, test_features)
    _, val_features = evaluator(x_val.numpy())
    test_readback_of_real = float((evaluator(x_test.numpy())[0] == y_test.numpy()).mean())
    metrics = {
        "measured_on": "exported ONNX model in onnxruntime (CPU); z from numpy's default_rng "
        f"(seed {cfg.seed + 2}), {samples_per_digit} samples per digit",
        "evaluator": f"{cfg.evaluator} (the committed digit classifier, trained apart from this GAN; "
        f"features: its penultimate layer {evaluator.feature_name}, {test_features.shape[1]} wide)",
        "generated_samples": len(z),
        "readback_accuracy": round(readback, 4),
        "readback_per_digit": {str(d): round(float((preds[digits == d] == d).mean()), 4) for d in range(10)},
        "evaluator_accuracy_on_real_test_digits": round(test_readback_of_real, 4),
        "fid_test": round(fid, 3),
        "fid_reference_real_validation_vs_test": round(frechet_distance(val_features, test_features), 3),
        "diversity": diversity(images, digits, x_test.numpy(), y_test.numpy()),
        "onnx_vs_torch_max_abs_diff": parity,
        "history": history,
    }
    if cfg.baseline is not None:
        metrics["comparison"] = compare(cfg, metrics)

    common.write_model_json(cfg.output_dir / cfg.name, model_config(cfg))
    meta = common.write_version_metadata(
        version_dir,
        metrics=metrics,
        dataset={
            "name": "MNIST",
            "split": {
                "fit": f"{len(x_fit)} MNIST train digits (train minus validation)",
                "validation": f"{len(x_val)} MNIST train digits (fixed random draw, seed 0): chooses the epoch",
                "test": f"{len(x_test)} MNIST test (t10k) digits: FID and diversity reference",
            },
            "source": "../shared/data/image_classification/mnist (IDX files, see its SOURCE.md)",
        },
        training={
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "device": str(device),
            "seconds": round(train_seconds, 1),
            "chosen_epoch": min(history, key=lambda r: r["validation_fid"])["epoch"],
            "generator_parameters": sum(p.numel() for p in generator.parameters()),
        },
        command=command,
    )
    print(
        f"wrote {onnx_path}: readback {readback:.4f}, FID {fid:.3f}, "
        f"diversity ratio {metrics['diversity']['ratio']:.3f}, parity {parity:.2e}"
    )
    return meta


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return train(parse_args(argv), command=common.command_line("training.image_generation", argv))


if __name__ == "__main__":
    main()
