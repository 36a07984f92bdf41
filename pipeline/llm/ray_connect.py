"""The driver's connection to a Ray cluster: the running one (`auto`), one at an address, or `local`: one
started on this machine for the job and stopped at its end.

A local cluster is stopped by its handle (`ray.shutdown()` ends the processes `ray.init` started), never with
`ray stop`, which ends every Ray process on the machine. Its session files, sockets and logs go to a fresh
folder under /tmp (Ray's socket paths must fit in 107 bytes), its authentication token is made up for it and
passed in the environment (nothing is written under the home folder), and its workers import this checkout
of the project. Inside a job that a Ray launcher runs on a cluster, Ray is connected already: that
connection is used as it is.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger(__name__)

LOCAL = "local"  # ray.address=local: start a cluster on this machine for the job
PROJECT_ROOT = Path(__file__).resolve().parents[2]
QUIET = {"RAY_USAGE_STATS_ENABLED": "0"}  # no usage report to Ray's servers (and no network at run time)
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray leaves 127.0.0.1 as it is (see `stay_on_loopback`)


def local_env(temp_dir: Path, extra_path: Sequence[str] = ()) -> dict[str, str]:
    """What a local cluster's processes inherit: where its files go, its token, this checkout on the path."""
    path = [str(PROJECT_ROOT), *extra_path, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {
        **QUIET,
        "RAY_TMPDIR": str(temp_dir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(path)),
    }


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block (processes started in it inherit them), then as they were."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def local_settings(temp_dir: Path, extra_path: Sequence[str] = ()) -> Iterator[None]:
    """The environment of a local cluster for the block. Ray reads its authentication settings once per process,
    so they are read again after the change and after the restore (what Ray's own tests do)."""
    try:
        with environment(local_env(temp_dir, extra_path)):
            _reload_auth()
            yield
    finally:
        _reload_auth()


def _reload_auth() -> None:
    raylet: Any = importlib.import_module("ray._raylet")  # untyped: its stubs do not list these
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


def stay_on_loopback() -> None:
    """Keep a local cluster on 127.0.0.1. When it connects, Ray replaces 127.0.0.1 by this host's network address
    (it assumes other machines will join), which a cluster listening on loopback does not answer; told that it
    is a one-machine cluster, it keeps loopback. Ray reads the setting once, on import: call this before."""
    os.environ[LOOPBACK_ONLY] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before stay_on_loopback(): a local cluster would leave loopback")


@contextlib.contextmanager
def connected(address: str, cpus: int | None = None) -> Iterator[str]:
    """Connect this process to the cluster `address` names for the block; yields what it connected to."""
    if address == LOCAL:
        stay_on_loopback()
    try:
        import ray
    except ImportError as exc:
        raise UserError(
            "generate.executor=ray needs the ray package: pip install -e '.[ray]' (or generate.executor=local)"
        ) from exc
    if ray.is_initialized():
        yield "the cluster this job runs on"
        return
    if address == LOCAL:
        temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        try:
            with local_settings(temp_dir):
                ray.init(
                    num_cpus=cpus,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
                try:
                    yield f"a local cluster ({cpus or 'all'} CPUs)"
                finally:
                    ray.shutdown()
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
        return
    with environment(QUIET):
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise UserError(
                f"generate.ray.address={address}: no Ray cluster answers there ({str(exc).splitlines()[0][:160]}); "
                "start one with `ray start --head`, give its address (generate.ray.address=HOST:6379), or use "
                "generate.ray.address=local"
            ) from exc
    try:
        yield address
    finally:
        ray.shutdown()
