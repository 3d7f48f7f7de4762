"""The in-loop evaluations (``training/evals.py``): a mistake in an evaluation's files is reported as
the project's one-line error naming the evaluation, whatever exception the reader raised."""
from __future__ import annotations

import pytest
import torch
from PIL import Image


def _image_folder(root):
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "0.png")
    return root


@pytest.mark.parametrize("content, expected", [
    (b'{"templates": ["a photo of a {}."], "classnames": ["cat", "d\xffg"]}', "can't decode byte 0xff"),
    (b'{"templates": []}', "needs a non-empty 'templates' list"),
])
def test_an_unreadable_class_file_names_the_evaluation_and_keeps_the_readers_message(tmp_path, content, expected):
    """A class file that is not UTF-8 raises ``UnicodeDecodeError``, whose constructor takes five
    arguments: re-raising it as ``type(err)(message)`` used to end in a ``TypeError`` that hid it."""
    from rwkvclip_dist.training.evals import ZeroShotEvalSection, open_evaluations
    from rwkvclip_dist.typed_config import ConfigError

    classes = tmp_path / "classes.json"
    classes.write_bytes(content)
    section = ZeroShotEvalSection(name="pets", data=str(_image_folder(tmp_path / "data")), classes=str(classes))
    with pytest.raises(ConfigError) as caught:
        open_evaluations([section], "tiny", {}, torch.device("cpu"))
    message = str(caught.value)
    assert message.startswith("eval.zeroshot 'pets': ") and expected in message, message
    assert "\n" not in message
