"""grocery's product information as catalogue attributes: a real test bed for filters and products.

Each fine class is one product (the label of its photos); the Information.txt beside its iconic image gives
its title, country, manufacturer (packaged goods) and package size. Every photo of the product carries them,
as a shop's catalogue would: `section` (Fruit, Vegetables, Packages), `coarse` (the coarse class),
`country`, `brand` (packaged goods only), `grams` (a number, where the size is given) and `title`.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

# Swedish spellings in the files, so that one country has one value.
_COUNTRIES = {"Sverige": "Sweden", "Danmark": "Denmark", "Tyskland": "Germany", "Finland": "Finland"}
_AMOUNT = re.compile(r"([\d.]+)\s*(kg|g|ml|cl|l)\b", re.IGNORECASE)
_GRAMS_PER = {"kg": 1000.0, "g": 1.0, "l": 1000.0, "cl": 10.0, "ml": 1.0}


def product_attributes(classes_csv: Path) -> dict[str, dict[str, str]]:
    """Fine class name -> the product's attributes, from grocery's classes.csv and Information.txt files."""
    classes_csv = Path(classes_csv)
    products: dict[str, dict[str, str]] = {}
    with classes_csv.open(encoding="utf-8", newline="") as handle:
        for row in list(csv.reader(handle))[1:]:
            fine, _, coarse, _, iconic = (field.strip() for field in row[:5])
            folder = classes_csv.parent / iconic.lstrip("/")
            attributes = {"section": Path(iconic).parts[2], "coarse": coarse}
            information = folder.parent / f"{fine}_Information.txt"
            if information.is_file():
                attributes.update(_information(information.read_text(encoding="utf-8-sig")))
            products[fine] = attributes
    return products


def _information(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    attributes = {"title": fields.get("title", "")}
    country = fields.get("country") or fields.get("manufacturing country")
    amount = ""
    if "country and volume" in fields:
        country, _, amount = fields["country and volume"].partition(",")
    if "manufacturer and volume" in fields:
        brand, _, amount = fields["manufacturer and volume"].partition(",")
        attributes["brand"] = brand.strip()
    if country:
        attributes["country"] = _COUNTRIES.get(country.strip(), country.strip())
    size = _AMOUNT.search(amount)
    if size:
        attributes["grams"] = f"{float(size.group(1)) * _GRAMS_PER[size.group(2).lower()]:g}"
    return attributes
