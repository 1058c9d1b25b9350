import os

import pytest

from ipshift.net import netns


def _lab_namespaces() -> set[str]:
    return {n for n in netns.list_names() if n.startswith("ipsh-")}


@pytest.fixture(scope="session", autouse=True)
def no_leftover_namespaces():
    """The suite fails if any namespace it created is still there at the end."""
    before = _lab_namespaces()
    yield
    left = _lab_namespaces() - before
    if left:
        from ipshift.lab import clean

        clean(everything=True)
        pytest.fail(f"tests left network namespaces behind: {sorted(left)}")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs root: builds network namespaces")
    for item in items:
        if "netns" in item.path.parts:
            item.add_marker(pytest.mark.netns)
        if "netns" in item.keywords and os.geteuid() != 0:
            item.add_marker(skip)
