import pytest

import meshplan as mp


@pytest.fixture(scope="session")
def h100_64():
    return mp.load_cluster("h100-sxm", gpus=64)


@pytest.fixture(scope="session")
def llama70b():
    return mp.load_model("llama3-70b")
