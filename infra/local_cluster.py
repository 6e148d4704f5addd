#!/usr/bin/env python3
"""A real multi-node Ray cluster on this one machine, on 127.0.0.1, for trying things out.

    python infra/local_cluster.py --workers 2 --cpus 1          # head + 2 worker nodes
    # prints one JSON line: {"gcs": ..., "dashboard": ..., "env": {...}, "nodes": [...]}
    # then: export the printed env, and `ray job submit -- hilomoe train ...`
    # stop it with Ctrl-C (or SIGTERM to this process): it shuts down only its own nodes

Each node is a separate raylet with its own resources (`ray.cluster_utils.Cluster`, the way Ray
tests itself), so node failures can be staged: `--kill-node-after S` removes the last worker node
S seconds after start, or at once on SIGUSR1 (`kill -USR1 <pid>`). The cluster uses token authentication with a fresh token of its own,
passed to clients through the printed environment; it never reads or writes ~/.ray, and it
never calls `ray stop`, which would kill every Ray process on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    p.add_argument("--cpus", type=float, default=1, help="CPUs of each worker node")
    p.add_argument("--head-cpus", type=float, default=1, help="CPUs of the head node")
    p.add_argument("--gpus", type=int, default=0, help="GPUs each worker node advertises")
    p.add_argument("--object-store-mb", type=int, default=1024,
                   help="each node's object store (MiB; Ray's test clusters default to 150, "
                        "which real work spills out of)")
    p.add_argument("--dashboard-port", type=int, default=0, help="job server port (0: any)")
    p.add_argument("--kill-node-after", type=float, default=None, metavar="S",
                   help="remove the last worker node S seconds after start (failure drills)")
    args = p.parse_args(argv)
    if args.object_store_mb < 75:  # Ray's own floor
        p.error(f"--object-store-mb must be at least 75 (MiB), got {args.object_store_mb}.")

    token = secrets.token_hex(32)
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    os.environ.update(client_env)  # before Ray is imported: it reads these at import
    from ray.cluster_utils import Cluster

    port = args.dashboard_port or free_port()
    store = args.object_store_mb * 2**20
    def ports() -> dict:
        # every node's agents on free ports: the defaults (52365, ...) clash with any other
        # Ray on this machine, and a head whose agent cannot bind accepts no jobs
        return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()}

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": args.head_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": port, "object_store_memory": store, **ports()})
    stop, kill_now = threading.Event(), threading.Event()
    try:
        nodes = [cluster.add_node(num_cpus=args.cpus, num_gpus=args.gpus,
                                  object_store_memory=store, **ports())
                 for _ in range(args.workers)]
        cluster.wait_for_nodes()
        # after the nodes: each node Ray starts in this process installs its own SIGTERM
        # handler, which stops that node alone and exits with 1
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        signal.signal(signal.SIGUSR1, lambda *_: kill_now.set())  # a drill: lose a node now
        dashboard = f"http://127.0.0.1:{port}"
        info = {"gcs": cluster.address, "dashboard": dashboard,
                "env": {**client_env, "RAY_ADDRESS": cluster.address,
                        "RAY_API_SERVER_ADDRESS": dashboard},
                "nodes": 1 + len(nodes), "pid": os.getpid()}
        print(json.dumps(info), flush=True)
        start = time.time()
        while not stop.wait(0.2):
            due = args.kill_node_after is not None and time.time() - start > args.kill_node_after
            if (due or kill_now.is_set()) and nodes:
                cluster.remove_node(nodes.pop(), allow_graceful=False)
                print(json.dumps({"removed_node": True, "nodes": 1 + len(nodes)}), flush=True)
                args.kill_node_after = None
                kill_now.clear()
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
