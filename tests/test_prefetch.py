"""The background prefetch shared by training and prediction."""

import threading

import pytest

from msa.data.prefetch import prefetch


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_arrive_in_order(depth):
    assert list(prefetch(iter(range(50)), depth)) == list(range(50))


def test_producer_error_reraises_in_consumer():
    def items():
        yield 1
        raise ValueError("shard s007.h5 is unreadable")

    got = []
    with pytest.raises(ValueError, match="s007"):
        for item in prefetch(items(), 2):
            got.append(item)
    assert got == [1]


def test_consumer_stopping_early_stops_the_producer():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = prefetch(items(), 2)
    assert next(stream) == 0
    stream.close()  # the consumer goes away
    assert len(produced) < 10  # the producer did not run on ahead of the bounded queue
    assert not any(t.name == "msa-prefetch" and t.is_alive() for t in threading.enumerate())
