"""Which torchvision classification models and weights exist, known without importing torch.

`torchvision_catalog.json` beside this module is generated from the pinned torchvision (`make crds`) and a
test fails when it drifts, so `validate`, the CRD and the job agree on names offline.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

CATALOG_FILE = Path(__file__).with_name("torchvision_catalog.json")
SPECIAL_WEIGHTS = ("DEFAULT", "NONE")


@cache
def catalog() -> dict[str, list[str]]:
    """Model builder name → its weights enum members (DEFAULT and NONE are always allowed too)."""
    return json.loads(CATALOG_FILE.read_text())["models"]


def all_weights() -> list[str]:
    """Every weights name of any model, with DEFAULT and NONE."""
    return sorted({*SPECIAL_WEIGHTS, *(w for names in catalog().values() for w in names)})


def generate() -> dict[str, object]:
    """The catalog from the installed torchvision (classification models only)."""
    from torchvision import models

    names = sorted(models.list_models(module=models))
    return {
        "generatedBy": "python -m batchinfer_job.torchvision_catalog (make crds)",
        "models": {name: sorted(models.get_model_weights(name).__members__) for name in names},
    }


def catalog_json() -> str:
    return json.dumps(generate(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    CATALOG_FILE.write_text(catalog_json())
