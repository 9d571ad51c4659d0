import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from selfalign.core.engines.sampling import TemperatureTopP


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.98, 0.999])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_keeps_exactly_what_transformers_keeps(top_p, temperature):
    torch.manual_seed(0)
    scores = torch.randn(6, 5000) * 3
    scores[0] = torch.randn(5000) * 0.01  # a nearly flat row: the nucleus is most of the vocabulary (k must grow)
    ids = torch.zeros(6, 1, dtype=torch.long)
    ref = TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(temperature)(ids, scores.clone()))
    ours = TemperatureTopP(temperature, top_p, first_k=8)(ids, scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite])


def test_top_p_one_only_applies_temperature():
    scores = torch.randn(2, 100)
    out = TemperatureTopP(0.5, 1.0)(None, scores)
    assert torch.allclose(out, scores / 0.5)


def test_always_keeps_the_top_token():
    scores = torch.tensor([[10.0, 0.0, -1.0]])
    out = TemperatureTopP(1.0, 1e-6)(None, scores)
    assert out[0, 0] == 10.0 and torch.isinf(out[0, 1:]).all()
