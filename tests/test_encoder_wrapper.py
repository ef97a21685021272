"""EncoderForExport hands the model an additive [B, 1, 1, S] padding mask instead of the 2-D mask: the
outputs must be those of the HF model called the usual way, padding on either side."""

from __future__ import annotations

import graph_models as gm
import pytest
import torch

from exporter.export.torch_to_onnx import EncoderForExport, additive_padding_mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_wrapper_equals_the_model_with_its_2d_mask(side):
    model = gm.build_bert().eval()
    feeds = {k: torch.from_numpy(v) for k, v in gm.bert_example(batch=3, seq=9).items()}
    mask = torch.ones(3, 9, dtype=torch.int64)
    if side == "left":
        mask[0, :3] = mask[2, :1] = 0
    else:
        mask[0, 6:] = mask[2, 8:] = 0
    feeds["attention_mask"] = mask
    with torch.inference_mode():
        expected = model(**feeds).last_hidden_state
        actual = EncoderForExport(model, uses_token_type_ids=True, pooling=None)(**feeds)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_additive_padding_mask_values():
    bias = additive_padding_mask(torch.tensor([[1, 1, 0]]), torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, :2].abs().max() == 0 and bias[0, 0, 0, 2] == torch.finfo(torch.float32).min
