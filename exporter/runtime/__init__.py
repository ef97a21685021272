"""Running an export: text generation on a decoder-with-past (`generation`), greedy agreement.

Enters: an ONNX Runtime session or an active `engines.base.Runner`. Leaves: tokens and logits.
"""
