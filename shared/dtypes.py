"""The tensor dtypes Prism serves in, by name: what every setting, topology file and size computation
spells (`"float32"`, never a byte count), and the bytes per element of each."""

from __future__ import annotations

from typing import Literal

DtypeName = Literal["float32", "bfloat16", "float16"]

DTYPE_BYTES: dict[DtypeName, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
