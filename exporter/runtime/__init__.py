"""Running an export: serving it for its task (`task_model`: `exporter.load(OUT_DIR)` on the engine file
`engine_choice` picks from report.json, with the folder's tokenizer), text generation on a
decoder-with-past (`generation`), greedy agreement.

Enters: an OUT_DIR, an ONNX Runtime session or an active `engines.base.Runner`. Leaves: the task's results
(labels, entities, answers, tokens, embeddings), tokens and logits.
"""
