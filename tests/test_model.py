"""The RWKV-CLIP model: token shifts, parameter counts, every registered config, initialisation."""
import math

import pytest
import torch

import rwkvclip_dist
from rwkvclip_dist.model import ConfigError, RWKVCLIP, get_model_config
from rwkvclip_dist.model.shift import b_shift, q_shift


def test_q_shift_takes_left_right_up_down_neighbours_per_head():
    # 2 heads of 4 channels on a 3x3 grid; every channel of token (i, j) holds 10*i + j + 1.
    grid = torch.tensor([[10 * i + j + 1 for j in range(3)] for i in range(3)], dtype=torch.float32)
    x = grid.reshape(1, 9, 1).expand(1, 9, 8).clone()
    out = q_shift(x, (3, 3), head_size=4).reshape(3, 3, 2, 4)
    for i in range(3):
        for j in range(3):
            left = grid[i, j - 1] if j > 0 else 0
            right = grid[i, j + 1] if j < 2 else 0
            up = grid[i - 1, j] if i > 0 else 0
            down = grid[i + 1, j] if i < 2 else 0
            for head in range(2):
                assert out[i, j, head].tolist() == [left, right, up, down]


def test_q_shift_leaves_the_class_token_alone():
    x = torch.arange(1, 6, dtype=torch.float32).reshape(1, 5, 1).expand(1, 5, 4).clone()  # 2x2 grid + class
    out = q_shift(x, (2, 2), head_size=4, num_extra_tokens=1)
    assert out[0, 4].tolist() == [5, 5, 5, 5]
    assert out[0, 0].tolist() == [0, 2, 0, 3]  # token (0,0): no left, right=(0,1), no up, down=(1,0)


def test_b_shift_takes_previous_then_next_token_per_head():
    x = torch.arange(1, 5, dtype=torch.float32).reshape(1, 4, 1).expand(1, 4, 4).clone()  # 2 heads of 2
    out = b_shift(x, head_size=2)
    assert out[0].tolist() == [[0, 2, 0, 2], [1, 3, 1, 3], [2, 4, 2, 4], [3, 0, 3, 0]]


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,total,image,text", [
    ("RWKV-CLIP-B-32", 149_561_601, 84_207_360, 65_354_240),
    ("RWKV-CLIP-B-16", 148_181_121, 82_826_880, 65_354_240),
])
def test_paper_parameter_counts_are_exact(name, total, image, text):
    with torch.device("meta"):
        model = RWKVCLIP(get_model_config(name), initialize=False)
    assert (count(model), count(model.visual), count(model.text)) == (total, image, text)
    assert model.visual_proj is None and model.text_proj is None


@pytest.mark.parametrize("name", rwkvclip_dist.list_models())
def test_every_registered_config_runs_forward_and_backward_at_reduced_depth(name):
    config = get_model_config(name, **{"image.depth": 1, "text.depth": 1})
    model = RWKVCLIP(config)
    size = config.image.image_size
    images = torch.randn(1, 3, size, size)
    tokens = torch.randint(1, 49406, (1, config.text.context_length))
    out = model(images, tokens)
    assert out["image_features"].shape == out["text_features"].shape == (1, config.embed_dim)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(1))
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(1))
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
    (out["image_features"].sum() + out["text_features"].sum()).backward()
    assert model.visual.patch_embed.weight.grad is not None


def test_public_api_creates_models_with_overrides():
    assert {"tiny", "RWKV-CLIP-B-32", "RWKV-CLIP-B-16", "RWKV-CLIP-L-14"} <= set(rwkvclip_dist.list_models())
    model = rwkvclip_dist.create_model("tiny", image={"pool": "token"}, **{"text.pool": "masked_mean"})
    assert model.config.image.pool == "token" and model.config.text.pool == "masked_mean"
    assert model.visual.class_token is not None


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'detph'"):
        rwkvclip_dist.create_model("tiny", image={"detph": 3})
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        rwkvclip_dist.create_model("nope")
    with pytest.raises(ConfigError, match="divisible by 4"):
        rwkvclip_dist.create_model("tiny", image={"head_size": 6, "width": 66})


def test_creation_and_forward_are_deterministic():
    torch.manual_seed(0)
    a = rwkvclip_dist.create_model("tiny").eval()
    torch.manual_seed(0)
    b = rwkvclip_dist.create_model("tiny").eval()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(0, 49408, (3, 77))
    first, second = a(images, tokens), a(images, tokens)
    assert torch.equal(first["image_features"], second["image_features"])
    assert torch.equal(first["text_features"], second["text_features"])


def test_position_embedding_resizes_for_other_resolutions():
    model = rwkvclip_dist.create_model("tiny").eval()
    assert torch.equal(model.visual.position_embedding((8, 8)), model.visual.pos_embed)
    assert model.encode_image(torch.randn(2, 3, 48, 48)).shape == (2, 64)
    pooled, tokens = model.encode_image(torch.randn(2, 3, 48, 48), return_tokens=True)
    assert tokens.shape == (2, 144, 64)


def test_text_pooling_modes():
    model = rwkvclip_dist.create_model("tiny").eval()
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, 320, 49407
    _, per_token = model.text(tokens, return_tokens=True)
    paper = torch.nn.functional.normalize(per_token, dim=-1).mean(1)
    assert torch.allclose(model.text(tokens), paper)
    model.text.config.pool = "masked_mean"
    assert torch.allclose(model.text(tokens), per_token[:, :3].mean(1))


def test_initialisation_follows_spec_section_7():
    model = rwkvclip_dist.create_model("tiny")
    depth, width = 2, 64
    d = torch.arange(width, dtype=torch.float64) / width
    last = model.visual.blocks[1].att  # layer 1 of 2: r0 = 1, r1 = 0.5
    assert torch.allclose(last.maa_k.double().flatten(), 1 - d ** 0.5, atol=1e-6)
    assert torch.allclose(last.maa_v.double().flatten(), 1 - (d ** 0.5 + 0.3), atol=1e-6)
    n = torch.arange(width, dtype=torch.float64)
    assert torch.allclose(last.decay.double().flatten(), -6 + 5 * (n / (width - 1)) ** 2.0, atol=1e-5)
    first_text = model.text.blocks[0]
    assert first_text.att.output.weight.abs().sum() == 0 and first_text.ffn.value.weight.abs().sum() == 0
    assert torch.allclose(first_text.att.ln_x.weight, torch.full((width,), (1 / depth) ** 0.7))
    assert first_text.att.maa_w1.abs().sum() == 0 and first_text.att.maa_w2.abs().max() <= 0.01
    w = first_text.att.receptance.weight
    assert torch.allclose(w @ w.T, torch.eye(width), atol=1e-5)  # orthogonal, gain 1


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(1)
    model = rwkvclip_dist.create_model("tiny")
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 77))
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(enabled)
        out = model(images, tokens)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_model_knows_nothing_of_distributed_training():
    import pathlib
    for path in pathlib.Path(rwkvclip_dist.model.__file__).parent.glob("*.py"):
        imports = [line for line in path.read_text().splitlines() if line.lstrip().startswith(("import ", "from "))]
        assert not [line for line in imports if "deepspeed" in line or "torch.distributed" in line], path.name
