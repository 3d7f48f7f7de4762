"""WinoGAViL (DataComp's ``misc/winogavil``) read from DataComp's Hugging Face cache layout, made
here with pyarrow (tests/eval_layouts.py; the ``datasets`` library is not installed), and scored as
DataComp's ``eval_utils/wino_eval.py``: that loop (prompt, top-``n_assoc`` pick, sklearn's
``jaccard_score``, the group means) is written out in ``_datacomp_winogavil``, as DataComp is a
repository, not an installable package, and applied to the same model outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval_layouts import hf_cache_winogavil_set
from rwkvclip_dist.eval.features import LoaderConfig
from rwkvclip_dist.eval.suite import get_suite
from rwkvclip_dist.eval.suite_runner import SuiteScorer
from rwkvclip_dist.pretrained import create_model_and_transforms, get_tokenizer, load_model, save_pretrained

pytestmark = pytest.mark.timeout(300)
WINO_CANDIDATES = (5, 6, 10, 12, 5, 10, 12, 6, 10)  # row 1 has a corrupt image


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.manual_seed(0)
    path = save_pretrained(load_model("tiny"), tmp_path_factory.mktemp("m") / "tiny.safetensors")
    model, _, tf = create_model_and_transforms(None, pretrained=path)
    return model, tf, get_tokenizer(str(path))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("datacomp")
    hf_cache_winogavil_set(root / "hf_cache", WINO_CANDIDATES, seed=6, corrupt=((1, 2),))
    return root


def _datacomp_winogavil(root, model, tf, tokenizer):
    """DataComp's ``eval_utils/wino_eval.py`` loop, written out here (DataComp is a repository, not an
    installable package, and its loader needs the ``datasets`` library and the Hub): per instance the
    prompt "A/An <cue>" lower-cased, normalised image and text features, the ``n_assoc`` most similar
    candidates by ``np.argsort(logits)[-n_assoc:]``, sklearn's ``jaccard_score`` against
    ``np.isin(candidates, associations)``, then means over all instances, over 5/6/10/12 candidates
    and over <= 6 and >= 10. The instances are read from the Arrow file with pyarrow, not our reader."""
    import io

    import pyarrow as pa
    from PIL import Image
    from sklearn.metrics import jaccard_score

    (path,) = root.rglob("*-test.arrow")
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
    scores, groups = [], []
    for ex in table:
        try:
            imgs = [Image.open(io.BytesIO(i["bytes"]) if i["bytes"] else root / i["path"]).convert("RGB")
                    for i in ex["candidate_images"]]
        except OSError:
            continue  # our reader skips (and counts) an instance with an unreadable image
        cue = ex["cue"].lower()
        text = tokenizer([f"An {cue}" if cue[0] in "aeiou" else f"A {cue}"])
        y_true = np.isin(ex["candidates"], ex["associations"])
        with torch.no_grad():
            img_f = torch.nn.functional.normalize(model.encode_image(torch.stack([tf(i) for i in imgs])), dim=-1)
            txt_f = torch.nn.functional.normalize(model.encode_text(text), dim=-1)
            logits = (txt_f @ img_f.T).squeeze(0).numpy()
        topk = np.argsort(logits)[-int(y_true.sum()):]
        scores.append(jaccard_score(y_true, np.isin(np.arange(len(imgs)), topk)))
        groups.append(len(imgs))
    scores, groups = np.array(scores), np.array(groups)
    return {"avg_jaccard_score": scores.mean(), "jaccard_score_5": scores[groups == 5].mean(),
            "jaccard_score_6": scores[groups == 6].mean(), "jaccard_score_10": scores[groups == 10].mean(),
            "jaccard_score_12": scores[groups == 12].mean(), "jaccard_score_5-6": scores[groups <= 6].mean(),
            "jaccard_score_10-12": scores[groups >= 10].mean()}


def test_winogavil_equals_datacomps_formula(loaded, data_dir):
    """WinoGAViL from DataComp's Hugging Face cache layout: planned from the data dir, scored as
    DataComp's wino_eval.py (reproduced in ``_datacomp_winogavil``) on the same model outputs; an
    instance with a corrupt image is counted and reported, not scored."""
    from rwkvclip_dist.eval.suite_runner import plan
    from rwkvclip_dist.eval.winogavil import cue_prompt, jaccard, pick

    (planned,) = plan(get_suite("datacomp").select(["WinoGAViL"]), data_dir)
    assert planned.root == data_dir / "hf_cache" / "nlphuji___winogavil"
    model, tf, tokenizer = loaded
    ours = SuiteScorer(model, tf, tokenizer, torch.device("cpu"), LoaderConfig(8, 0)).score(planned.task, planned.root)
    ref = _datacomp_winogavil(planned.root, model, tf, tokenizer)
    assert {k: ours[k] for k in ref} == pytest.approx(ref, abs=1e-6)
    assert 0 < ours["main_metric"] == ours["jaccard_score_10-12"] and ours["n"] == len(WINO_CANDIDATES) - 1
    assert ours["skipped_instances"] == 1 and ours["corrupt_images"] == 1
    assert ours["corrupt_keys"][0].startswith("row1/")
    # The pieces on cases whose answer is known.
    assert cue_prompt("Owl") == "An owl" and cue_prompt("Moon") == "A moon"
    assert pick(np.array([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [False, True, False, True]
    assert jaccard(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)) == pytest.approx(1 / 3)
