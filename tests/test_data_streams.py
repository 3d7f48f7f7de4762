"""Weighted mixing of several MDS streams (data.streams[*].proportion / repeat / choose).

Counts per stream per epoch as Streaming defines them (docs/data.md, "Mixing streams"): proportion
takes floor(epoch * p / sum p) samples per stream (remainder spread by a seeded draw), repeat takes
int(repeat * size), choose takes exactly choose; a stream taken more often than it has samples repeats
every sample floor(k) times before any sample a further time.
"""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import text_index, write_shards
from rwkvclip_dist.data.config import DataConfig, StreamConfig
from rwkvclip_dist.data.loader import build_train_dataloader
from rwkvclip_dist.typed_config import ConfigError, build_dataclass

pytestmark = pytest.mark.usefixtures("clean_shm_before_and_after")
SIZES = {"a": 40, "b": 24, "c": 16}


@pytest.fixture
def streams(tmp_path):
    for name, n in SIZES.items():
        write_shards(str(tmp_path / name), n, prefix=name)
    lookup = {}
    for name, n in SIZES.items():
        lookup.update({k: (name, i) for k, (i, _) in text_index(name, n).items()})
    return tmp_path, lookup


def _epochs(root, lookup, weights: dict[str, dict], epochs: int = 2, **cfg) -> list[dict[str, Counter]]:
    """Per epoch: stream -> Counter(sample index -> times seen)."""
    data = DataConfig(streams=[StreamConfig(remote=str(root / name), **weights.get(name, {})) for name in SIZES],
                      batch_size=4, num_workers=0, text_weights={"raw": 1.0}, **cfg)
    loader, _ = build_train_dataloader(data, image_size=8, seed=0)
    out = []
    for _ in range(epochs):
        seen: dict[str, Counter] = {name: Counter() for name in SIZES}
        for _, tokens, _ in loader:
            for t in tokens:
                name, i = lookup[tuple(t.tolist())]
                seen[name][i] += 1
        out.append(seen)
    return out


def _spread(counter: Counter, size: int) -> Counter:
    """How many samples were seen 0, 1, 2, ... times."""
    return Counter(counter.get(i, 0) for i in range(size))


def test_proportion_splits_the_epoch(streams):
    root, lookup = streams
    # epoch_size 64 at 2:1:1 -> 32/16/16: stream c (16 samples) exactly once each, a and b subsampled.
    for seen in _epochs(root, lookup, {"a": {"proportion": 2}, "b": {"proportion": 1}, "c": {"proportion": 1}},
                        epoch_size=64):
        assert {k: sum(v.values()) for k, v in seen.items()} == {"a": 32, "b": 16, "c": 16}
        assert _spread(seen["c"], 16) == {1: 16}
        assert _spread(seen["a"], 40) == {1: 32, 0: 8}
    # no epoch_size: the epoch is the sum of the sizes (80) -> 40/20/20, so c is upsampled 1.25x
    (seen,) = _epochs(root, lookup, {"a": {"proportion": 2}, "b": {"proportion": 1}, "c": {"proportion": 1}},
                      epochs=1)
    assert {k: sum(v.values()) for k, v in seen.items()} == {"a": 40, "b": 20, "c": 20}
    assert _spread(seen["c"], 16) == {1: 12, 2: 4} and _spread(seen["a"], 40) == {1: 40}


def test_repeat_up_and_down_samples(streams):
    root, lookup = streams
    first, second = _epochs(root, lookup, {"a": {"repeat": 2.5}, "b": {"repeat": 0.5}})
    for seen in (first, second):
        # a: int(2.5 * 40) = 100, every sample twice and 20 of them a third time; b: 12 of 24; c: once
        assert {k: sum(v.values()) for k, v in seen.items()} == {"a": 100, "b": 12, "c": 16}
        assert _spread(seen["a"], 40) == {2: 20, 3: 20}
        assert _spread(seen["b"], 24) == {1: 12, 0: 12} and _spread(seen["c"], 16) == {1: 16}
    assert set(first["b"]) != set(second["b"]), "each epoch draws its own half of stream b"


def test_choose_takes_exact_counts(streams):
    root, lookup = streams
    (seen,) = _epochs(root, lookup, {"a": {"choose": 12}, "b": {"choose": 28}}, epochs=1)
    assert {k: sum(v.values()) for k, v in seen.items()} == {"a": 12, "b": 28, "c": 16}
    assert _spread(seen["a"], 40) == {1: 12, 0: 28} and _spread(seen["b"], 24) == {1: 20, 2: 4}


@pytest.mark.parametrize("streams_yaml, extra, message", [
    ([{"proportion": 1, "choose": 5}, {}], {}, r"data\.streams\[0\]: set at most one of proportion, repeat, "
                                               r"choose \(got proportion and choose\)"),
    ([{"proportion": 1}, {"repeat": 2.0}], {}, r"data\.streams\[1\]: has no proportion while "
                                               r"data\.streams\[0\] has one"),
    ([{"repeat": -1.0}, {}], {}, r"data\.streams\[0\]\.repeat: must be >= 0"),
    ([{"proportion": 0}, {"proportion": 0}], {}, r"at least one proportion must be positive"),
    ([{"choose": 8}, {}], {"epoch_size": 64}, r"data\.epoch_size: 64 cannot be combined with "
                                              r"data\.streams\[0\]\.choose"),
    ([{"choose": 2.5}, {}], {}, r"data\.streams\[0\]\.choose: expected int"),
])  # fmt: skip
def test_bad_weightings_name_the_recipe_key(tmp_path, streams_yaml, extra, message):
    data = {"streams": [{"remote": str(tmp_path / f"s{i}"), **w} for i, w in enumerate(streams_yaml)], **extra}
    with pytest.raises(ConfigError, match=message) as info:
        build_dataclass(DataConfig, data, {}, "recipe r.yaml", "data.")
    assert "r.yaml" in str(info.value)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # Streaming's 0/0
def test_weights_selecting_nothing_and_a_tiny_cache_are_clear_errors(streams):
    root, _ = streams
    with pytest.raises(ValueError, match=r"data\.streams: the stream weights .* select no sample"):
        build_train_dataloader(DataConfig(streams=[StreamConfig(remote=str(root / n), choose=0) for n in SIZES],
                                          batch_size=4, num_workers=0), image_size=8, seed=0)
    cfg = DataConfig(streams=[StreamConfig(remote=str(root / "a"), local=str(root / "cache"))], batch_size=4,
                     num_workers=0, cache_limit="20kb")
    with pytest.raises(ValueError, match=r"data\.cache_limit='20kb': .*at-least four times"):
        build_train_dataloader(cfg, image_size=8, seed=0)
