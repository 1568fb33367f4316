"""The encoder's input channels: what an unseen entry may and may not pass on."""

import pytest
import torch

from msa.nn.model import MaskedAutoencoder

torch.set_num_threads(1)


@pytest.mark.parametrize("indicators,raw_inputs", [(True, False), (False, True), (True, True), (False, False)])
def test_an_unseen_value_never_reaches_the_latent(indicators, raw_inputs):
    torch.manual_seed(0)
    model = MaskedAutoencoder(6, 6, d_embedding=4, n_frequencies=4, encoder_widths=[16, 8],
                              indicators=indicators, raw_inputs=raw_inputs).eval()
    assert model.encoder[0].body[0].in_features == 6 * (4 + indicators + raw_inputs)
    x = torch.randn(5, 6)
    hidden = torch.zeros(5, 6, dtype=torch.bool)
    hidden[:, 2] = True
    other = x.clone()
    other[:, 2] = 1e3  # a hidden entry's value is not an input
    nan = x.clone()
    nan[:, 2] = float("nan")  # nor is missing different from hidden
    with torch.no_grad():
        z = model.encode(x, hidden)
        torch.testing.assert_close(model.encode(other, hidden), z)
        torch.testing.assert_close(model.encode(nan, torch.zeros_like(hidden)), z)
        # a seen value does reach it
        assert not torch.allclose(model.encode(other, torch.zeros_like(hidden)), model.encode(x, torch.zeros_like(hidden)))


def test_old_checkpoints_without_the_new_settings_keep_their_channels():
    hparams = MaskedAutoencoder(6, 6, d_embedding=4, n_frequencies=4, encoder_widths=[8]).hparams
    old = {k: v for k, v in hparams.items() if k not in ("indicators", "raw_inputs")}
    rebuilt = MaskedAutoencoder(**old)
    assert rebuilt.indicators and not rebuilt.raw_inputs
