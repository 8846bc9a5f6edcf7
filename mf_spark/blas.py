"""BLAS threads inside Spark tasks.

Spark already runs one task per core. A BLAS (OpenBLAS here) that also starts one thread per core for
every matrix product oversubscribes the executor, and its threads spin waiting for each other: on 2
cores in ``local[2]`` the ALS conjugate-gradient kernel ran 9x slower (575 ms against 60 ms per block
of 25k users, measured with ``OPENBLAS_NUM_THREADS`` unset and set to 1). Numeric code that runs in a
task wraps itself in :func:`task_blas_threads`.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def task_blas_threads() -> threadpool_limits:
    """Context manager limiting BLAS to the running task's CPUs (``spark.task.cpus``; 1 outside a task)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    cpus = context.cpus() if context is not None else 1
    return threadpool_limits(limits=max(1, cpus), user_api="blas")
