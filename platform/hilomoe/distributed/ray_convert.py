"""`hilomoe data convert --ray`: the chunks of both passes as Ray tasks.

    runner = RayChunks()                       # joins RAY_ADDRESS or starts a local Ray
    for summary in runner.map(summarize, job, chunks): ...     # results in chunk order

Plain Ray tasks rather than Ray Data: a chunk is already the unit of work (a byte range aligned
to line starts, chunks.py), the work is one function call, and the driver must consume results in
chunk order to merge counts and write deterministically; a task per chunk with a bounded window
of tasks in flight is all that needs. Pass 1 tasks return their chunk's counts and sums (a few MB),
which the driver merges; pass 2 tasks parse their chunk again and return its encoded rows, which
the driver writes through DatasetWriter. Neither the chunking nor the order of writing depends on
where a task ran, so the output, content hash included, is the single process's.

Each task asks for one CPU; at most two tasks per cluster CPU are in flight, which keeps every
CPU busy while the driver merges or writes and bounds the object store's use. Every node must see
the input files at the same paths, and have this package installed.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from hilomoe.data.convert.chunks import Chunk

TASKS_PER_CPU = 2


class RayChunks:
    """Runs fn(job, chunk) as Ray tasks, yielding results in chunk order."""

    ray = True

    def __init__(self) -> None:
        from hilomoe.distributed.runtime import connect_ray

        self.started = connect_ray()
        import ray

        self._ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = max(2, TASKS_PER_CPU * cpus)

    def map(self, fn: Callable, job, chunks: Iterable[Chunk]) -> Iterator:
        ray = self._ray
        task = ray.remote(num_cpus=1, max_retries=3)(fn)
        job_ref = ray.put(job)  # shipped to the object store once, not once per task
        chunks = list(chunks)
        refs = [task.remote(job_ref, c) for c in chunks[:self.window]]
        for i in range(len(chunks)):
            result = ray.get(refs[i])
            refs[i] = None  # let the object store free it
            if i + self.window < len(chunks):
                refs.append(task.remote(job_ref, chunks[i + self.window]))
            yield result

    def close(self) -> None:
        if self.started:
            self._ray.shutdown()
