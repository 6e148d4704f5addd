"""`hilomoe data convert --ray`: the chunks of both passes as Ray tasks.

    runner = RayChunks()                       # joins RAY_ADDRESS or starts a local Ray
    for summary in runner.pass1(job, chunks): ...       # pass 1 results, in chunk order
    for encoded in runner.pass2(job2, chunks): ...      # pass 2 results, in chunk order

Plain Ray tasks rather than Ray Data: a chunk is already the unit of work (a byte range aligned
to line starts, chunks.py), the work is one function call, and the driver must consume results in
chunk order to merge counts and write deterministically; a task per chunk with a bounded window
of tasks in flight is all that needs. Pass 1 tasks return their chunk's counts and sums (a few MB),
which the driver merges, and, as a second return value, the chunk's parsed block, which the driver
does not fetch: it stays in the object store (spilled to disk when the store is full), owned by
the driver, until the chunk's pass 2 task takes it as its argument, so pass 2 neither parses the
text again (half of pass 1's work) nor needs a disk the nodes share. The table positions of each
chunk's values, which the driver learns as it merges counts (vocab.py), go to the object store
too (PositionRefs) and reach the chunk's pass 2 task as arguments: it encodes by gathers, without
hashing the values again, as the single process does from its cache. Pass 2 tasks return the
encoded rows, which the driver writes through DatasetWriter. Neither the chunking nor the order of
writing depends on where a task ran, so the output, content hash included, is the single
process's.

Each task asks for one CPU; at most two tasks per cluster CPU are in flight, which keeps every
CPU busy while the driver merges or writes and bounds the object store's use. Every node must see
the input files at the same paths, and have this package installed.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Iterable, Iterator

from hilomoe.data.convert.chunks import Chunk
from hilomoe.data.convert.pipeline import (Encoded, Pass1Job, Pass2Job, Summary, encode,
                                           summarize_keeping)

TASKS_PER_CPU = 2


class RayChunks:
    """Runs both passes' chunks as Ray tasks, yielding results in chunk order."""

    ray = True

    def __init__(self) -> None:
        from hilomoe.distributed.runtime import connect_ray

        self.started = connect_ray()
        import ray

        self._ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = max(2, TASKS_PER_CPU * cpus)
        self._blocks: dict[int, object] = {}  # chunk index -> its parsed block's ObjectRef
        self._positions = PositionRefs(ray)

    def pass1(self, job: Pass1Job, chunks: list[Chunk]) -> Iterator[Summary]:
        for chunk, (summary, block) in zip(chunks, self.map(summarize_keeping, job, chunks,
                                                            num_returns=2)):
            self._blocks[chunk.index] = block
            yield self._ray.get(summary)

    def pass2(self, job: Pass2Job, chunks: list[Chunk]) -> Iterator[Encoded]:
        # each block's and positions' reference is dropped once its task is submitted: the
        # store frees them when the task is done
        for refs in self.map(encode, job, chunks, blocks=self._blocks,
                             positions=self._positions, fields=len(job.encoders)):
            yield self._ray.get(refs)

    def positions(self, cache: None) -> PositionRefs:
        """Where pass 1 keeps its table positions for pass 2: the object store."""
        return self._positions

    def map(self, fn: Callable, job, chunks: Iterable[Chunk], num_returns: int = 1,
            blocks: dict | None = None, positions: PositionRefs | None = None,
            fields: int = 0) -> Iterator:
        """The ObjectRef(s) of fn(job, chunk[, block, *positions]) per chunk, in chunk order,
        each once its task finished, with at most `window` tasks in flight."""
        ray = self._ray
        task = ray.remote(num_cpus=1, max_retries=3, num_returns=num_returns)(fn)
        job_ref = ray.put(job)  # shipped to the object store once, not once per task
        chunks = list(chunks)

        def submit(chunk: Chunk):
            extra = () if blocks is None else (blocks.pop(chunk.index),)
            if positions is not None and positions.has(chunk.index):
                extra += tuple(positions.pop(chunk.index, fields))
            # the driver's relative paths mean nothing in a worker's directory
            return task.remote(job_ref, replace(chunk, path=os.path.abspath(chunk.path)), *extra)

        refs = [submit(c) for c in chunks[:self.window]]
        for i in range(len(chunks)):
            ray.wait(refs[i] if num_returns > 1 else [refs[i]], num_returns=num_returns,
                     fetch_local=False)
            result, refs[i] = refs[i], None  # the driver holds only what it is consuming
            if i + self.window < len(chunks):
                refs.append(submit(chunks[i + self.window]))
            yield result

    def close(self) -> None:
        self._blocks.clear()
        self._positions.refs.clear()
        if self.started:
            self._ray.shutdown()


class PositionRefs:
    """The table positions of chunks' values (vocab.FieldCounts puts them) in Ray's object
    store, owned by the driver until the chunk's pass 2 task is submitted."""

    def __init__(self, ray) -> None:
        self._ray = ray
        self.refs: dict[int, dict[int, object]] = {}  # chunk -> field -> ObjectRef

    def put(self, chunk: int, field: int, positions) -> None:
        self.refs.setdefault(chunk, {})[field] = self._ray.put(positions)

    def has(self, chunk: int) -> bool:
        return chunk in self.refs

    def pop(self, chunk: int, fields: int) -> list:
        """The chunk's references, field by field (None: a field that kept none)."""
        refs = self.refs.pop(chunk)
        return [refs.get(f) for f in range(fields)]
