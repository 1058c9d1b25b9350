import os
import shutil

import pytest

from ipshift.lab import Lab


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    with Lab("test") as built:
        yield built


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(f"missing programs {missing}: run scripts/bootstrap")
