import os

import pytest

from ipshift.lab import topology


@pytest.fixture(scope="session", autouse=True)
def no_leftover_namespaces():
    """The suite fails if any namespace it created is still there at the end (namespaces of
    other processes on the machine are none of its business)."""
    yield
    left = topology.leftovers()
    if left:
        topology.remove_namespaces(left)
        pytest.fail(f"tests left network namespaces behind: {sorted(left)}")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs root: builds network namespaces")
    for item in items:
        if "netns" in item.path.parts:
            item.add_marker(pytest.mark.netns)
        if "netns" in item.keywords and os.geteuid() != 0:
            item.add_marker(skip)
