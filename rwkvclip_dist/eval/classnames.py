"""Class names and prompt templates of a zero-shot evaluation.

A template set is a shipped name (``rwkvclip_dist/eval/templates/<name>.json``) or a JSON file with
``templates`` and optionally ``classnames`` and ``metric``. Instead of a ``classnames`` list, a set may
say ``"classnames_from": "imagenet-1k"``: the standard ImageNet-1k class names in label order, taken
from the installed open_clip (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``, the names CLIP's
authors wrote for zero-shot use). Label order is the sorted order of the WordNet ids, which timm
(installed with open_clip) lists in ``timm.data.ImageNetInfo``; with them an image folder of
WordNet-id sub-folders (``n01440764/...``, the standard ImageNet layout, or any subset of it) gets the
names of its classes. Both lists are imported from those libraries, not copied here.

Whatever the source, class names that look like identifiers (``n01440764``, ``class_007``) rather
than words are refused: the text tower would read "a photo of a n01440764" and score noise.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from rwkvclip_dist.data.class_list import read_class_list

TEMPLATES_DIR = Path(__file__).parent / "templates"
WORDNET_ID = re.compile(r"n\d{8}")
# WordNet ids, codes with a long digit run, "class_7"-style labels and bare numbers of two digits or
# more. Single digits stay allowed ("0".."9" are words to a CLIP tokenizer: MNIST, SVHN).
_IDENTIFIER = re.compile(r"[a-z]\d{8}|\S*\d{5,}\S*|(?:class|cls|label|id|category)[ _-]?\d+|\d{2,}", re.IGNORECASE)


def is_shipped_template_set(name: str) -> bool:
    return re.fullmatch(r"[\w-]+", name) is not None and (TEMPLATES_DIR / f"{name}.json").is_file()


def shipped_template_sets() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


@functools.cache
def imagenet_1k() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(WordNet ids, class names)`` of ImageNet-1k in label order, from timm and open_clip."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        from timm.data import ImageNetInfo
    except ImportError as err:
        raise ImportError(f"the ImageNet-1k class names come from open_clip and timm, which are not importable "
                          f"here ({err}); pip install open_clip_torch") from None
    ids = tuple(ImageNetInfo("imagenet-1k").label_names())
    names = tuple(IMAGENET_CLASSNAMES)
    if len(ids) != 1000 or len(names) != 1000 or list(ids) != sorted(ids):
        raise ImportError(f"unexpected ImageNet-1k lists: {len(ids)} WordNet ids from timm, {len(names)} names "
                          f"from open_clip (1000 each, ids sorted, expected)")
    return ids, names


LIBRARY_CLASSNAMES = {"imagenet-1k": imagenet_1k}


def load_class_prompts(spec: str | Path) -> dict:
    """A template set: a shipped name (``imagenet``, ``cifar10``, ...) or a JSON file with
    ``templates`` (and optionally ``classnames`` or ``classnames_from``, and ``metric``)."""
    path = TEMPLATES_DIR / f"{spec}.json" if is_shipped_template_set(str(spec)) else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no template set {str(spec)!r}: not a file and not one of {shipped_template_sets()}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("templates"), list) or not data["templates"]:
        raise ValueError(f"{path}: needs a non-empty 'templates' list")
    if data.get("metric", "top1") not in ("top1", "mean_per_class"):
        raise ValueError(f"{path}: 'metric' must be 'top1' or 'mean_per_class', got {data['metric']!r}")
    source = data.pop("classnames_from", None)
    if source is not None:
        if source not in LIBRARY_CLASSNAMES or "classnames" in data:
            raise ValueError(f"{path}: 'classnames_from' must be one of {sorted(LIBRARY_CLASSNAMES)}, "
                             f"without a 'classnames' list; got {source!r}")
        data["wordnet_ids"], data["classnames"] = map(list, LIBRARY_CLASSNAMES[source]())
    data["path"] = str(path)
    return data


def class_names(prompts: dict, folder_names: list[str] | None, classnames_file: str | None, data: str,
                labels: list[int] | None = None) -> list[str]:
    """The class names of a zero-shot evaluation on ``data``, in label order: a text file (one per
    line, read by the one class-list reader) if given; else the template set's ``classnames`` (picked
    by WordNet id for a WordNet-id folder tree when the set carries the ids); else the image folder's
    sub-folder names, with ImageNet-1k names for WordNet ids. Names that look like identifiers, a file
    with blank or repeated lines, and a count that differs from the set's classes (its folders, or ``labels`` 0..N-1 of a
    labelled MDS set) are refused."""
    wordnet_folders = folder_names is not None and any(WORDNET_ID.fullmatch(n) for n in folder_names)
    if classnames_file:
        names = read_class_list(classnames_file, "class-names file")
        source = f"class-names file {classnames_file}"
    elif prompts.get("classnames") and not (wordnet_folders and prompts.get("wordnet_ids")):
        names, source = list(prompts["classnames"]), f"template set {prompts.get('path', '?')}"
    elif folder_names:
        names, source = folder_names, f"the sub-folder names of {data}"
        if wordnet_folders:
            ids, words = prompts.get("wordnet_ids"), prompts.get("classnames")
            by_id = dict(zip(ids, words)) if ids and words else dict(zip(*imagenet_1k()))
            names, source = [by_id.get(n, n) for n in folder_names], f"the ImageNet-1k names of {data}'s WordNet ids"
    else:
        raise ValueError(f"{data}: no class names (give a class-names file or a template set with 'classnames')")
    if folder_names is not None and len(names) != len(folder_names):
        raise ValueError(f"{len(names)} class names ({source}) for {len(folder_names)} class folders in {data}")
    if labels is not None and labels:
        if min(labels) < 0 or max(labels) + 1 != len(names):
            raise ValueError(f"{data}: its labels run {min(labels)}..{max(labels)} ({max(labels) + 1} classes) but "
                             f"there are {len(names)} class names ({source}); give the class list of this set")
    odd = [n for n in names if _IDENTIFIER.fullmatch(n.strip())]
    if odd:
        raise ValueError(f"{data}: {len(odd)} of {len(names)} class names ({source}) look like identifiers, not "
                         f"words, e.g. {', '.join(map(repr, odd[:4]))}; zero-shot prompts need the names of the "
                         f"classes: give a class-names file (one name a line, in label order) or a template set "
                         f"with 'classnames'")
    return names
