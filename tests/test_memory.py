"""guided_diffusion/core/memory.py: one allocator policy, two modes, and the streaming loader's bound wins
whatever the order of the requests."""
import itertools

import h5py
import numpy as np
import pytest

from guided_diffusion.core import memory
from guided_diffusion.data import StreamedRows


class Holder:
    pass


@pytest.fixture(autouse=True)
def clean_policy():
    yield
    memory.reuse_freed_memory(False)


def test_the_rule():
    assert memory.decide(False, False) == memory.GLIBC_DEFAULTS
    assert memory.decide(True, False) == memory.REUSE_FREED
    assert memory.decide(True, True) == memory.BOUNDED
    assert memory.decide(False, True) == memory.BOUNDED


def test_the_decision_does_not_depend_on_the_order_of_the_calls():
    holder = Holder()
    calls = {"reuse": lambda: memory.reuse_freed_memory(True), "hold": lambda: memory.hold_memory_bound(holder)}
    for order in itertools.permutations(calls):
        for name in order:
            calls[name]()
        assert memory.current_mode() == memory.BOUNDED, order  # the last call does not win
        memory.release_memory_bound(holder)
        assert memory.current_mode() == memory.REUSE_FREED  # the recorded request takes effect
        memory.reuse_freed_memory(False)
        assert memory.current_mode() == memory.GLIBC_DEFAULTS


def test_a_streamed_source_holds_the_bound_while_open(tmp_path):
    with h5py.File(tmp_path / "m.h5", "w") as store:
        store["X"] = np.ones((10, 4), np.float32)
    file = h5py.File(tmp_path / "m.h5", "r")
    memory.reuse_freed_memory(True)
    source = StreamedRows(file, file["X"], block_rows=4)
    taken = source.take(np.array([1, 3, 5]))
    assert memory.current_mode() == memory.BOUNDED
    taken.close()
    source.close()
    assert memory.current_mode() == memory.REUSE_FREED


def test_a_forgotten_holder_does_not_hold_the_bound_forever():
    holder = Holder()
    memory.hold_memory_bound(holder)
    assert memory.current_mode() == memory.BOUNDED
    del holder
    assert memory.current_mode() == memory.GLIBC_DEFAULTS
