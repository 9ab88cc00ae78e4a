"""Models for the math tests, and what the test modules share (pytest puts this folder on sys.path)."""


import pytest

from rrepa.testing import random_flow  # noqa: F401 - the tests import it from here

# The GPU variant of a device-parametrised test is marked `cuda` and skipped without a GPU (conftest.py).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Why the tests that need the real Fashion-MNIST are skipped without it (`make test` installs it where it can).
NEEDS_FMNIST = ("needs Fashion-MNIST in /usr/share/datasets/fashion-mnist: run `make data` (Debian, as root) or "
                "`apt-get install dataset-fashion-mnist`")


