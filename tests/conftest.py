"""Session-wide fixtures. `ray_local`: ONE local Ray instance (4 CPUs, no dashboard) shared by
every test marked `ray`, started on first use and shut down at the end of the session."""
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: starts (or reuses) the session's local Ray instance")


@pytest.fixture(scope="session")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()
