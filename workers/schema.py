"""The trajectory store's Parquet schema: one row per (prompt, seed), tensors as flat fixed-size lists.

Shapes and dtypes of the tensor columns live in the store's manifest (and in each field's metadata), so
decoding is a zero-copy numpy view plus a reshape. Bump SCHEMA_VERSION on any change to the layout.
The x0_anchor column (the teacher's x0 estimate at z_K) exists only in stores of epsilon-prediction
teachers, which no earlier version wrote, so it is optional rather than a new version; so is x_teacher (the
teacher's full sample), which only stores keyed with teacher samples hold.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from models.adapter import Conditioning
from workers.batches import AnchorBatch

SCHEMA_VERSION = 2  # 2: anchors always float32; stores keyed without their size (they grow)

ID_COLUMNS = {"prompt_id": pa.int64(), "prompt": pa.string(), "seed": pa.int64(), "t_anchor": pa.float32()}
COND_PREFIX = "cond."

# The largest magnitude a stored float may have. The losses square differences of anchors in float32, whose
# largest value is 3.4e38: a value past about 1e19 turns a loss non-finite though torch.isfinite passes it.
# Anchors, noise and embeddings of every family are O(1) to O(1e3) (SDXL's time ids hold pixel sizes).
MAX_ABS = 1e18

# torch dtype name -> (arrow value type, numpy dtype used to carry the bits)
_DTYPES = {
    "float32": (pa.float32(), np.float32),
    "float16": (pa.float16(), np.float16),
    "bfloat16": (pa.uint16(), np.uint16),  # numpy has no bfloat16: the bits travel as uint16
    "int64": (pa.int64(), np.int64),
    "int32": (pa.int32(), np.int32),
}


@dataclass(frozen=True)
class TensorSpec:
    """Per-row shape and torch dtype of a tensor column."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(data: dict) -> TensorSpec:
        return TensorSpec(tuple(data["shape"]), data["dtype"])


def tensor_specs(schema: pa.Schema) -> dict[str, TensorSpec]:
    """The tensor columns of a table or Parquet file, from their field metadata."""
    return {f.name: TensorSpec.from_json(json.loads(f.metadata[b"tensor"]))
            for f in schema if f.metadata and b"tensor" in f.metadata}


def unsafe_columns(table: pa.Table) -> list[str]:
    """The float columns holding a NaN, an infinity or a value beyond MAX_ABS (bfloat16 decoded first)."""
    specs = tensor_specs(table.schema)
    bad = []
    for field in table.schema:
        if field.name in specs and specs[field.name].dtype in ("float32", "float16", "bfloat16"):
            values = decode_tensor(table.column(field.name), specs[field.name])
        elif field.name not in specs and pa.types.is_floating(field.type):
            values = torch.tensor(table.column(field.name).to_numpy())  # one number a row: a copy costs nothing
        else:
            continue
        if values.numel():
            low, high = torch.aminmax(values)  # one pass in the column's own dtype; a NaN makes both NaN
            if not (-MAX_ABS <= float(low) and float(high) <= MAX_ABS):
                bad.append(field.name)
    return bad


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"the trajectory store cannot hold {t.dtype} tensors; use one of {sorted(_DTYPES)}")
    return name


def encode_tensor(t: torch.Tensor) -> tuple[pa.FixedSizeListArray, TensorSpec]:
    """(B, *shape) tensor -> a fixed-size-list column of B rows, and its spec."""
    spec = TensorSpec(tuple(t.shape[1:]), _dtype_name(t))
    value_type, np_dtype = _DTYPES[spec.dtype]
    t = t.detach().cpu().contiguous()
    flat = (t.view(torch.uint16) if spec.dtype == "bfloat16" else t).numpy().reshape(-1).view(np_dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), spec.numel), spec


def decode_tensor(column: pa.ChunkedArray | pa.Array, spec: TensorSpec) -> torch.Tensor:
    """A fixed-size-list column -> (B, *shape) tensor; no copy when the column is one chunk."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    with warnings.catch_warnings():  # Arrow buffers are read-only; training never writes into its inputs
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(flat.reshape(len(column), *spec.shape))
    return tensor.view(torch.bfloat16) if spec.dtype == "bfloat16" else tensor


def batch_to_table(batch: AnchorBatch, prompts: list[str]) -> tuple[pa.Table, dict[str, TensorSpec]]:
    """An AnchorBatch (on any device) and its rows' prompt texts -> an Arrow table and its tensor specs."""
    columns: dict[str, pa.Array] = {
        "prompt_id": pa.array(batch.prompt_ids.cpu().numpy(), pa.int64()),
        "prompt": pa.array(prompts, pa.string()),
        "seed": pa.array(batch.seeds.cpu().numpy(), pa.int64()),
        "t_anchor": pa.array(batch.t_anchor.float().cpu().numpy(), pa.float32()),
    }
    specs: dict[str, TensorSpec] = {}
    tensors = {"eps": batch.eps, "z": batch.z,
               **({"x0_anchor": batch.x0_anchor} if batch.x0_anchor is not None else {}),
               **({"x_teacher": batch.x_teacher} if batch.x_teacher is not None else {}),
               **{COND_PREFIX + k: v for k, v in batch.cond.tensors.items()}}
    for name, tensor in tensors.items():
        columns[name], specs[name] = encode_tensor(tensor)
    fields = [pa.field(n, c.type, metadata={"tensor": json.dumps(specs[n].to_json())} if n in specs else None)
              for n, c in columns.items()]
    schema = pa.schema(fields, metadata={"dpdmd_schema_version": str(SCHEMA_VERSION)})
    return pa.Table.from_arrays(list(columns.values()), schema=schema), specs


def table_to_batch(table: pa.Table, specs: dict[str, TensorSpec]) -> AnchorBatch:
    """The inverse of batch_to_table: tensors on the CPU, prompt texts not needed for training."""
    missing = [n for n in ("prompt_id", "seed", "t_anchor", *specs) if n not in table.column_names]
    if missing:
        raise ValueError(f"trajectory rows lack the columns {missing}; the store was written with another "
                         f"schema version (this code reads version {SCHEMA_VERSION})")
    cond = {n.removeprefix(COND_PREFIX): decode_tensor(table.column(n), s)
            for n, s in specs.items() if n.startswith(COND_PREFIX)}
    return AnchorBatch(
        eps=decode_tensor(table.column("eps"), specs["eps"]),
        z=decode_tensor(table.column("z"), specs["z"]),
        t_anchor=torch.from_numpy(table.column("t_anchor").to_numpy()),
        cond=Conditioning(cond),
        prompt_ids=torch.from_numpy(table.column("prompt_id").to_numpy()),
        seeds=torch.from_numpy(table.column("seed").to_numpy()),
        x0_anchor=decode_tensor(table.column("x0_anchor"), specs["x0_anchor"]) if "x0_anchor" in specs else None,
        x_teacher=decode_tensor(table.column("x_teacher"), specs["x_teacher"]) if "x_teacher" in specs else None,
    )
