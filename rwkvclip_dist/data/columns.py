"""The MDS column contract shared by the shard builder, the loader and the docs (docs/data.md)."""

from __future__ import annotations

# Text kinds in the order of their ids (the ``text_id`` the loader yields).
TEXT_COLUMNS: tuple[str, ...] = ("raw", "synthetic", "generated")
TEXT_ID = {name: i for i, name in enumerate(TEXT_COLUMNS)}

# Required columns: every shard has them.
REQUIRED_COLUMNS: dict[str, str] = {
    "key": "str",        # unique sample id across the data set
    "jpg": "bytes",      # JPEG-encoded RGB image
    "raw": "str",        # raw web text (alt text); never empty
    "synthetic": "str",  # captioner output; "" when absent
    "generated": "str",  # LLM-written description; "" when absent
    "tags": "json",      # list of detection tags (strings); [] when absent
}

# Optional columns: written when known; readers must not depend on them.
OPTIONAL_COLUMNS: dict[str, str] = {
    "width": "int",      # stored image width in pixels
    "height": "int",     # stored image height in pixels
    "source": "str",     # where the sample came from (input file or URL)
    "label": "int",      # class index, for labelled sets such as the demo digits
}

COMPRESSION = "zstd"
DEFAULT_SIZE_LIMIT = 1 << 26  # 64 MiB per shard (before compression)


def columns(with_label: bool = False) -> dict[str, str]:
    """MDS ``columns`` argument for a builder; ``label`` only for labelled sets."""
    cols = dict(REQUIRED_COLUMNS)
    cols.update({k: v for k, v in OPTIONAL_COLUMNS.items() if with_label or k != "label"})
    return cols
