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


@pytest.mark.parametrize("n_inputs", [0, 5])
def test_quantile_head_orders_its_quantiles_whatever_the_weights(n_inputs):
    """q16 ≤ q50 ≤ q84 by construction (median ∓ softplus offsets), for random weights and for
    weights chosen to break the order: output biases that push the lower quantile above the
    median and the upper below it, and latents of every scale."""
    from msa.nn.model import QuantileHead

    torch.manual_seed(0)
    n_labels, latent_dim = 4, 8
    for trial in range(6):
        head = QuantileHead(latent_dim, n_labels, widths=[16], n_inputs=n_inputs)
        if trial >= 3:  # adversarial: raw lower/upper offsets strongly negative, the median small
            with torch.no_grad():
                bias = head.out.bias.view(n_labels, 3)
                bias[:, 0] = bias[:, 2] = -30.0 * trial
                bias[:, 1] = 0.0
                head.out.weight.mul_(10.0 ** trial)
        for scale in (1e-3, 1.0, 1e3):
            latent = torch.randn(64, latent_dim) * scale
            args = ()
            if n_inputs:
                x = torch.randn(64, n_inputs)
                x[torch.rand(64, n_inputs) < 0.3] = float("nan")
                args = (x, torch.rand(64, n_inputs) < 0.3)
            q = head(latent, *args)
            assert q.shape == (64, n_labels, 3) and torch.isfinite(q).all()
            assert (q[..., 0] <= q[..., 1]).all() and (q[..., 1] <= q[..., 2]).all(), (trial, scale)
