"""One training step of every cnnlab module, two ways, for scripts/benchmark.py.

Each module and its DataModule are built from the topic's YAML config (class_path + init_args,
sizes overridden so a step stays small: no pretrained files, short train sets). The batches are
taken from the DataModule's train loader once, into a list, so data loading is in neither side
of a comparison. The plain step calls the module's own net and loss code (`module.net(images,
targets)` for Faster R-CNN, the FCN's criterion, the GAN's `_d_loss` / `_g_loss`, ...) and its
own `configure_optimizers`, stepped as Lightning's loop steps them: the same work minus the
Trainer. DeepMask's step is its `losses` (mask + score terms); Fast R-CNN's samples its RoIs
(`_sample`) and runs its RoI head and multi-task loss, as their training_steps do. The module's
`finite_loss` guard and `on_before_batch_transfer` label check run on both sides (a stub stands
in for the Trainer they read).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import importlib
import itertools
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml
from lightning.pytorch import (
    Callback,
    LightningDataModule,
    LightningModule,
    Trainer,
    seed_everything,
)
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.detection import MeanAveragePrecision

from lit_modules.detection import IOU_THRESHOLDS, MAP_KEYS, REC_THRESHOLDS
from lit_modules.gan import frozen
from lit_modules.guard import finite_loss
from lit_modules.nets.localization import box_loss, select_boxes
from lit_modules.nets.rcnn import detection_loss as roi_head_loss

ROOT = Path(__file__).resolve().parents[1]
_now = time.perf_counter


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds. CPU time of a 1-thread run barely moves when other jobs share the
    cores; wall time does, so both are kept."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


class EpochTimer(Callback):
    """(wall, CPU) seconds of each training epoch, hook to hook: the loop alone, no fit setup."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = clock()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.times.append(since(self._start))


def make_trainer(limit_batches: int | None, **kwargs: Any) -> Trainer:
    """A bare CPU Trainer: no logger, checkpoints, progress bar, summary or validation."""
    limit = limit_batches if limit_batches is not None else 1.0
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        limit_train_batches=limit,
        limit_val_batches=0,
        limit_test_batches=limit,
        **kwargs,
    )


def figure(a: str, a_s: float, b: str, b_s: float, ratio: float, repeats: int, load: float) -> dict:
    """One figure as bench.json keeps it: both times, their ratio, and what judges the noise."""
    return {
        a: a_s,
        b: b_s,
        "ratio": ratio,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


TEMPORARY = "<temporary folder>"  # a Spec value: build_data makes a fresh folder for it


@dataclass(frozen=True)
class Spec:
    """A module's config and what the benchmark overrides in it (sizes, files it cannot read)."""

    config: str
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    steps: int = 20  # steps per timed run at default settings (~1-2 s on one core)


SPECS = {
    "classification": Spec("configs/transfer/digits_scratch.yaml", steps=30),
    "detection": Spec(
        "configs/detection/digits_faster_rcnn.yaml",
        model={"weights_backbone": None, "num_sample_images": 0},
        steps=6,
    ),
    "segmentation": Spec(
        "configs/segmentation/digits_fcn8s.yaml", model={"num_sample_images": 0}, steps=16
    ),
    "gan": Spec(
        "configs/gan/digits_dcgan.yaml",
        model={"fid_features": "none", "classifier_weights": None, "num_grid_samples": 0},
        data={"check_images": False},
        steps=20,
    ),
    "localization": Spec(
        "configs/localization/digits_box_regressor.yaml",
        model={"weights": None, "num_sample_images": 0},
        steps=20,
    ),
    "deepmask": Spec(
        "configs/deepmask/digits_deepmask.yaml",
        # no trunk checkpoint on a fresh clone; no pictures or selective search (val / test only)
        model={"weights": None, "num_sample_images": 0, "compare_selective_search": False},
        steps=30,  # ~50 ms a step of 32 windows
    ),
    "fast_rcnn": Spec(
        "configs/rcnn/digits_fast_rcnn.yaml",
        model={"weights": None, "num_sample_images": 0},  # digits_source.pt: a demo's output
        # the config's proposal cache, in a temporary folder (nothing written into the clone):
        # the batches' first pass fills it (selective search: the first epoch's cost, reported
        # as first_pass_batch_s), the pipeline figure reads it as every later epoch does
        data={"cache_dir": TEMPORARY},
        steps=40,  # ~30 ms a step of 2 scenes x 64 RoIs
    ),
}


def _instantiate(node: dict[str, Any], overrides: dict[str, Any]) -> Any:
    module, _, name = node["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**(node.get("init_args") or {}) | overrides)


def _config(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / SPECS[name].config).read_text())


def build_module(name: str, seed: int, **model: Any) -> LightningModule:
    """The module from its YAML config, initialised from `seed`; `model` overrides init args."""
    torch.manual_seed(seed)
    return _instantiate(_config(name)["model"], SPECS[name].model | model)


def build_data(name: str, steps: int) -> LightningDataModule:
    """The DataModule from its YAML config, set up for fit; a train set of `steps` batches (where
    it has a train_length: scenes made on the fly) or its whole train split."""
    node = _config(name)["data"]
    args, overrides = node.get("init_args") or {}, dict(SPECS[name].data)
    for key, value in overrides.items():
        if value == TEMPORARY:  # a folder of this process's, removed at exit
            overrides[key] = folder = tempfile.mkdtemp(prefix=f"cnnlab-bench-{name}-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if "train_length" in args:  # only as many scenes as a run reads
        overrides["train_length"] = max(steps, 2) * args.get("batch_size", 8)
    dm = _instantiate(node, overrides)
    dm.setup("fit")
    return dm


def take_batches(dm: LightningDataModule, n: int) -> list[Any]:
    """The first `n` training batches, made once: the same list feeds both sides."""
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


class Batches:
    """The first `n` batches of `source` (a list or a loader) as one iterable with a length: a
    bare list would be read by Lightning as a list of loaders."""

    def __init__(self, source: Any, n: int | None = None) -> None:
        self.source, self.n = source, len(source) if n is None else n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.source), self.n)

    def __len__(self) -> int:
        return self.n


# ----------------------------------------------------------------------------- plain steps


def classification_loss(m: Any, batch: Any) -> torch.Tensor:
    x, y = batch  # (B, 1, 28, 28), (B,)
    logits = m.net.forward_head(m.net.forward_features(x))  # (B, K)
    loss = m.criterion(logits, y)
    finite_loss(m, {"loss": loss}, m.hparams.nonfinite_loss)
    m.train_acc.update(logits.detach(), y)
    return loss


def detection_loss(m: Any, batch: Any) -> torch.Tensor:
    images, targets = batch  # list of (3, H, W), list of dicts
    keep = [
        {"boxes": t["boxes"][~t["iscrowd"]], "labels": t["labels"][~t["iscrowd"]]} for t in targets
    ]
    losses = m.net(images, keep)  # RPN + RoI-head loss terms
    finite_loss(m, losses, m.hparams.nonfinite_loss)
    return sum(losses.values())


def segmentation_loss(m: Any, batch: Any) -> torch.Tensor:
    x, y = batch  # (B, 1, H, W), (B, H, W) int64
    loss = m.criterion(m(x), y)  # m(x): channels_last as the module does it
    finite_loss(m, {"loss": loss}, m.hparams.nonfinite_loss)
    return loss


def localization_loss(m: Any, batch: Any) -> torch.Tensor:
    images, targets = batch
    labels, boxes, hp = targets["labels"], targets["boxes"], m.hparams
    logits, offsets = m(images)  # (B, K), (B, 4)
    loss_cls = torch.nn.functional.cross_entropy(logits, labels)
    obj = labels > 0
    chosen = select_boxes(offsets[obj], labels[obj], m.net.per_class)  # (N, 4)
    loss_box = box_loss(chosen, boxes[obj], size=hp.input_size, kind=hp.box_loss)
    finite_loss(m, {"loss_cls": loss_cls, "loss_box": loss_box}, hp.nonfinite_loss)
    return loss_cls + hp.box_loss_weight * loss_box


def deepmask_loss(m: Any, batch: Any) -> torch.Tensor:
    x, target, y = batch  # windows (B, C, P, P), masks (B, m, m), labels (B,) +-1
    terms = m.losses(x, target, y)  # mask loss on positives + score_weight * score loss
    finite_loss(m, terms, m.hparams.nonfinite_loss)
    return terms["loss"]


def fast_rcnn_loss(m: Any, batch: Any) -> torch.Tensor:
    images, targets = batch  # list of (3, H, W), list of dicts with `proposals`
    rois, labels, reg = m._sample(targets)  # rois_per_image per image, fg_fraction foreground
    # training_step returns None on no RoIs; the gt boxes join the proposals, so a digits scene
    # (1-3 digits) always has some
    _, logits, deltas = m._roi_outputs(m._normalise(images), rois, train=True)
    losses = roi_head_loss(logits, deltas, labels, reg)  # cross-entropy + smooth L1
    finite_loss(m, losses, m.hparams.nonfinite_loss)
    return sum(losses.values())


def gan_step(m: Any, batch: Any, opts: list[torch.optim.Optimizer]) -> None:
    """DCGANModule.training_step's two manual updates: D on real vs detached fake, then G
    through a frozen D, then G's weight average if the config keeps one."""
    real = m._images(batch)  # (B, 1, 32, 32)
    opt_g, opt_d = opts
    z = torch.randn(real.shape[0], m.hparams.latent_dim)
    fake = m.generator(z)
    loss_d, _, _ = m._d_loss(real, fake.detach())
    finite_loss(m, {"d_loss": loss_d}, m.hparams.nonfinite_loss)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    with frozen(m.discriminator):
        loss_g = m._g_loss(fake)
    finite_loss(m, {"g_loss": loss_g}, m.hparams.nonfinite_loss)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    if m.generator_ema is not None:
        m._update_ema()


LOSSES: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "classification": classification_loss,
    "detection": detection_loss,
    "segmentation": segmentation_loss,
    "localization": localization_loss,
    "deepmask": deepmask_loss,
    "fast_rcnn": fast_rcnn_loss,
}


def stub_trainer(module: LightningModule, steps: int) -> None:
    """What configure_optimizers, finite_loss and the label checks read from a Trainer."""
    module.trainer = SimpleNamespace(  # type: ignore[assignment]
        estimated_stepping_batches=steps, num_training_batches=steps, accumulate_grad_batches=1,
        world_size=1, global_rank=0, predicting=False, datamodule=None, global_step=0,
        current_epoch=0, checkpoint_callback=None,
    )  # fmt: skip


def optimizers(module: LightningModule) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """The module's own configure_optimizers, unpacked as Lightning unpacks it."""
    out = module.configure_optimizers()
    if isinstance(out, dict):
        sched = out.get("lr_scheduler")
        return [out["optimizer"]], [sched["scheduler"] if isinstance(sched, dict) else sched]
    return (list(out), []) if isinstance(out, list | tuple) else ([out], [])


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def plain_step(
    name: str,
    module: LightningModule,
    batch: Any,
    opts: list[torch.optim.Optimizer],
    scheds: list[Any],
    bf16: bool = False,
) -> None:
    """One step of the plain loop: the label check, the step (under bf16 autocast if asked),
    zero_grad, backward, optimizer and per-step scheduler steps."""
    batch = module.on_before_batch_transfer(batch, 0)
    with autocast(bf16):
        if name == "gan":
            gan_step(module, batch, opts)
            return
        loss = LOSSES[name](module, batch)
    opts[0].zero_grad()
    loss.backward()
    opts[0].step()
    for s in scheds:
        s.step()


class PairedSteps(Callback):
    """Within one fit, after each of Lightning's steps, the plain loop's step of a twin module
    (same config and seed) on the same batch, timed. Lightning's own step is the time between
    two batch starts less that plain step: the two sides of a pair run ~one step apart, so the
    machine's slow spells (seconds long on a shared VM) hit both alike, where two whole runs a
    few seconds apart each catch their own."""

    def __init__(self, name: str, twin: LightningModule, batches: list[Any]) -> None:
        self.name, self.twin, self.batches = name, twin, batches
        stub_trainer(twin, len(batches))
        self.opts, self.scheds = optimizers(twin)
        twin.train()
        self.plain: list[float] = []
        self.lightning: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any
    ) -> None:
        now = _now()
        if self._start is not None:  # the previous step, hook to hook, less the twin's step
            self.lightning.append(now - self._start - self.plain[-1])
        self._start = now

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        start = _now()
        plain_step(self.name, self.twin, self.batches[idx], self.opts, self.scheds)
        self.plain.append(_now() - start)


def measure_paired_steps(
    name: str, batches: list[Any], seed: int, load: float, min_steps: int = 22, warmup: int = 2
) -> dict[str, Any]:
    """Trainer / plain per step, paired step by step in one fit (`PairedSteps`): the median of
    the per-step ratios, after `warmup` pairs, over at least `min_steps` steps (the batches
    cycled). The whole-run figure counts Trainer() and fit's setup too; this one is what a long
    run pays per step."""
    batches = [batches[i % len(batches)] for i in range(max(len(batches), min_steps))]
    module, twin = build_module(name, seed), build_module(name, seed)
    pairs = PairedSteps(name, twin, batches)
    gc.collect()
    make_trainer(None, max_epochs=1, callbacks=[pairs]).fit(module, Batches(batches))
    twin.trainer = None  # type: ignore[assignment]
    plain, light = pairs.plain[warmup : len(pairs.lightning)], pairs.lightning[warmup:]
    ratios = sorted(x / y for x, y in zip(light, plain, strict=True))
    p, lt = statistics.median(plain), statistics.median(light)
    out = figure("plain_step_s", p, "lightning_step_s", lt, statistics.median(ratios), 1, load)
    return out | {
        "pairs": len(ratios),
        "ratio_of_medians": lt / p,
        "ratio_q1": ratios[len(ratios) // 4],
        "ratio_q3": ratios[(3 * len(ratios)) // 4],
        "lightning_extra_ms": 1000 * (lt - p),
    }


def plain_loop(name: str, module: LightningModule, batches: Any, bf16: bool = False) -> dict:
    """Train on `batches` by hand: optimizers built, then per batch the label check, the step
    (under bf16 autocast if asked, as Lightning's bf16-mixed), zero_grad, backward, optimizer
    and per-step scheduler steps. Returns seconds: total, optimizer setup, and per step; and, for
    a real loader, the time spent in next(iterator)."""
    start, cpu_start = _now(), time.process_time()
    stub_trainer(module, len(batches))
    opts, scheds = optimizers(module)
    module.train()
    setup, cpu_loop, steps, waits = _now() - start, time.process_time(), [], []
    it = iter(batches)
    while True:
        t0 = _now()
        batch = next(it, None)
        if batch is None:
            break
        t1 = _now()
        plain_step(name, module, batch, opts, scheds, bf16)
        waits.append(t1 - t0)
        steps.append(_now() - t1)
    if name == "classification":  # the epoch-level train/acc Lightning computes and resets
        module.train_acc.compute()
        module.train_acc.reset()
    module.trainer = None  # type: ignore[assignment]
    cpu = time.process_time()
    return {
        "total": _now() - start, "setup": setup, "steps": steps, "waits": waits,
        "cpu": cpu - cpu_start, "cpu_loop": cpu - cpu_loop,
    }  # fmt: skip


def step_flops(name: str, module: LightningModule, batch: Any) -> int:
    """FLOPs of one forward + backward (FlopCounterMode: matmuls and convolutions; torchvision's
    RoIAlign / NMS and elementwise ops are not counted, so detection's figure is a lower bound)."""
    stub_trainer(module, 1)
    module.train()
    counter = FlopCounterMode(display=False)
    with counter:
        if name == "gan":
            gan_step(module, batch, [_NoStep(), _NoStep()])
        else:
            LOSSES[name](module, batch).backward()
    module.zero_grad(set_to_none=True)
    module.trainer = None  # type: ignore[assignment]
    return int(counter.get_total_flops())


class _NoStep:
    """An optimizer that does nothing: FLOPs of the GAN's forwards and backwards only."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def matmul_peak(n: int = 1024, repeats: int = 5) -> dict[str, float]:
    """The machine's practical peak: FLOP/s of an (n x n) @ (n x n) product, fp32 and bf16, best
    of `repeats` (after one warm-up), on this process's threads."""
    out = {"n": n, "repeats": repeats, "threads": torch.get_num_threads()}
    for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        times = []
        for _ in range(repeats):
            t0 = _now()
            a @ b
            times.append(_now() - t0)
        out[f"{key}_s"] = min(times)
        out[f"{key}_flops"] = 2 * n**3 / min(times)
    return out


def alternated(
    sides: dict[str, Callable[[], dict[str, Any]]], repeats: int
) -> dict[str, list[dict[str, Any]]]:
    """Each side's run `repeats` times, in the given order, then reversed, and so on: a machine
    that drifts during the measurement favours no side."""
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for r in range(repeats):
        for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            runs[side].append(sides[side]())
    return runs


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# ----------------------------------------------------------------------------- figures


def _lightning_run(name: str, batches: list[Any], seed: int) -> dict[str, float]:
    """Trainer(...) + fit on the batches (fp32): wall and CPU seconds in all and of the epoch."""
    module, timer = build_module(name, seed), EpochTimer()
    gc.collect()
    start = clock()
    trainer = make_trainer(None, max_epochs=1, callbacks=[timer])
    seed_everything(seed, verbose=False)  # same noise (GAN z, RPN / RoI sampling) as plain
    trainer.fit(module, train_dataloaders=Batches(batches))
    (wall, cpu), (loop, cpu_loop) = since(start), timer.times[0]
    return {"wall": wall, "cpu": cpu, "loop": loop, "cpu_loop": cpu_loop}


def _plain_run(
    name: str, batches: Any, seed: int, bf16: bool = False, **model: Any
) -> dict[str, Any]:
    module = build_module(name, seed, **model)
    gc.collect()
    seed_everything(seed, verbose=False)
    run = plain_loop(name, module, batches, bf16)
    return run | {"wall": run["total"], "loop": run["total"] - run["setup"]}


def measure_module(
    name: str,
    steps: int | None = None,
    repeats: int = 3,
    seed: int = 0,
    peak: dict | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Every step-level figure of one module, from one list of `steps` batches: Trainer vs plain
    loop and bf16 vs fp32 (plain fp32, Lightning, plain bf16, `repeats` times in alternating
    order after a 1-step warm-up of each), the data pipeline against training, and FLOP/s against `peak`."""
    steps = steps or SPECS[name].steps
    load = os.getloadavg()[0]
    dm = build_data(name, steps)
    steps = min(steps, len(dm.train_dataloader()))  # a fixed train split may be shorter
    start = _now()
    batches = take_batches(dm, steps)  # the loader's first pass: caches (if any) filled here
    first_pass = (_now() - start) / steps
    if warmup:  # allocator, oneDNN kernels, lazy imports
        _plain_run(name, batches[:1], seed)
        _lightning_run(name, batches[:1], seed)
        _plain_run(name, batches[:1], seed, bf16=True)
    runs = alternated(
        {
            "plain": lambda: _plain_run(name, batches, seed),
            "lightning": lambda: _lightning_run(name, batches, seed),
            "bf16": lambda: _plain_run(name, batches, seed, bf16=True),
        },
        repeats,
    )

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    def paired(a: str, b: str, key: str) -> float:  # median of the per-repeat ratios a / b
        return statistics.median(x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True))

    p, light = med("plain", "wall"), med("lightning", "wall")
    # headline: the median of each repeat's ratio (the two runs of a repeat are neighbours in
    # time, so machine-wide slow spells cancel; one run swings +-15% on a shared 2-core VM)
    pairs = zip(runs["lightning"], runs["plain"], strict=True)
    ratios = sorted(x["wall"] / y["wall"] for x, y in pairs)
    overhead = figure("plain_s", p, "lightning_s", light, statistics.median(ratios), repeats, load)
    overhead |= {
        "ratio_of_medians": light / p,
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "plain_loop_s": med("plain", "loop"),
        "lightning_loop_s": med("lightning", "loop"),  # epoch hook to hook
        "ratio_loop": med("lightning", "loop") / med("plain", "loop"),
        "plain_cpu_s": med("plain", "cpu"),
        "lightning_cpu_s": med("lightning", "cpu"),
        "ratio_cpu": med("lightning", "cpu") / med("plain", "cpu"),
        "plain_all_s": [r["wall"] for r in runs["plain"]],
        "lightning_all_s": [r["wall"] for r in runs["lightning"]],
        "steps": steps,
    }
    step32, step16 = med("plain", "loop") / steps, med("bf16", "loop") / steps
    bf16 = figure("fp32_step_s", step32, "bf16_step_s", step16, step32 / step16, repeats, load)
    bf16 |= {
        "fp32_step_cpu_s": med("plain", "cpu_loop") / steps,
        "bf16_step_cpu_s": med("bf16", "cpu_loop") / steps,
        "ratio_cpu": med("plain", "cpu_loop") / med("bf16", "cpu_loop"),
        "ratio_paired_median": paired("plain", "bf16", "loop"),
        "steps": steps,
    }
    return {
        "trainer_vs_plain": overhead,
        # a smoke run (no warm-up) pairs 2 steps only
        "trainer_vs_plain_per_step": measure_paired_steps(
            name, batches, seed, load, min_steps=22 if warmup else 3, warmup=2 if warmup else 0
        ),
        "bf16_vs_fp32": bf16,
        "pipeline": measure_pipeline(name, dm, steps, step32, seed)
        | {
            "first_pass_batch_s": first_pass  # a config with a cache: its first epoch's cost
        },
        "flops": measure_flops(name, batches[0], step32, step16, seed, peak or matmul_peak()),
        "channels_last": measure_channels_last(name, batches, seed, repeats, warmup),
    }


def measure_channels_last(
    name: str, batches: list[Any], seed: int, repeats: int, warmup: bool
) -> dict[str, Any] | None:
    """NCHW against channels_last (NHWC) training steps, plain loop, in the config's precision,
    for the configs that set `channels_last: true` (None for the others)."""
    config = _config(name)
    if not (config["model"].get("init_args") or {}).get("channels_last"):
        return None
    bf16 = "bf16" in str((config.get("trainer") or {}).get("precision", ""))
    load = os.getloadavg()[0]
    layouts = {"nchw": False, "nhwc": True}
    sides = {
        layout: functools.partial(_plain_run, name, batches, seed, bf16, channels_last=nhwc)
        for layout, nhwc in layouts.items()
    }
    if warmup:  # oneDNN picks (and caches) kernels per layout
        for nhwc in layouts.values():
            _plain_run(name, batches[:1], seed, bf16, channels_last=nhwc)
    runs = alternated(sides, repeats)
    steps = len(batches)
    nchw, nhwc = (statistics.median(r["loop"] for r in runs[k]) / steps for k in sides)
    out = figure("nchw_step_s", nchw, "nhwc_step_s", nhwc, nchw / nhwc, repeats, load)
    pairs = zip(runs["nchw"], runs["nhwc"], strict=True)
    return out | {
        "precision": "bf16-mixed" if bf16 else "32-true",
        "ratio_paired_median": statistics.median(a["loop"] / b["loop"] for a, b in pairs),
        "steps": steps,
    }


def measure_pipeline(
    name: str, dm: LightningDataModule, steps: int, step_s: float, seed: int
) -> dict[str, Any]:
    """The train DataLoader alone (the config's workers) against training on pre-built batches
    (`step_s` per step): the ratio of their throughputs (target >= 5), and the share of a step
    spent in next(iterator) when the same loader feeds the plain loop."""
    load = os.getloadavg()[0]
    loader = dm.train_dataloader()
    start = _now()
    for _ in Batches(loader, steps):  # the iterator's creation (worker start) is counted
        pass
    load_s = (_now() - start) / steps
    fed = _plain_run(name, Batches(loader, steps), seed)
    out = figure("loader_batch_s", load_s, "train_step_s", step_s, step_s / load_s, 1, load)
    return out | {
        "workers": loader.num_workers,
        "batch_size": loader.batch_size,
        "wait_share": sum(fed["waits"]) / fed["loop"],
        "fed_step_s": fed["loop"] / steps,
        "steps": steps,
    }


def measure_flops(
    name: str, batch: Any, step32: float, step16: float, seed: int, peak: dict[str, float]
) -> dict[str, Any]:
    """FLOPs of one forward + backward, over the measured step time, against the matmul peak."""
    load = os.getloadavg()[0]
    flops = step_flops(name, build_module(name, seed), batch)
    achieved32, achieved16 = flops / step32, flops / step16
    out = figure(
        "achieved_flops", achieved32, "peak_flops", peak["fp32_flops"],
        achieved32 / peak["fp32_flops"], 1, load,
    )  # fmt: skip
    return out | {
        "flops_per_step": flops,
        "step_s": step32,
        "bf16_achieved_flops": achieved16,
        "bf16_peak_flops": peak["bf16_flops"],
        "bf16_ratio": achieved16 / peak["bf16_flops"],
    }


def synthetic_detections(images: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Digit-scene-like detections: 1-3 boxes of 20-40 px per 96 px image, each found again
    with a few px of jitter (a wrong class one time in ten) plus 0-4 false positives, scored at
    random: a mAP between 0 and 1 that both backends must agree on."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(images):
        k = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 56
        boxes = torch.cat([xy, xy + 20 + torch.rand(k, 2, generator=g) * 20], 1)  # (k, 4) xyxy
        labels = torch.randint(1, 11, (k,), generator=g)
        f = int(torch.randint(0, 5, (1,), generator=g))
        fxy = torch.rand(f, 2, generator=g) * 56
        found = boxes + (torch.rand(k, 4, generator=g) - 0.5) * 8
        wrong = torch.rand(k, generator=g) < 0.1
        pred_labels = torch.where(wrong, torch.randint(1, 11, (k,), generator=g), labels)
        false = torch.cat([fxy, fxy + 20 + torch.rand(f, 2, generator=g) * 20], 1)
        preds.append(
            {
                "boxes": torch.cat([found, false]),
                "labels": torch.cat([pred_labels, torch.randint(1, 11, (f,), generator=g)]),
                "scores": torch.rand(k + f, generator=g),
            }
        )
        targets.append({"boxes": boxes, "labels": labels})
    return preds, targets


def _map_run(backend: str, preds: list[dict], targets: list[dict]) -> tuple[float, dict]:
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend=backend,
        iou_thresholds=IOU_THRESHOLDS, rec_thresholds=REC_THRESHOLDS,
    )  # fmt: skip  # the module's metric (lit_modules/detection.py), backend aside
    gc.collect()
    start = _now()
    metric.update(preds, targets)
    values = metric.compute()
    return _now() - start, {k: float(values[k]) for k in MAP_KEYS}


def measure_map(images: int = 500, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """COCO mAP (update + compute) of the same detections with pycocotools and faster_coco_eval,
    alternated after a warm-up of each; the scores must agree."""
    load = os.getloadavg()[0]
    preds, targets = synthetic_detections(images, seed)
    backends = ("pycocotools", "faster_coco_eval")
    for b in backends:
        _map_run(b, preds, targets)
    times: dict[str, list[float]] = {b: [] for b in backends}
    scores: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for b in backends:
            seconds, scores[b] = _map_run(b, preds, targets)
            times[b].append(seconds)
    slow, fast = (statistics.median(times[b]) for b in backends)
    diff = max(abs(scores[backends[0]][k] - scores[backends[1]][k]) for k in MAP_KEYS)
    out = figure("pycocotools_s", slow, "faster_coco_eval_s", fast, slow / fast, repeats, load)
    return out | {"images": images, "scores": scores, "max_abs_diff": diff}
