import pytest

from jaxpaged.buckets import PAD_SLOT_ID, bucket_for, make_buckets


def test_pad_slot_id_matches_metadata_value():
    assert PAD_SLOT_ID == -1


@pytest.mark.parametrize(
    "max_value, min_value, expected",
    [
        (100, 8, [8, 16, 32, 64, 100]),
        (64, 8, [8, 16, 32, 64]),
        (1, 1, [1]),
        (5, 3, [4, 5]),
        (8, 8, [8]),
        (9, 1, [1, 2, 4, 8, 9]),
    ],
)
def test_make_buckets(max_value, min_value, expected):
    assert make_buckets(max_value, min_value=min_value) == expected


@pytest.mark.parametrize("max_value, min_value, field", [(0, 1, "max_value"), (8, 0, "min_value"), (4, 8, "min_value")])
def test_make_buckets_rejects_bad_arguments(max_value, min_value, field):
    with pytest.raises(ValueError, match=field):
        make_buckets(max_value, min_value=min_value)


def test_bucket_for_is_smallest_bucket_at_least_n():
    buckets = make_buckets(100, min_value=8)
    for n in range(101):
        b = bucket_for(n, buckets)
        assert b >= n and b in buckets
        assert all(smaller < n for smaller in buckets if smaller < b)
    assert bucket_for(0, buckets) == 8
    assert bucket_for(33, buckets) == 64
    assert bucket_for(65, buckets) == 100


def test_bucket_for_rejects_out_of_range():
    with pytest.raises(ValueError, match="n=101 exceeds the largest bucket 100"):
        bucket_for(101, make_buckets(100))
    with pytest.raises(ValueError, match="n must be >= 0"):
        bucket_for(-1, make_buckets(100))
    with pytest.raises(ValueError, match="non-empty"):
        bucket_for(1, [])
