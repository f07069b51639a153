"""DCGANModule: the 2014 GAN (two MLPs) and DCGAN, trained against each other, with quality metrics.

Each step (Lightning manual optimisation, two Adam optimisers): D learns to tell real images from
G's samples (binary cross-entropy), then G learns to fool the updated D, with the non-saturating
loss -log D(G(z)) of Goodfellow et al. (or the original minimax log(1 - D(G(z)))).

Quality, measured offline every validation epoch on G's samples against the real val images:
- `val/fid`: Fréchet distance between real and generated features (`fid_samples` generated
  samples, default one per real image). `test/fid` scores fresh noise (`eval_seeds`: val and
  test never share a latent vector) against the data module's test reference, and
  `test/fid_floor` is the FID between two disjoint real sets of the same size (the reference and
  the batches marked `floor`): what a perfect G would score with these sample counts. For the
  embedded digits the features are the penultimate layer of a digits classifier (TransferClassifier, digits_cnn, 10
  classes; `classifier_weights`), the usual MNIST stand-in for Inception. For real data
  (`fid_features: inception`), the standard Inception FID and `val/inception_score` when
  torch-fidelity and its weights are present; otherwise a warning and NaN, not a crash.
- `val/digit_confidence`: the classifier's mean top-class probability on samples (legibility).
- `val/class_entropy`: entropy of the predicted-class histogram; ln 10 = 2.303 is uniform, mode
  collapse shows as a drop.
Pictures: a fixed-noise sample grid and a latent interpolation every epoch; `predict` writes
each sample as a PNG plus a grid.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.utils import make_grid

from datamodules.digits import DIGITS_MEAN, DIGITS_STD
from lit_modules.callbacks import can_fuse, check_choice, log_train_terms
from lit_modules.guard import NonFinitePolicy, finite_loss
from lit_modules.nets.gan_nets import DigitsJudge, build_discriminator, build_generator
from lit_modules.visual import log_picture, run_dir

ARCHS = ("dcgan", "mlp")
G_LOSSES = ("non_saturating", "minimax")
FID_FEATURES = ("digits", "inception", "none")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
# Frozen feature extractors: rebuilt from their own files, never saved in a GAN checkpoint.
_UNSAVED = (
    "judge.",
    "val_fid.inception.",
    "test_fid.inception.",
    "test_fid_floor.inception.",
    "val_is.",
    "test_is.",
)
# Latent streams of the evaluation stages: sample i of stage s is drawn from seed
# (sample_seed * 1_000_003 + STAGE_STREAM[s] + i) mod 2**32, so val and test never share a
# vector (up to 500,009 samples a stage): the test FID is not the val FID of the checkpoint it
# chose. The seeds stay below 2**32 because torch's CPU generator (mt19937) keeps only a seed's
# low 32 bits: a test stream at 2**40 drew val's very vectors. Predict keeps its stream.
STAGE_STREAM = {"val": 0, "test": 1 << 31, "predict": 500_009}
SEED_SPACE = 1 << 32  # distinct mt19937 seeds


def eval_seeds(sample_seed: int, stage: str, indices: list[int]) -> list[int]:
    """The latent seeds of samples `indices` of an evaluation `stage` (val, test or predict)."""
    base = sample_seed * 1_000_003 + STAGE_STREAM[stage]
    return [(base + i) % SEED_SPACE for i in indices]


def seeded_latents(seeds: list[int], latent_dim: int) -> torch.Tensor:
    """One N(0, 1) latent vector per seed, the same on any device: (len(seeds), latent_dim)."""
    g = torch.Generator()
    return torch.stack([torch.randn(latent_dim, generator=g.manual_seed(s)) for s in seeds])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, H, W) uint8 (no per-image stretch: 0 stays mid-grey)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (3, H', W') uint8 grid."""
    return make_grid(to_uint8(images), nrow=nrow, padding=2, pad_value=128)


# ----------------------------------------------------------------------------- metrics


class Precomputed(nn.Module):
    """The FID's "feature extractor" when the features are computed once outside it (the digits
    judge's, shared by the FID, the floor FID, confidence and class entropy): (B, D) -> (B, D)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class ClassEntropy(Metric):
    """Entropy (nats) of the histogram of predicted classes: ln K when G covers K classes evenly."""

    full_state_update = False

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state(
            "counts", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, preds: torch.Tensor) -> None:
        self.counts += torch.bincount(preds.flatten(), minlength=self.num_classes).double()

    def compute(self) -> torch.Tensor:
        p = self.counts / self.counts.sum().clamp_min(1)
        return (-(p * p.clamp_min(1e-12).log()).sum()).clamp_min(0.0).float()  # no -0.0


def inception_fid(path: Path) -> FrechetInceptionDistance:
    """Inception FID (2048-d pool features, torch-fidelity's weights at `path`)."""
    return FrechetInceptionDistance(
        feature=2048, normalize=True, feature_extractor_weights_path=str(path)
    )


def inception_metrics(weights: str | None) -> tuple[Metric, Metric] | None:
    """Inception FID (2048-d pool features) and Inception Score, or None with a warning saying why."""
    try:
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.image.inception import InceptionScore
    except ImportError:
        rank_zero_warn(
            "fid_features inception: torch-fidelity is not installed (pip install torch-fidelity), "
            "so val/fid is NaN and no Inception Score is computed"
        )
        return None
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        rank_zero_warn(
            f"fid_features inception: the Inception weights {path} are not there (no network?), so "
            f"val/fid is NaN. Download {INCEPTION_URL} to {path}, or set model.inception_weights"
        )
        return None
    fid = inception_fid(path)
    net = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=["logits_unbiased"],
        feature_extractor_weights_path=str(path),
    )
    return fid, InceptionScore(feature=net, normalize=True)


# ----------------------------------------------------------------------------- module


class DCGANModule(LightningModule):
    monitor = ("val/fid", "min")  # what the best checkpoint tracks

    def __init__(
        self,
        arch: Literal["dcgan", "mlp"] = "dcgan",
        image_size: int = 32,
        channels: int = 1,
        latent_dim: int = 100,
        g_width: int = 64,
        d_width: int = 64,
        mlp_g_hidden: tuple[int, ...] = (1200, 1200),
        mlp_d_hidden: tuple[int, ...] = (240, 240),
        maxout_pieces: int = 5,
        d_dropout: float = 0.2,
        lr: float = 2e-4,
        beta1: float = 0.5,
        g_loss: Literal["non_saturating", "minimax"] = "non_saturating",
        fid_features: Literal["digits", "inception", "none"] = "digits",
        classifier_weights: str | None = "runs/weights/digits_classifier.pt",
        inception_weights: str | None = None,
        num_grid_samples: int = 64,
        interpolation_rows: int = 8,
        interpolation_steps: int = 10,
        sample_seed: int = 0,
        fid_samples: int | None = None,
        ema_decay: float | None = None,
        nonfinite_loss: NonFinitePolicy = "stop",
    ) -> None:
        """
        Args:
            nonfinite_loss: a NaN / Inf loss `stop`s training (naming the step and the term)
                or `skip`s the step, counted in train/skipped_steps (lit_modules/guard.py).
            arch: `dcgan` (convolutional, Radford et al.) or `mlp` (Goodfellow et al. 2014).
            g_width / d_width: DCGAN channels of G's last / D's first hidden layer (64 in the paper).
            mlp_g_hidden / mlp_d_hidden: MLP hidden sizes (G ReLU, D maxout with `maxout_pieces`).
            lr, beta1: Adam for both nets (DCGAN: 2e-4, 0.5).
            g_loss: `non_saturating` (-log D(G(z))) or `minimax` (log(1 - D(G(z))), saturates).
            fid_features: `digits` (the classifier at `classifier_weights`; a missing file only
                warns and logs NaN), `inception` (torch-fidelity), or `none`.
            sample_seed: seeds the fixed grid noise and the evaluation noise (`eval_seeds`: val,
                test and predict draw from disjoint streams).
            fid_samples: generated samples per FID (val and test); null: one per real image of
                the stage's reference. The literature: 10,000 (CIFAR-10) to 50,000.
            ema_decay: if set, an exponential moving average of G's weights (decay per G step,
                e.g. 0.99; Yazici et al. 2019) is what samples: FID, confidence, pictures,
                predict. null: G itself. Training is unchanged either way.
        """
        super().__init__()
        check_choice("arch", arch, ARCHS)
        check_choice("g_loss", g_loss, G_LOSSES)
        check_choice("fid_features", fid_features, FID_FEATURES)
        if fid_features == "digits" and channels != 1:
            raise ValueError("fid_features digits scores 1-channel images: set channels: 1")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {ema_decay}")
        if fid_samples is not None and fid_samples < 2:
            raise ValueError(
                f"fid_samples must be >= 2 (an FID needs two) or null, got {fid_samples}"
            )
        self.save_hyperparameters()
        self.automatic_optimization = False  # two optimisers, stepped in turn in training_step
        self.generator = build_generator(
            arch=arch,
            latent_dim=latent_dim,
            channels=channels,
            image_size=image_size,
            width=g_width,
            mlp_hidden=tuple(mlp_g_hidden),
        )
        self.discriminator = build_discriminator(
            arch=arch,
            channels=channels,
            image_size=image_size,
            width=d_width,
            mlp_hidden=tuple(mlp_d_hidden),
            maxout_pieces=maxout_pieces,
            dropout=d_dropout,
        )
        # the averaged G (no gradients, never optimised), saved in checkpoints beside G
        self.generator_ema = None if ema_decay is None else copy.deepcopy(self.generator)
        if self.generator_ema is not None:
            self.generator_ema.requires_grad_(False)
        z = torch.randn(
            num_grid_samples, latent_dim, generator=torch.Generator().manual_seed(sample_seed)
        )
        self.register_buffer("fixed_z", z)  # (N, latent): the same grid every epoch
        self._num_real = 0  # reference images seen this evaluation epoch, on this rank
        self._num_floor = 0  # floor images (a second real set) seen this test epoch, on this rank
        self.judge: DigitsJudge | None = None
        self._build_metrics()
        self.register_state_dict_post_hook(_drop_unsaved)
        self.register_load_state_dict_pre_hook(_keep_current_unsaved)

    def _build_metrics(self) -> None:
        hp = self.hparams
        for stage in ("val", "test"):
            setattr(self, f"{stage}_fid", None)
            setattr(self, f"{stage}_is", None)
            setattr(self, f"{stage}_confidence", None)
            setattr(self, f"{stage}_entropy", None)
        self.test_fid_floor: FrechetInceptionDistance | None = None
        if hp.fid_features == "digits":
            if hp.classifier_weights is None or not Path(hp.classifier_weights).is_file():
                rank_zero_warn(
                    f"digits classifier {hp.classifier_weights} not found: val/fid, "
                    "val/digit_confidence and val/class_entropy are NaN. Train it with "
                    "`python scripts/train.py fit --config configs/gan/digits_classifier.yaml`"
                )
                return
            self.judge = DigitsJudge(hp.classifier_weights, mean=DIGITS_MEAN, std=DIGITS_STD)
            width = self.judge.num_features
            for stage in ("val", "test"):
                setattr(self, f"{stage}_fid", FrechetInceptionDistance(feature=Precomputed(width)))
                setattr(self, f"{stage}_confidence", MeanMetric())
                setattr(self, f"{stage}_entropy", ClassEntropy(10))
            self.test_fid_floor = FrechetInceptionDistance(feature=Precomputed(width))
        elif hp.fid_features == "inception":
            for stage in ("val", "test"):
                pair = inception_metrics(hp.inception_weights)
                if pair is None:
                    return
                setattr(self, f"{stage}_fid", pair[0])
                setattr(self, f"{stage}_is", pair[1])
            default = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
            self.test_fid_floor = inception_fid(Path(hp.inception_weights or default))

    # ------------------------------------------------------------------ checks

    def setup(self, stage: str) -> None:
        dm, hp = self.trainer.datamodule, self.hparams
        for name in ("channels", "image_size"):
            value = getattr(dm, name, None)
            if isinstance(value, int) and value != hp[name]:
                raise ValueError(
                    f"the data has {name} {value} but model.{name} is {hp[name]}: "
                    f"set --model.init_args.{name} {value}"
                )
        # DDP without find_unused_parameters needs every parameter to get a gradient in every
        # backward: D's step then also backpropagates into G (G's gradient is discarded).
        self._touch_all = self.trainer.world_size > 1

    def _images(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, dict):  # a test batch with floor images: {"image", "floor"}
            batch = batch["image"]
        x = batch[0] if isinstance(batch, list | tuple) else batch  # (B, C, S, S) in [-1, 1]
        hp = self.hparams
        if x.ndim != 4 or x.shape[1:] != (hp.channels, hp.image_size, hp.image_size):
            raise ValueError(
                f"expected images of shape (B, {hp.channels}, {hp.image_size}, {hp.image_size}), "
                f"got {tuple(x.shape)}"
            )
        return x

    # ------------------------------------------------------------------ sampling

    @property
    def sampler(self) -> nn.Module:
        """The G that samples for evaluation, pictures and predict: the average if kept."""
        return self.generator if self.generator_ema is None else self.generator_ema

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.sampler(z)  # (B, C, S, S) in [-1, 1]

    @torch.no_grad()
    def _update_ema(self) -> None:
        """generator_ema <- decay * generator_ema + (1 - decay) * generator; BatchNorm's running
        statistics are copied (G samples in eval mode with the averaged weights)."""
        ema, g = self.generator_ema, self.generator
        for p_ema, p in zip(ema.parameters(), g.parameters(), strict=True):
            p_ema.lerp_(p, 1 - self.hparams.ema_decay)
        for b_ema, b in zip(ema.buffers(), g.buffers(), strict=True):
            b_ema.copy_(b)

    def _seeded_z(self, seeds: list[int]) -> torch.Tensor:
        """One latent vector per seed (the same on any device): (len(seeds), latent_dim)."""
        return seeded_latents(seeds, self.hparams.latent_dim).to(self.device)

    # ------------------------------------------------------------------ training

    def _d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)  # (B,) logits each
        loss = F.binary_cross_entropy_with_logits(
            d_real, torch.ones_like(d_real)
        ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        return loss, d_real.detach(), d_fake.detach()

    def _g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        logits = self.discriminator(fake)  # (B,)
        if self.hparams.g_loss == "minimax":  # minimise log(1 - D(G(z))) = -softplus(logit)
            return -F.softplus(logits).mean()
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # -log D(G(z))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = self._images(batch)
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], self.hparams.latent_dim, device=self.device)
        fake = self.generator(z)  # (B, C, S, S)
        touch_all = getattr(self, "_touch_all", False)
        # 1. D: real -> 1, fake -> 0 (G's output detached unless DDP needs every gradient)
        loss_d, d_real, d_fake = self._d_loss(real, fake if touch_all else fake.detach())
        if not finite_loss(self, {"d_loss": loss_d}, self.hparams.nonfinite_loss):
            return  # skipped: neither net is updated
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d, retain_graph=touch_all)
        opt_d.step()
        # 2. G: fool the D just updated. D's weight gradients of this pass would be discarded
        # (cleared before D's next step), so D is frozen for it unless DDP needs them all
        with frozen(self.discriminator, not touch_all):
            loss_g = self._g_loss(fake)
        if not finite_loss(self, {"g_loss": loss_g}, self.hparams.nonfinite_loss):
            return  # D has stepped; G's update is skipped
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        if self.generator_ema is not None:
            self._update_ema()
        terms = {"d_loss": loss_d, "g_loss": loss_g}
        terms |= {"d_real": d_real.sigmoid().mean(), "d_fake": d_fake.sigmoid().mean()}
        log_train_terms(self, terms, prog_bar=("d_loss", "g_loss"))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        betas = (hp.beta1, 0.999)
        # Fused (one kernel per optimiser step instead of one per tensor): the for-loop Adam
        # was 12% of a DCGAN step with G at width 64 (torch profiler, bf16)
        nets = (self.generator, self.discriminator)
        return [
            torch.optim.Adam(
                net.parameters(), lr=hp.lr, betas=betas, fused=can_fuse(net.parameters())
            )
            for net in nets
        ]

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        """Real images: the reference of the stage's FID, or (test batches that mark them
        `floor`) the second real set of the floor FID."""
        images = self._images(batch)
        floor = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        if isinstance(batch, dict) and "floor" in batch:
            floor = batch["floor"].bool()  # (B,)
        self._num_real += int((~floor).sum())
        self._num_floor += int(floor.sum())
        fid = getattr(self, f"{stage}_fid")
        floor_fid = self.test_fid_floor if stage == "test" else None
        if fid is None:
            return
        # float32 under any training precision (bf16-mixed autocasts the *_step hooks; the
        # epoch-end hooks that sample run outside it): the scores measure G, not the measuring
        with torch.autocast(self.device.type, enabled=False):
            x = self._fid_input(images, stage)  # judge features (B, 256), or Inception's images
            if (~floor).any():
                fid.update(x[~floor], real=True)
                if floor_fid is not None:
                    floor_fid.update(x[~floor], real=True)
            if floor.any() and floor_fid is not None:
                floor_fid.update(x[floor], real=False)

    def _fid_input(self, images: torch.Tensor, stage: str) -> torch.Tensor:
        """What the FID metrics take: the judge's features (one pass, shared), or images."""
        return self.judge(images) if self.judge is not None else self._to_inception(images, stage)

    def _to_inception(self, images: torch.Tensor, stage: str) -> torch.Tensor:
        if getattr(self, f"{stage}_is") is None:
            return images
        return (images.expand(-1, 3, -1, -1) + 1) / 2  # Inception wants [0, 1] RGB

    @torch.no_grad()
    def _score_samples(self, stage: str) -> None:
        """G's samples against the real images seen: `fid_samples` samples (default one per real
        image), sample i from `eval_seeds(sample_seed, stage, [i])`, rank r making samples r,
        r + W, r + 2W, ... So the samples, and the scores, are the same on 1 or W processes, every
        epoch is scored on the same latent vectors, and test never reuses val's."""
        fid = getattr(self, f"{stage}_fid")
        counts = torch.tensor([self._num_real, self._num_floor], device=self.device)
        num_real, num_floor = (int(v) for v in self.all_gather(counts).reshape(-1, 2).sum(0))
        self._num_real = self._num_floor = 0
        n = self.hparams.fid_samples or num_real
        if self.trainer.sanity_checking or self.trainer.fast_dev_run:
            n = num_real  # a smoke check, not a measurement: one sample per real image
        seeds = eval_seeds(
            self.hparams.sample_seed,
            stage,
            list(range(self.global_rank, n, self.trainer.world_size)),
        )
        inception_score = getattr(self, f"{stage}_is")
        chunk = 256  # samples per forward: memory only, the result does not depend on it
        for start in range(0, len(seeds), chunk):
            fake = self.sampler(self._seeded_z(seeds[start : start + chunk]))
            if inception_score is not None:
                inception_score.update(self._to_inception(fake, stage))
            x = self._fid_input(fake, stage) if fid is not None else None
            if fid is not None:
                fid.update(x, real=False)
            if self.judge is not None:
                top, pred = self.judge.classifier(x).softmax(1).max(1)  # (B,), (B,)
                getattr(self, f"{stage}_confidence").update(top)
                getattr(self, f"{stage}_entropy").update(pred)
        if fid is not None:
            self.log(f"{stage}/fid", fid)
        if stage == "test" and self.test_fid_floor is not None:
            if num_floor >= 2:
                self.log("test/fid_floor", self.test_fid_floor)  # logged metrics reset themselves
            else:
                self.test_fid_floor.reset()  # no floor set in this data: nothing to report
        if self.judge is not None:
            self.log(f"{stage}/digit_confidence", getattr(self, f"{stage}_confidence"))
            self.log(f"{stage}/class_entropy", getattr(self, f"{stage}_entropy"))

    def _eval_epoch_end(self, stage: str) -> None:
        self._score_samples(stage)
        if getattr(self, f"{stage}_fid") is None:  # the checkpoint monitor still finds its key
            self.log(f"{stage}/fid", float("nan"))
        inception_score = getattr(self, f"{stage}_is")
        if inception_score is not None:
            mean, _ = inception_score.compute()
            self.log(f"{stage}/inception_score", mean, sync_dist=False)
            inception_score.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")
        if not self.trainer.sanity_checking:
            self._log_pictures()

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    @torch.no_grad()
    def _log_pictures(self) -> None:
        """Fixed-noise grid and latent interpolations (DCGAN §6.1), on every rank."""
        hp = self.hparams
        n = len(self.fixed_z)
        if n:
            grid = image_grid(self.sampler(self.fixed_z), nrow=math.ceil(math.sqrt(n)))
            log_picture(self, "val/samples", grid, caption=f"epoch {self.current_epoch}")
        rows, steps = hp.interpolation_rows, hp.interpolation_steps
        if rows > 0 and steps > 1:
            ends = self._seeded_z([hp.sample_seed * 7919 + i for i in range(2 * rows)])  # (2R, L)
            t = torch.linspace(0, 1, steps, device=self.device).view(1, steps, 1)
            z = ends[:rows, None] * (1 - t) + ends[rows:, None] * t  # (R, T, L) straight lines
            images = self.sampler(z.reshape(rows * steps, -1))
            log_picture(self, "val/interpolation", image_grid(images, nrow=steps), "z1 -> z2")

    # ------------------------------------------------------------------ predict

    def on_predict_start(self) -> None:
        self._sample_dir = run_dir(self) / "samples"  # every rank: log_dir is a collective
        self._sample_dir.mkdir(parents=True, exist_ok=True)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        index = (batch[0] if isinstance(batch, list | tuple) else batch).flatten().cpu()  # (B,)
        seeds = eval_seeds(self.hparams.sample_seed, "predict", index.tolist())
        with torch.autocast(self.device.type, enabled=False):  # the same samples as val's G
            images = to_uint8(self.sampler(self._seeded_z(seeds)))  # (B, 3, S, S)
        if self.hparams.channels == 1:
            images = images[:, :1]
        for i, img in zip(index.tolist(), images, strict=True):
            torchvision.io.write_png(img, str(self._sample_dir / f"{i:06d}.png"))
        return {"index": index, "images": images}

    def on_predict_epoch_end(self) -> None:
        outputs = self.trainer.predict_loop.predictions
        if outputs and isinstance(outputs[0], list):
            outputs = outputs[0]
        if not outputs:
            return
        images = torch.cat([o["images"] for o in outputs]).float() / 127.5 - 1
        grid = image_grid(images, nrow=math.ceil(math.sqrt(len(images))))
        log_picture(self, "predict/samples", grid, caption="samples (this rank's)")

    def format_predictions(self, outputs: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
        """Rows of predictions.json: each sample's index and PNG (relative to the run dir)."""
        index = torch.cat([o["index"] for o in outputs]).tolist()
        return [{"index": i, "file": f"samples/{i:06d}.png"} for i in index]


@contextmanager
def frozen(net: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within: `net`'s parameters need no gradient (autograd skips their weight gradients but
    still backpropagates through `net` to its inputs); their previous flags are restored."""
    if not enabled:
        yield
        return
    flags = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _drop_unsaved(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
    """state_dict hook: the frozen feature extractors are not part of a GAN checkpoint."""
    for key in [k for k in state if k[len(prefix) :].startswith(_UNSAVED)]:
        del state[key]


def _keep_current_unsaved(
    module: nn.Module, state: dict[str, Any], prefix: str, *args: Any
) -> None:
    """load_state_dict pre-hook: the extractors keep the weights they were built with."""
    for name in {u.split(".")[0] for u in _UNSAVED}:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):  # its own state_dict: the root's drop hook does not run
            for key, value in child.state_dict(prefix=f"{name}.", keep_vars=True).items():
                if key.startswith(_UNSAVED):
                    state.setdefault(prefix + key, value)
