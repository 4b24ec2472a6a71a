"""The golden figures of the released As-ViT / AutoProg / ViTAS code (see tests/data/golden/README.md).

They are read from ``../shared/golden`` when the checkout sits beside it, else from the copy in
``tests/data/golden`` (so the tests also run from a bare clone)."""
import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SHARED = _HERE.parent.parent / "shared" / "golden"
_COPY = _HERE / "data" / "golden"


def golden_dir(name: str) -> Path:
    """The folder of one golden data set (``asvit_kappa``, ``autoprog_growth``, ``vitas_slices``)."""
    for root in (_SHARED, _COPY):
        if (root / name / "expected.json").is_file():
            return root / name
    raise FileNotFoundError(f"golden data {name!r} is neither in {_SHARED} nor in {_COPY}")


def expected(name: str) -> dict:
    return json.loads((golden_dir(name) / "expected.json").read_text())
