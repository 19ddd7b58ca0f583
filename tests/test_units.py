"""Sizes as people write them, for --memory-limit."""

from __future__ import annotations

import pytest

from batchfit.core.units import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        ("4GB", 4 * 10**9),
        ("4 gb", 4 * 10**9),
        ("512MiB", 512 * 2**20),
        ("2g", 2 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        ("800M", 800 * 2**20),
        ("1_000kb", 10**6),
        ("1e3", 1000),
    ],
)
def test_sizes_parse_with_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "4 XB", "GB", "1.2.3G"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_bytes_is_short_and_binary():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(11.4 * 2**30) == "11 GiB"
