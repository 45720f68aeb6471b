"""The conditional-VAE mapper."""

import pytest
import torch

from t2f.io import WeightsError
from t2f.mapper import Mapper, MapperConfig, load_mapper_dir, save_mapper


def make(w_plus=False, seed=0, mean_head=False):
    torch.manual_seed(seed)
    return Mapper(MapperConfig(embed_dim=32, w_dim=16, num_ws=6, z_dim=8, hidden=24, layers=3, w_plus=w_plus, mean_head=mean_head),
                  w_avg=torch.randn(16))


@pytest.mark.parametrize("mean_head", [False, True])
@pytest.mark.parametrize("w_plus", [False, True])
def test_decoder_shapes_and_w_avg_offset(w_plus, mean_head):
    m = make(w_plus, mean_head=mean_head)
    e = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    z = torch.randn(4, 8)
    ws = m(e, z)
    assert ws.shape == (4, 6, 16)
    assert torch.allclose(ws - m.w_avg, m.decoder(m.condition(e), z).reshape(4, -1, 16).expand(-1, 6, -1))
    if not w_plus:
        assert torch.equal(ws[:, 0], ws[:, 5])
    else:
        assert not torch.allclose(ws[:, 0], ws[:, 5])
    assert not torch.allclose(ws[0], m(e, torch.randn(4, 8))[0])  # z matters


@pytest.mark.parametrize("w_plus", [False, True])
def test_mean_head_centres_the_faces_of_an_embedding(w_plus):
    """With a mean head, z's part is odd in z: z and -z land symmetrically around the mean head's w, whatever the weights."""
    m = make(w_plus, mean_head=True)
    e, z = torch.randn(5, 32), torch.randn(5, 8)
    centre = m.ws(m.decoder.mean(m.condition(e)))
    assert torch.allclose((m(e, z) + m(e, -z)) / 2, centre, atol=1e-6)
    assert not torch.allclose(m(e, z), centre, atol=1e-3)                          # z still moves the face
    plain = make(w_plus, mean_head=False)
    assert not torch.allclose((plain(e, z) + plain(e, -z)) / 2, plain(e, torch.zeros(5, 8)), atol=1e-3)


def test_config_without_mean_head_field_loads_as_before():
    """Mapper directories written before the mean head existed have no such field: they load as plain CVAEs."""
    config = MapperConfig.from_dict(dict(embed_dim=32, w_dim=16, num_ws=6, z_dim=8, hidden=24, layers=3, w_plus=False))
    assert config.mean_head is False and Mapper(config).decoder.mean is None


@pytest.mark.parametrize("w_plus", [False, True])
def test_encoder(w_plus):
    m = make(w_plus)
    ws = torch.randn(4, 6, 16)
    e = torch.randn(4, 32)
    mu, logvar = m.encode(ws, e)
    assert mu.shape == logvar.shape == (4, 8)


@pytest.mark.parametrize("mean_head", [False, True])
def test_save_load_round_trip(tmp_path, mean_head):
    m = make(mean_head=mean_head)
    save_mapper(m, tmp_path / "m", generator="tiny", clip="tiny")
    loaded, meta = load_mapper_dir(tmp_path / "m")
    assert meta["clip"] == "tiny" and loaded.config == m.config
    e, z = torch.randn(2, 32), torch.randn(2, 8)
    assert torch.equal(loaded(e, z), m(e, z))


def test_generator_directory_is_not_a_mapper(tmp_path, tiny_generator):
    from t2f.weights import save_generator

    save_generator(tiny_generator, tmp_path / "g")
    with pytest.raises(WeightsError, match="not a 't2f-mapper'"):
        load_mapper_dir(tmp_path / "g")


def test_config_validation():
    with pytest.raises(ValueError):
        MapperConfig(layers=1)
    with pytest.raises(ValueError):
        MapperConfig(z_dim=0)


def test_embedding_standardization_is_saved_and_applied(tmp_path):
    from t2f.mapper import embedding_statistics

    m = make()
    e = torch.nn.functional.normalize(torch.randn(64, 32) * 0.1 + 1, dim=-1)    # close together, as CLIP's faces are
    mean, scale = embedding_statistics(e)
    x = m.condition(e)
    assert torch.allclose(x.norm(dim=1), torch.full([64], 32 ** 0.5))           # default: 2nd-moment normalization only
    m.embed_mean.copy_(mean)
    m.embed_scale.copy_(scale)
    x = m.condition(e)
    assert x.mean(dim=0).abs().max() < 1e-5 and abs(x.square().mean().item() - 1) < 1e-4   # centred, unit RMS
    save_mapper(m, tmp_path / "m")
    loaded, _ = load_mapper_dir(tmp_path / "m")
    z = torch.randn(64, 8)
    assert torch.equal(loaded.embed_scale, m.embed_scale) and torch.equal(loaded(e, z), m(e, z))
