"""The Dask client of ``bpttgen train --workers N`` / ``--scheduler ADDRESS``.

``--workers N`` starts a LocalCluster of N worker processes with one thread each
(each shard's kernels then run on one core, as the tests and benchmarks assume);
``--scheduler`` connects to a running cluster. Either way the run waits for its
workers before the first step: the number of shards, and so the rounding of the
summed gradients, is the number of workers at the start (resume with as many to
continue bit for bit). The client talks to the workers directly
(``direct_to_workers``): a shard's call on its worker's actor then skips the scheduler.
"""

import contextlib


def client(workers=None, scheduler=None, timeout=30):
    """A context manager giving a ``dask.distributed.Client``, or None for neither."""
    if workers is None and scheduler is None:
        return contextlib.nullcontext(None)
    if workers is not None and scheduler is not None:
        raise ValueError("give --workers N (a cluster on this machine) or --scheduler "
                         "ADDRESS (a running one), not both")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    from bpttgen.codegen.runtime.distributed import require_dask

    try:
        require_dask()
    except ImportError as err:
        raise ValueError(str(err)) from None  # a usage error: one line, what to install
    return _client(workers, scheduler, timeout)


@contextlib.contextmanager
def _client(workers, scheduler, timeout):
    import logging

    from distributed import Client, LocalCluster

    # A lost scheduler or worker is reported by train itself, in one line; dask's own
    # log lines about it would repeat that as tracebacks.
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    with contextlib.ExitStack() as stack:
        if workers is not None:
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                dashboard_address=":0"))
            c = stack.enter_context(Client(cluster, timeout=timeout,
                                            direct_to_workers=True))
            c.wait_for_workers(workers, timeout=timeout)
        else:
            try:
                # dask's connect timeout (distributed.comm.timeouts.connect, 30 s)
                # is also how long a lost scheduler is waited for before the run stops.
                c = stack.enter_context(Client(scheduler, direct_to_workers=True))
            except OSError as err:
                raise ValueError(f"cannot reach a Dask scheduler at {scheduler}: {err}") \
                    from err
            c.wait_for_workers(1, timeout=timeout)
        yield c
