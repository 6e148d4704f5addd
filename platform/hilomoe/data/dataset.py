"""The canonical dataset: a directory of Parquet shards described by `dataset.json`.

    DIR/dataset.json            name, source format, fields, rows per split, seed, content hash
    DIR/train/part-00000.parquet, part-00001.parquet, ...
    DIR/valid/...   DIR/test/...

Every shard has three columns, wide rather than one column per field, because per-column
overhead dominates CTR reading (../shared/README.md measured it):

    cat    fixed_size_list<int32>[F_c]   ids of the categorical fields, in dataset.json's order
    num    fixed_size_list<float32>[F_n] the numeric fields (absent when F_n = 0)
    label  float32                       0 or 1

`dataset.json` is written last, into a temporary sibling directory that is then renamed into
place: a directory without it is not a dataset, so a writer killed halfway leaves nothing that
looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hilomoe.atomic import publish_dir
from hilomoe.config import PlainName, format_validation_error
from hilomoe.data.parquet import unreadable
from hilomoe.errors import DatasetError
from hilomoe.schema import FeatureSchema

SPLITS = ("train", "valid", "test")
META_FILE = "dataset.json"
FORMAT_VERSION = 1
MAX_IN_FLIGHT = 4  # tables queued in DatasetWriter (each also queued for the hash)
# How shards encode their columns (the content hash is over the Arrow data, not these bytes):
# byte-stream split + zstd. Ids are small integers, so their high bytes, split into streams of
# their own, compress to almost nothing; floats are what the encoding was made for. Against
# plain + zstd on a converted Criteo-shaped train split (39 ids a row, 100k per field): 1.5
# against 2.1 us a row to write, 0.48 against 0.68 to read, 41 against 56 bytes a row.
# Dictionaries off: dense id lists gain nothing from them and write 2x slower. Readers need
# byte-stream split for INT32 (Parquet format 2.11: pyarrow >= 16, parquet-java, arrow-rs).
SHARD_ENCODING = {
    "column_encoding": {"cat.list.element": "BYTE_STREAM_SPLIT",
                        "num.list.element": "BYTE_STREAM_SPLIT"},
    "compression": "zstd",
}


class FieldInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["categorical", "numeric"]
    vocab_size: int | None = Field(None, ge=1, description="ids in [0, vocab_size) incl. OOV")
    oov: str | None = None  # how unseen / rare values map, e.g. "id 0", "hash"
    transform: str | None = None  # numeric transform, e.g. "log1p-standardise"


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: int = Field(ge=0)
    files: list[PlainName]  # shard names inside the split's directory, never a path


class DatasetMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    source_format: str
    fields: list[FieldInfo]
    label: str = "label"
    splits: dict[str, SplitInfo]
    seed: int | None = None
    content_hash: str = ""
    extra: dict = Field(default_factory=dict)  # format-specific facts (e.g. Bayes metrics)

    @property
    def schema(self) -> FeatureSchema:
        cats = tuple(f.vocab_size for f in self.fields if f.type == "categorical")
        return FeatureSchema(vocab_sizes=cats,
                             numeric=sum(f.type == "numeric" for f in self.fields))


def arrow_schema(num_cat: int, num_numeric: int) -> pa.Schema:
    cols = [pa.field("cat", pa.list_(pa.int32(), num_cat))]
    if num_numeric:
        cols.append(pa.field("num", pa.list_(pa.float32(), num_numeric)))
    cols.append(pa.field("label", pa.float32()))
    return pa.schema(cols)


def to_table(cat: np.ndarray, num: np.ndarray, label: np.ndarray) -> pa.Table:
    """Rows as the canonical wide table.  cat: (n, F_c) ints, num: (n, F_n), label: (n,)."""
    n, fc = cat.shape
    # explicit types: pyarrow's inference on integer arrays costs ~1 s per million values
    ids = pa.array(np.ascontiguousarray(cat, dtype=np.int32).ravel(), type=pa.int32())
    cols = [pa.FixedSizeListArray.from_arrays(ids, fc)]
    names = ["cat"]
    if num.shape[1]:
        values = pa.array(np.ascontiguousarray(num, dtype=np.float32).ravel(), type=pa.float32())
        cols.append(pa.FixedSizeListArray.from_arrays(values, num.shape[1]))
        names.append("num")
    cols.append(pa.array(label.astype(np.float32), type=pa.float32()))
    names.append("label")
    return pa.Table.from_arrays(cols, names=names)


@dataclass
class DatasetWriter:
    """Streams rows into a new dataset directory, atomically published by `close(meta)`.

    >>> with DatasetWriter(out, num_cat=3, num_numeric=2) as w:
    ...     w.write("train", cat, num, label)
    ...     w.close(meta_without_splits)
    """

    out: Path
    num_cat: int
    num_numeric: int
    rows_per_file: int = 1_000_000
    row_group_rows: int = 65_536
    overwrite: bool = False
    # another writer's finished dataset at `out` stands and this one is dropped (two jobs
    # synthesising the same cached dataset at once: neither deletes what the other wrote)
    keep_existing: bool = False
    tmp: Path = field(init=False)
    _writers: dict = field(default_factory=dict, init=False)
    _rows: dict = field(default_factory=dict, init=False)
    _files: dict = field(default_factory=dict, init=False)
    _hash: "hashlib._Hash" = field(default_factory=hashlib.sha256, init=False)
    _closed: bool = field(default=False, init=False)
    # work in flight, oldest first; one thread hashes (in write order), one per split writes
    _pending: deque = field(default_factory=deque, init=False)
    _pools: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.out.exists() and not (self.overwrite or self.keep_existing):
            raise DatasetError(f"{self.out}: already exists; choose another --out or pass --overwrite.")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.schema = arrow_schema(self.num_cat, self.num_numeric)
        for split in SPLITS:
            (self.tmp / split).mkdir()
            self._rows[split], self._files[split] = 0, []
        for name in ("hash", *SPLITS):
            self._pools[name] = ThreadPoolExecutor(1, thread_name_prefix=f"writer-{name}")

    def write(self, split: str, cat: np.ndarray, num: np.ndarray, label: np.ndarray) -> None:
        """Queue rows for `split`. The content hash (over the writes in call order) and each
        split's encoding, compression and disk writes run on background threads of their own
        (pyarrow and hashlib release the GIL), so the splits' files are written in parallel
        while the caller produces the next rows. At most MAX_IN_FLIGHT tables wait or run:
        bounded memory, and errors surface at the next call."""
        if len(label) == 0:
            return
        table = to_table(cat, num, label)
        while len(self._pending) >= 2 * MAX_IN_FLIGHT:
            self._pending.popleft().result()
        self._pending.append(self._pools["hash"].submit(self._hash_table, split, table))
        self._pending.append(self._pools[split].submit(self._write_table, split, table))

    def _hash_table(self, split: str, table: pa.Table) -> None:
        self._hash.update(split.encode())
        for col in table.columns:
            for chunk in col.chunks:
                for buf in chunk.buffers():
                    if buf is not None:
                        self._hash.update(memoryview(buf))

    def _write_table(self, split: str, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            writer, room = self._writer(split)
            take = min(room, table.num_rows - offset)
            writer.write_table(table.slice(offset, take), row_group_size=self.row_group_rows)
            offset += take
            self._rows[split] += take

    def _writer(self, split: str) -> tuple[pq.ParquetWriter, int]:
        files = self._files[split]
        in_file = self._rows[split] - (len(files) - 1) * self.rows_per_file if files else 0
        if not files or in_file >= self.rows_per_file:
            if split in self._writers:
                self._writers[split].close()
            name = f"part-{len(files):05d}.parquet"
            files.append(name)
            self._writers[split] = pq.ParquetWriter(
                self.tmp / split / name, self.schema, use_dictionary=False,
                write_statistics=False, **SHARD_ENCODING)
            in_file = 0
        return self._writers[split], self.rows_per_file - in_file

    def _drain(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pending.clear()
            for pool in self._pools.values():
                pool.shutdown(wait=True)

    def close(self, meta: DatasetMeta) -> DatasetMeta:
        """Finish the shards, write dataset.json last, and move the directory into place."""
        self._drain()
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        meta = meta.model_copy(update={
            "splits": {s: SplitInfo(rows=self._rows[s], files=self._files[s]) for s in SPLITS},
            "content_hash": "sha256:" + self._hash.hexdigest(),
        })
        (self.tmp / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private
        # overwrite replaces only once the new dataset is complete
        publish_dir(self.tmp, self.out, keep=self.keep_existing)
        self._closed = True
        return meta

    def abort(self) -> None:
        try:
            self._drain()
        except Exception:  # already failing: the directory goes away regardless
            pass
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._closed:
            self.abort()


@dataclass
class Dataset:
    """An opened, checked canonical dataset."""

    path: Path
    meta: DatasetMeta

    @property
    def schema(self) -> FeatureSchema:
        return self.meta.schema

    def files(self, split: str) -> list[Path]:
        if split not in self.meta.splits:
            raise DatasetError(f"{self.path / META_FILE}: no split {split!r} "
                               f"(it has {', '.join(self.meta.splits)}).")
        return [self.path / split / f for f in self.meta.splits[split].files]

    def head(self, split: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `rows` rows of `split`: cat: (rows, F_cat) ids, num: (rows, F_num)."""
        schema = self.schema
        table = pq.ParquetFile(self.files(split)[0]).read_row_group(0).slice(0, rows)
        n = table.num_rows
        cat = np.asarray(table.column("cat").combine_chunks().flatten()).reshape(
            n, len(schema.vocab_sizes))
        num = (np.asarray(table.column("num").combine_chunks().flatten()).reshape(
            n, schema.numeric) if schema.numeric else np.zeros((n, 0), np.float32))
        return cat, num

    def field_names(self) -> list[str]:
        """The categorical fields' names, then the numeric ones': the order of `cat`, `num`."""
        fields = self.meta.fields
        return ([f.name for f in fields if f.type == "categorical"]
                + [f.name for f in fields if f.type == "numeric"])

    def fingerprint(self) -> str:
        """What the data is, for cache keys and resume: a hash of dataset.json, whose
        `content_hash` the writer computed from every row it wrote. A dataset written before
        content hashes is hashed shard by shard, byte by byte (size and mtime would survive
        `cp -p` of an edited shard)."""
        h = hashlib.sha256((self.path / META_FILE).read_bytes())
        if not self.meta.content_hash:
            for split in self.meta.splits:
                for f in self.files(split):
                    h.update(f"{split}/{f.name}:{_file_hash(f)}".encode())
        return h.hexdigest()


_SHARD_HASHES: dict[tuple, str] = {}


def _file_hash(path: Path) -> str:
    """A shard's sha256, hashed once per process while its inode, size, mtime and ctime stay
    (`cp -p` cannot keep the ctime, so an edited shard is hashed again)."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns)
    if memo not in _SHARD_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHARD_HASHES[memo] = h.hexdigest()
    return _SHARD_HASHES[memo]


def open_dataset(path: str | Path, check_shards: bool = True, training: bool = False) -> Dataset:
    """Open DIR as a canonical dataset, or raise DatasetError with one sentence saying why.

    `training`: the dataset is about to be trained on, so its validation split must hold both
    classes; otherwise every epoch's AUC is undefined (NaN) and early stopping, checkpoints and
    a study's ranking would compare nothing (reads the split's label column once).
    """
    root = Path(path)
    meta_path = root / META_FILE
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory.")
    if not meta_path.is_file():
        raise DatasetError(f"{root}: not a dataset (no {META_FILE}; an interrupted conversion "
                           "leaves none, so convert it again).")
    try:
        raw = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{meta_path}: not valid JSON ({err}).") from None
    try:
        meta = DatasetMeta.model_validate(raw)
    except ValidationError as err:
        raise DatasetError(format_validation_error(err, str(meta_path))) from None
    missing = [s for s in SPLITS if s not in meta.splits]
    if missing:
        raise DatasetError(f"{meta_path}: missing split(s) {', '.join(missing)}.")
    unsized = [f.name for f in meta.fields if f.type == "categorical" and f.vocab_size is None]
    if unsized:
        raise DatasetError(f"{meta_path}: categorical field {unsized[0]} has vocab_size null; "
                           f"give it its number of ids (ids lie in 0..vocab_size-1), as "
                           f"`hilomoe data convert` writes it.")
    ds = Dataset(root, meta)
    if check_shards:
        for split in SPLITS:
            _check_split(ds, split)
    if training:
        _check_validation(ds)
    return ds


def check_unchanged(path: str | Path, fingerprint: str, started: str) -> None:
    """A resumed run or study continues on the data it started with (`fingerprint`, or ""
    for a directory written before fingerprints were kept): refuse when the data changed."""
    if fingerprint and open_dataset(path, check_shards=False).fingerprint() != fingerprint:
        raise DatasetError(f"{path}: the dataset changed since {started} started (its content "
                           f"hash differs); resuming would mix two datasets: restore the data, "
                           f"or start anew with another --out.")


def _check_validation(ds: Dataset) -> None:
    """The validation split holds both classes: the AUC every epoch reports is defined."""
    where = ds.path / "valid"
    if ds.meta.splits["valid"].rows == 0:
        raise DatasetError(f"{where}: the validation split is empty, so no validation AUC can "
                           f"be computed; convert the data again with a valid fraction above 0.")
    seen: set[float] = set()
    for f in ds.files("valid"):
        try:
            labels = pq.read_table(f, columns=["label"]).column("label")
        except (pa.ArrowInvalid, OSError) as err:
            raise unreadable(f, err) from None
        seen.update(v for v in pc.unique(labels).to_pylist() if v is not None)
        if {0.0, 1.0} <= seen:
            return
    only = ", ".join(f"{v:g}" for v in sorted(seen)) or "none"
    raise DatasetError(f"{where}: the validation split holds only the label(s) {only}, so its "
                       f"AUC is undefined; it needs rows of both classes (0 and 1).")


def _check_split(ds: Dataset, split: str) -> None:
    schema = ds.schema
    expected = arrow_schema(len(schema.vocab_sizes), schema.numeric)
    rows = 0
    for f in ds.files(split):
        if not f.is_file():
            raise DatasetError(f"{f}: listed in {META_FILE} but missing.")
        try:
            md = pq.read_metadata(f)
            got = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as err:
            raise unreadable(f, err) from None
        if not got.remove_metadata().equals(expected):
            raise DatasetError(f"{f}: columns do not match {META_FILE} (expected {expected.names} "
                               f"with {len(schema.vocab_sizes)} ids and {schema.numeric} numerics).")
        rows += md.num_rows
    if rows != ds.meta.splits[split].rows:
        raise DatasetError(f"{ds.path / split}: holds {rows} rows but {META_FILE} says "
                           f"{ds.meta.splits[split].rows}.")
