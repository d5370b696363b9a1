"""Session-wide fixtures.

`ray_local`: ONE local Ray instance (4 logical CPUs, no dashboard, loopback) shared by every test
marked `ray`, started on first use and shut down at the end of the session. Fake AWS credentials
are set before it starts so its workers can reach the loopback S3 server of `s3_server`.
`s3_server`: moto's ThreadedMotoServer on 127.0.0.1 (an OS-picked port) with one bucket.
"""
import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: starts (or reuses) the session's local Ray instance")


@pytest.fixture(scope="session")
def ray_local():
    ray = pytest.importorskip("ray")
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1"), ("RAY_DEDUP_LOGS", "0")):
        os.environ.setdefault(k, v)
    started = not ray.is_initialized()
    if started:  # the way `moe train --workers N` starts its own: every Ray process on 127.0.0.1 only
        from moe_runtime.cluster.job import start_embedded_ray
        start_embedded_ray(num_cpus=4)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(ray_local):
    """(endpoint 'host:port', bucket) of a loopback S3-compatible server."""
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    srv = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="moe-ckpt")
    yield f"{host}:{port}", "moe-ckpt"
    srv.stop()
