"""Shared test configuration.

Tiny models run faster on one thread than on two (thread start-up dominates), and
the suite must stay quick on CI's 2 cores.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
