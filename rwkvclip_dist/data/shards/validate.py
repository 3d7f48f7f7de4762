"""Turn a ``RawSample`` into an MDS row or a rejection reason (the builder's single set of rules)."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from rwkvclip_dist.data.shards.sources import RawSample

# Every reason a sample can be skipped for; the build report counts each of them.
REASONS = ("missing_image", "missing_file", "corrupt_image", "missing_text", "empty_text",
           "non_utf8_text", "bad_metadata", "duplicate_key", "unreadable_input", "eval_contamination")


class Rejected(Exception):
    """A sample is unusable; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored: longest side cap and JPEG quality when re-encoding."""

    resize_max_side: int | None = None
    jpeg_quality: int = 95


def decode_text(value: bytes | str | None, field: str, required: bool) -> str:
    """Strict UTF-8 decode and whitespace strip; an empty required text is rejected."""
    if value is None:
        if required:
            raise Rejected("missing_text", f"no {field} text")
        return ""
    if isinstance(value, str):
        # Strings read with surrogateescape still carry invalid bytes as lone surrogates.
        value = value.encode("utf-8", "surrogateescape")
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise Rejected("non_utf8_text", f"{field} is not UTF-8 ({e.reason} at byte {e.start})") from None
    if required and not text:
        raise Rejected("empty_text", f"{field} text is empty")
    return text


def encode_image(data: bytes | None, opts: ImageOptions) -> tuple[bytes, int, int]:
    """Fully decode the image (catches truncation); re-encode to RGB JPEG only when needed."""
    if data is None:
        raise Rejected("missing_image", "no image payload")
    buf = io.BytesIO(data)
    try:
        img = Image.open(buf)
        fmt = img.format
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL names the buffer by its address; keep the rejects file the same from run to run.
        raise Rejected("corrupt_image", f"{type(e).__name__}: {e}".replace(repr(buf), "<image bytes>")) from None
    w, h = img.size
    if w < 1 or h < 1:
        raise Rejected("corrupt_image", f"image has size {w}x{h}")
    cap = opts.resize_max_side
    too_big = cap is not None and max(w, h) > cap
    if fmt == "JPEG" and img.mode == "RGB" and not too_big:
        return data, w, h  # keep the original bytes: no generation loss
    img = img.convert("RGB")
    if too_big:
        scale = cap / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.jpeg_quality)
    return buf.getvalue(), img.size[0], img.size[1]


def to_row(s: RawSample, caption: dict | None, opts: ImageOptions,
           label: tuple[int, str | None] | None = None) -> dict:
    """Validate one sample (with its merged ``--captions`` entry) and build the MDS row.

    ``label`` is ``(class index, class name or None)`` for labelled sets: the row gets a ``label``
    column, and the class name stands in for a missing raw text.
    """
    if label is not None and s.raw is None and label[1]:
        s.raw = label[1].encode("utf-8")
    if s.image_error is not None:
        reason, _, detail = s.image_error.partition(": ")
        raise Rejected(reason, detail)
    if s.meta_error is not None:
        raise Rejected("bad_metadata", s.meta_error)
    caption = caption or {}
    raw = decode_text(s.raw, "raw", required=True)
    texts = {name: decode_text(caption.get(name, getattr(s, name)), name, required=False)
             for name in ("synthetic", "generated")}
    tags = caption.get("tags", s.tags)
    tags = [] if tags is None else tags
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise Rejected("bad_metadata", f"tags must be a list of strings, got {tags!r:.80}")
    jpg, w, h = encode_image(s.image, opts)
    row = {"key": s.key, "jpg": jpg, "raw": raw, **texts, "tags": tags,
           "width": w, "height": h, "source": s.extra.get("source", s.source)}
    if label is not None:
        row["label"] = label[0]
    return row
