"""Face retrieval sets from ORL (seed 004's task): people split three ways (training, validation, test), none
in two of them, and the photos of the validation and test people also pasted onto real backgrounds, to show
what a face crop is worth.

`python -m lookalike.quality.faces ORL_ROOT BACKGROUNDS DEST` writes, from ORL_ROOT/<person>/*.pgm, people
in natural order:

- DEST/train/<person>/: every photo of the first `train_people` people;
- DEST/validation/<person>/: every photo of the next `validation_people` people (early stopping and
  choices at export: the exporter scores them leave-one-out among themselves);
- DEST/catalogue/<person>/ and DEST/queries/<person>/: the remaining (test) people's photos, split in
  halves (catalogue: the first half of each person's photos; queries: the rest), what `lookalike eval`
  scores: nothing is fitted on them;
- DEST/pasted-validation/, DEST/pasted-catalogue/, DEST/pasted-queries/: those photos pasted at a random
  position and scale onto a random background photo (a labelled folder or list file, e.g. grocery's
  train.txt), seeded.
"""
from __future__ import annotations

import argparse
import random
import re
import shutil
from pathlib import Path
from typing import Sequence

from PIL import Image

from lookalike.quality.labelled_images import read_labelled_images

BACKGROUND_SIZE = 448


def _natural(name: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", name)
    return (int(digits[0]) if digits else 0, name)


def paste_onto(face: Image.Image, background: Image.Image, rng: random.Random) -> Image.Image:
    """`face` at a random scale (its height 30-60% of the scene's) and position on `background` resized to a
    square scene of BACKGROUND_SIZE pixels."""
    scene = background.convert("RGB").resize((BACKGROUND_SIZE, BACKGROUND_SIZE), Image.Resampling.BILINEAR)
    height = round(BACKGROUND_SIZE * rng.uniform(0.3, 0.6))
    width = round(face.width * height / face.height)
    scaled = face.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    scene.paste(scaled, (rng.randrange(0, BACKGROUND_SIZE - width + 1), rng.randrange(0, BACKGROUND_SIZE - height + 1)))
    return scene


def build_face_sets(orl_root: Path, backgrounds: Path, dest: Path, train_people: int = 14,
                    validation_people: int = 4, seed: int = 0) -> None:
    """Writes the sets described in the module docstring (DEST is replaced)."""
    people = sorted((p for p in Path(orl_root).iterdir() if p.is_dir()), key=lambda p: _natural(p.name))
    if len(people) <= train_people + validation_people:
        raise ValueError(f"{orl_root} has {len(people)} people, need more than {train_people} + {validation_people} "
                         "to hold some out for testing")
    scenes = [image.path for image in read_labelled_images(backgrounds)]
    rng = random.Random(seed)
    shutil.rmtree(dest, ignore_errors=True)
    for index, person in enumerate(people):
        photos = sorted((p for p in person.iterdir() if p.is_file()), key=lambda p: _natural(p.name))
        if index < train_people:
            _copy(photos, Path(dest) / "train" / person.name)
            continue
        half = len(photos) // 2
        splits = ([("validation", photos)] if index < train_people + validation_people
                  else [("catalogue", photos[:half]), ("queries", photos[half:])])
        for split, chosen in splits:
            _copy(chosen, Path(dest) / split / person.name)
            for photo in chosen:
                pasted = paste_onto(Image.open(photo), Image.open(rng.choice(scenes)), rng)
                target = Path(dest) / f"pasted-{split}" / person.name / f"{photo.stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                pasted.save(target)


def _copy(photos: Sequence[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        shutil.copyfile(photo, folder / photo.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lookalike.quality.faces", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("orl", type=Path, help="ORL faces: ROOT/<person>/*.pgm")
    parser.add_argument("backgrounds", type=Path, help="photos without faces to paste onto (folder or list file)")
    parser.add_argument("dest", type=Path, help="where to write the sets (replaced)")
    parser.add_argument("--train-people", type=int, default=14)
    parser.add_argument("--validation-people", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_face_sets(args.orl, args.backgrounds, args.dest, args.train_people, args.validation_people, args.seed)
    print(f"wrote {args.dest}: train, validation, catalogue, queries, pasted-validation, pasted-catalogue, "
          "pasted-queries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
